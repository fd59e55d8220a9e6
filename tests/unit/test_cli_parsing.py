"""pushctl: its pure helpers, every --help, and the registry commands on a throwaway SQLite file.

No network: registries are added with --no-test, and the one connection test run here fails at
DNS on purpose (getaddrinfo is replaced).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet

from tests.support.fakes import RecordingDispatcher
from worker.cli import cli
from worker.cli.common import (
    error_exit_codes,
    exit_code_for,
    parse_fallback,
    parse_since,
)
from worker.core import errors
from worker.core.settings import get_settings
from worker.core.summaries import human_bytes, summarize
from worker.store import events
from worker.store.db import session_scope
from worker.store.models import PushJob

pytestmark = pytest.mark.unit

PASSWORD = "s3cret-Pa55word-on-stdin"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


# --- pure helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("45s", timedelta(seconds=45)),
        (" 1W ", timedelta(weeks=1)),
    ],
)
def test_since_durations_count_back_from_now(text: str, ago: timedelta) -> None:
    assert parse_since(text, now=NOW) == NOW - ago


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-02-28T10:00:00Z", datetime(2025, 2, 28, 10, tzinfo=UTC)),
        ("2025-02-28T11:00:00+01:00", datetime(2025, 2, 28, 10, tzinfo=UTC)),
        ("2025-02-28 10:00", datetime(2025, 2, 28, 10, tzinfo=UTC)),  # no zone: UTC
        ("2025-02-28", datetime(2025, 2, 28, tzinfo=UTC)),
    ],
)
def test_since_iso_times_become_aware_utc(text: str, expected: datetime) -> None:
    parsed = parse_since(text, now=NOW)
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["", "yesterday", "2x", "h", "-2h", "2h ago"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text, now=NOW)


@pytest.mark.parametrize(
    ("text", "expected"), [("4,7", [4, 7]), (" 4 , 7 ", [4, 7]), ("5", [5]), ("", [])]
)
def test_fallback_lists(text: str, expected: list[int]) -> None:
    assert parse_fallback(text) == expected


@pytest.mark.parametrize("text", ["4,,7", "a,b", "4;7", "-1", "4,"])
def test_fallback_refuses_anything_but_ids(text: str) -> None:
    with pytest.raises(ValueError, match="registry ids"):
        parse_fallback(text)


def test_every_error_class_has_its_exit_code() -> None:
    codes = error_exit_codes()
    classes = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.PushWorkerError)
    ]
    assert {cls.code: cls.exit_code for cls in classes} == codes
    assert codes["authentication_failed"] == 7
    assert codes["fallback_exhausted"] == 7  # a subclass, found through the whole tree
    assert codes["registry_tls_error"] == codes["registry_unavailable"] == 8
    assert codes["invalid_state"] == 5


def test_unknown_error_codes_exit_1() -> None:
    assert exit_code_for(None) == 1
    assert exit_code_for("no_such_code") == 1
    assert exit_code_for("source_image_not_found") == 3


def test_event_summaries() -> None:
    progress = {"bytes_pushed": 1_500_000, "bytes_total": 3_000_000, "layers_done": 1,
                "layers_total": 2}  # fmt: skip
    assert summarize("step.progress", progress) == "1.5 MB / 3.0 MB, layers 1/2"
    moved = {"from_registry_id": 4, "to_registry_id": 7, "reason": "denied"}
    assert summarize("fallback.applied", moved) == "registry 4 -> 7: denied"
    failed = {"error_code": "x", "error_message": "boom", "hint": "fix it", "will_retry": True,
              "retry_in": 2.0}  # fmt: skip
    assert summarize("step.failed", failed) == "x: boom; hint: fix it; retry in 2.0 s"
    assert human_bytes(512) == "512 B"
    assert human_bytes(None) == "?"


# --- --help everywhere ----------------------------------------------------------------------------


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(_command_paths(cli)), ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert "pushctl" in result.output


def test_top_level_help_documents_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    for line in ("7    authentication failed", "8    registry unreachable", "124  --wait"):
        assert line in result.output


# --- registry commands on SQLite ------------------------------------------------------------------


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("PUSHWORKER_LOG_FORMAT", "json")
    get_settings.cache_clear()
    runner = CliRunner()
    upgraded = runner.invoke(cli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    yield runner
    get_settings.cache_clear()


def run(runner: CliRunner, *args: str, input: str | None = None, code: int = 0) -> Result:
    result = runner.invoke(cli, list(args), input=input)
    assert result.exit_code == code, (result.output, result.exception)
    return result


def add_harbor(runner: CliRunner, *extra: str, code: int = 0, input: str | None = None) -> Result:
    args = ["registry", "add", "harbor", "https://harbor.example.com:8443", "--kind", "harbor",
            "--username", "robot$ci", "--no-test", *extra]  # fmt: skip
    return run(runner, *args, input=input, code=code)


def test_add_list_show_never_print_the_password(runner: CliRunner) -> None:
    outputs = [add_harbor(runner, "--password-stdin", "--id", "5", input=f"{PASSWORD}\nnext\n")]
    outputs.append(run(runner, "registry", "list", "--json"))
    listed = json.loads(outputs[-1].stdout)
    assert [(r["id"], r["name"], r["host"], r["credential"]) for r in listed] == [
        (5, "harbor", "harbor.example.com:8443", "secret")
    ]
    outputs.append(run(runner, "registry", "show", "5", "--json"))
    shown = json.loads(outputs[-1].stdout)
    assert shown["username"] == "robot$ci" and shown["last_test"] is None
    outputs.append(run(runner, "registry", "show", "5"))
    outputs.append(run(runner, "registry", "list"))
    for result in outputs:
        assert PASSWORD not in result.output + result.stderr
        assert "next" not in result.output  # only the first line of stdin was read


def test_references_are_shown_as_given(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHWORKER_CREDENTIALS_DIR", str(tmp_path))  # the file's namespace
    get_settings.cache_clear()
    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD)
    add_harbor(runner, "--credential-ref", f"file:{secret_file}")
    shown = json.loads(run(runner, "registry", "show", "1", "--json").stdout)
    assert shown["credential"] == f"file:{secret_file}"


@pytest.mark.parametrize(
    ("extra", "stdin", "missing"),
    [
        (["--password-stdin"], "\n", "the password read from stdin is empty"),
        (["--password-stdin"], "", "the password read from stdin is empty"),
        ([], None, "needs a password"),
    ],
)
def test_an_empty_credential_is_refused(
    runner: CliRunner, extra: list[str], stdin: str | None, missing: str
) -> None:
    result = add_harbor(runner, *extra, input=stdin, code=2)
    assert missing in result.stderr
    assert json.loads(run(runner, "registry", "list", "--json").stdout) == []


def test_a_missing_username_is_named(runner: CliRunner) -> None:
    result = run(runner, "registry", "add", "r", "https://r.example.com", "--password-stdin",
                 "--no-test", input=f"{PASSWORD}\n", code=2)  # fmt: skip
    assert "needs a username" in result.stderr
    assert "--anonymous" in result.stderr  # the hint names the way out


def test_anonymous_takes_no_credential(runner: CliRunner) -> None:
    run(runner, "registry", "add", "r", "https://r.example.com", "--anonymous", "--username",
        "u", "--no-test", code=2)  # fmt: skip
    run(runner, "registry", "add", "r", "https://r.example.com", "--anonymous", "--no-test")
    shown = json.loads(run(runner, "registry", "show", "1", "--json").stdout)
    assert shown["credential"] == "anonymous"


def test_library_errors_become_message_hint_and_exit_code(runner: CliRunner) -> None:
    result = run(runner, "registry", "show", "99", code=3)
    assert result.stderr.splitlines() == [
        "error: registry 99 does not exist",
        "hint: see `pushctl registry list`",
    ]
    assert "Traceback" not in result.output
    chain = ("--password-stdin", "--fallback", "42")
    bad_chain = add_harbor(runner, *chain, input=f"{PASSWORD}\n", code=3)
    assert "error: registry 42 does not exist" in bad_chain.stderr


def test_bad_option_values_are_usage_errors(runner: CliRunner) -> None:
    result = run(runner, "events", "--since", "yesterday", code=2)
    assert "neither a duration" in result.output
    run(runner, "registry", "update", "1", "--fallback", "4,x", code=2)
    run(runner, "push", "img", "--registry", "1", "--repository", "a", "--tag", "b",
        "--timeout", "3", code=2)  # fmt: skip
    run(runner, "jobs", "retry", "--reason", "r", code=2)  # neither a job nor a selection


def test_an_unmigrated_database_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["registry", "list"])
    assert result.exit_code == 10
    assert "pushctl db upgrade" in result.stderr


def test_config_masks_the_secret_key(runner: CliRunner) -> None:
    shown = json.loads(run(runner, "config", "--json").stdout)
    assert shown["secret_key"] == "(set)"
    key = run(runner, "config", "new-key").stdout.strip()
    Fernet(key.encode())  # a valid key


def test_a_failed_connection_test_keeps_the_registry_and_is_recorded(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dns(*_args: Any, **_kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    result = add_harbor(runner, "--password-stdin", "--json", input=f"{PASSWORD}\n")
    assert json.loads(result.stdout)["test"] is None  # --no-test
    result = run(runner, "registry", "test", "1", "--json", code=8)
    report = json.loads(result.stdout)
    assert [(c["name"], c["ok"], c["skipped"]) for c in report["checks"]] == [
        ("dns", False, False),
        ("tcp", False, True),
        ("tls", False, True),
        ("v2", False, True),
        ("credentials", False, True),
    ]
    assert "--url" in report["checks"][0]["fix"]
    shown = json.loads(run(runner, "registry", "show", "1", "--json").stdout)
    assert shown["last_test"]["type"] == "registry.tested"
    assert shown["last_test"]["payload"]["ok"] is False
    assert PASSWORD not in result.output + result.stderr


# --- push --wait, with the worker replaced by a function that ends the job at once ----------------


def _finish_jobs_as(
    dispatched: RecordingDispatcher, status: str, error: errors.PushWorkerError | None = None
) -> None:
    def publish(job_id: str, registry_id: int) -> bool:
        with session_scope() as session:
            job = session.get(PushJob, job_id)
            assert job is not None
            job.status = status
            payload = error.to_payload() if error else {"digest": "sha256:" + "0" * 64}
            job.error_code = error.code if error else None
            job.error_message = error.message if error else None
            events.append(session, stream=events.job_stream(job_id), type=f"job.{status}",
                          actor="test", job_id=job_id, registry_id=registry_id,
                          payload=payload)  # fmt: skip
        return True

    dispatched.then = publish


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        ("succeeded", None, 0),
        ("failed", errors.AuthenticationError("refused", hint="set it"), 7),
        ("failed", errors.SourceImageNotFound("no image"), 3),
    ],
)
def test_push_wait_exits_with_the_jobs_outcome(
    runner: CliRunner,
    dispatched: RecordingDispatcher,
    status: str,
    error: errors.PushWorkerError | None,
    code: int,
) -> None:
    add_harbor(runner, "--password-stdin", input=f"{PASSWORD}\n")
    _finish_jobs_as(dispatched, status, error)
    push = ("push", "app:1", "--registry", "1", "--repository", "team/app", "--tag", "1")
    result = run(runner, *push, "--wait", "--timeout", "10", "--json", code=code)
    shown = json.loads(result.stdout)
    assert shown["job"]["id"] == shown["job_id"]
    assert [e["type"] for e in shown["events"]] == ["job.enqueued", f"job.{status}"]
    plain = run(runner, *push[:-1], "2", "--wait", code=code)
    assert f"job.{status}" in plain.stdout
    if error:
        assert error.message in plain.stderr


def test_wait_times_out_and_a_queued_job_cannot_be_retried(
    runner: CliRunner, dispatched: RecordingDispatcher
) -> None:
    add_harbor(runner, "--password-stdin", input=f"{PASSWORD}\n")  # nobody runs the job
    push = ("push", "app:1", "--registry", "1", "--repository", "team/app", "--tag", "1")
    result = run(runner, *push, "--wait", "--timeout", "0.5", code=124)
    assert "still queued" in result.stderr
    job_id = json.loads(run(runner, "jobs", "list", "--json").stdout)[0]["id"]
    refused = run(runner, "jobs", "retry", job_id, "--reason", "test", code=5)
    assert "only failed or cancelled jobs can be retried" in refused.stderr
    run(runner, "jobs", "cancel", job_id, "--reason", "test")
    retried = run(runner, "jobs", "retry", "--status", "cancelled", "--reason", "again")
    assert f"✓ job {job_id} queued again as attempt 2" in retried.stdout
