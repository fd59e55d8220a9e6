"""``pushctl push --from SPEC``: a job with a source other than the Docker Engine, or a
specific refusal (exit 2, no traceback, no job) for a spec that can never work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from tests.support.fakes import RecordingDispatcher
from worker.cli import cli
from worker.core.settings import get_settings
from worker.store.db import session_scope
from worker.store.models import PushJob

DIGEST = "sha256:" + "c" * 64


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("PUSHWORKER_LOG_FORMAT", "json")
    (tmp_path / "sources").mkdir()
    monkeypatch.setenv("PUSHWORKER_SOURCES_DIR", str(tmp_path / "sources"))
    get_settings.cache_clear()
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
    for rid, host in ((3, "origin.example.com"), (5, "reg.example.com")):
        added = runner.invoke(
            cli,
            ["registry", "add", f"r{rid}", f"https://{host}", "--username", "u",
             "--password-stdin", "--id", str(rid), "--no-test"],
            input="pw\n",
        )  # fmt: skip
        assert added.exit_code == 0, added.output
    yield runner
    get_settings.cache_clear()


def push(runner: CliRunner, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        cli, ["push", *args, "--registry", "5", "--repository", "team/app", "--tag", "1"]
    )
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def test_push_from_a_registry_queues_a_promotion(
    runner: CliRunner, dispatched: RecordingDispatcher
) -> None:
    code, output = push(runner, "--from", f"registry:3/team/app@{DIGEST}")
    assert code == 0, output
    job_id = output.strip()
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None
        assert (job.source_kind, job.source_registry_id, job.source_image) == (
            "registry", 3, f"registry:3/team/app@{DIGEST}",
        )  # fmt: skip
    assert dispatched.chains == [(job_id, 5)]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("app:1", "--from", "oci-layout:app"), "not both"),
        ((), "not both"),
        (("--from", "app:1"), "does not start with a kind"),
        (("--from", "oci-layout:../../etc"), "outside the sources directory"),
        (("--from", "registry:7/team/app:1"), "registry 7"),
        (("--from", "oci-layout:a\x1b[2Jb"), "control character (U+001B"),
        (("--from", "oci-layout:a\u202eb"), "control or invisible character (U+202E"),
    ],
)
def test_push_from_refuses_clearly(
    runner: CliRunner, dispatched: RecordingDispatcher, args: tuple[str, ...], words: str
) -> None:
    code, output = push(runner, *args)
    assert code in (2, 3), output
    assert words in output and "Traceback" not in output
    assert dispatched.chains == []
    with session_scope() as session:
        assert session.query(PushJob).count() == 0
