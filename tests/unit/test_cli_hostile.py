"""pushctl with hostile arguments and hostile stored rows, on SQLite and PostgreSQL.

- Every command that takes an id, a number or free text is run with each hostile value (ids
  beyond 32 and 64 bits, NUL, ESC, C1 controls, lone surrogates, empty and very long text,
  "nan"): the answer is a clear message and a documented exit code, never a traceback, and no
  raw control character reaches the terminal.
- Rows that hold escape sequences (written before they were refused at the entry points) are
  printed by every renderer, human and machine, with their control characters escaped.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from tests.support.fakes import RecordingDispatcher
from worker import producer
from worker.cli import cli
from worker.cli import jobs as cli_jobs
from worker.core.settings import get_settings
from worker.registries import RegistrySpec, create_registry
from worker.store import events
from worker.store.db import session_scope
from worker.store.models import PushJob

#: The exit codes pushctl documents (common.EPILOG), minus 1: an internal error is a bug here.
DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9, 10}
#: What must never reach a terminal raw: C0 controls but newline and tab, DEL, C1 controls.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
ESC_SCREEN = "x\x1b[2J\x1b]0;owned\x07y"

HOSTILE_VALUES = {
    "2^63": "9223372036854775808",
    "2^31": "2147483648",
    "2^64-neg": "-18446744073709551616",
    "zero": "0",
    "float": "1e3",
    "nan": "nan",
    "inf": "inf",
    "superscript-digit": "²",
    "nul": "x\x00y",
    "esc": ESC_SCREEN,
    "c1-csi": "a\x9b2Jb",
    "newline": "a\nb",
    "surrogate": "a\udcffb",
    "empty": "",
    "long": "r" * 20_000,
}

V = "{V}"
#: Every option and argument of the commands this module's CLI owns that takes a value.
COMMANDS = [
    ["push", "img", "--registry", V, "--repository", "a", "--tag", "b"],
    ["push", V, "--registry", "5", "--repository", "team/app", "--tag", "b"],
    ["push", "img", "--registry", "5", "--repository", V, "--tag", "b"],
    ["push", "img", "--registry", "5", "--repository", "team/app", "--tag", V],
    ["push", "img", "--registry", "5", "--repository", "a", "--tag", "b", "--fallback", V],
    ["push", "img", "--registry", "5", "--repository", "a", "--tag", "b", "--idempotency-key", V],
    ["push", "img", "--registry", "5", "--repository", "a", "--tag", "b", "--requested-by", V],
    ["push", "img", "--registry", "5", "--repository", "a", "--tag", "b", "--docker-host", V],
    ["jobs", "list", "--registry", V],
    ["jobs", "list", "--limit", V],
    ["jobs", "show", V],
    ["jobs", "retry", V, "--reason", "r"],
    ["jobs", "retry", "--registry", V, "--reason", "r"],
    ["jobs", "retry", "--status", "failed", "--limit", V, "--reason", "r"],
    ["jobs", "retry", "--status", "failed", "--reason", V],
    ["jobs", "retry", "--status", "failed", "--reason", "r", "--actor", V],
    ["jobs", "cancel", V],
    ["jobs", "cancel", "{JOB}", "--reason", V],
    ["jobs", "cancel", "{JOB}", "--actor", V],
    ["events", "--job", V],
    ["events", "--registry", V],
    ["events", "--repository", V],
    ["events", "--type", V],
    ["events", "--actor", V],
    ["events", "--since", V],
    ["events", "--until", V],
    ["events", "--limit", V],
    ["events", "export", "--job", V],
    ["events", "export", "--registry", V],
    ["events", "verify", "--anchor", V],
    ["events", "prune", "--older-than", V, "--discard"],
    ["events", "prune", "--older-than", "1", "--discard", "--actor", V],
]  # fmt: skip


@pytest.fixture
def runner(database_url: str, dispatched: RecordingDispatcher) -> Iterator[CliRunner]:
    """A migrated database with registry 5 and one queued job; a broker that is a no-op."""
    with session_scope() as session:
        spec = RegistrySpec(name="r5", url="https://r5.example.com", username="u", secret="pw")
        create_registry(session, spec, registry_id=5)
    yield CliRunner()


def queued_job() -> str:
    return producer.enqueue_push(
        source_image="img", registry_id=5, repository="team/app", tag=f"t{uuid.uuid4().hex[:8]}",
        requested_by="platform:test",
    )  # fmt: skip


def assert_clean(result: Result, what: object) -> None:
    """A documented exit code, no traceback, no raw control character on stdout or stderr."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        what,
        repr(result.exception),
    )
    assert result.exit_code in DOCUMENTED, (what, result.exit_code, result.output[-500:])
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, what
        found = RAW_CONTROL.search(stream)
        assert found is None, (what, stream[max(0, found.start() - 80) : found.end() + 80])


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c).replace(V, "V")[:70])
def test_hostile_arguments_get_a_clear_error_never_a_traceback(
    runner: CliRunner, command: list[str]
) -> None:
    """Each hostile value in each position: a documented exit code and a message, on both
    databases (PostgreSQL refuses NUL and ids beyond 32 bits with its own errors; SQLite's
    driver raises OverflowError beyond 64 bits)."""
    job = queued_job()
    for name, value in HOSTILE_VALUES.items():
        args = [value if part == V else job if part == "{JOB}" else part for part in command]
        result = runner.invoke(cli, args)
        assert_clean(result, (name, command))
        if name in ("nul", "esc", "c1-csi", "newline", "surrogate"):
            # Text that can never be valid anywhere: refused, never stored or looked up.
            assert result.exit_code != 0, (name, command)


def test_hostile_values_are_refused_as_usage_errors_with_the_option_named(
    runner: CliRunner,
) -> None:
    """The three of issue 13 (11, 12): a 64-bit id, a NUL and an escape sequence."""
    huge = runner.invoke(cli, ["jobs", "list", "--registry", "9223372036854775808"])
    assert huge.exit_code == 2 and "--registry" in huge.stderr
    nul = runner.invoke(cli, ["events", "--repository", "a\x00b"])
    assert nul.exit_code == 2 and "--repository" in nul.stderr and "U+0000" in nul.stderr
    escape = runner.invoke(cli, ["jobs", "cancel", queued_job(), "--reason", ESC_SCREEN])
    assert escape.exit_code == 2 and "U+001B" in escape.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e400", "x", "1e12"])
def test_wait_timeouts_that_are_not_a_number_of_seconds_are_usage_errors(
    runner: CliRunner, value: str
) -> None:
    """(Not in the corpus above: a valid timeout would wait for a job no worker runs.)"""
    args = ["push", "img", "--registry", "5", "--repository", "a", "--tag", "b", "--wait"]
    result = runner.invoke(cli, [*args, "--timeout", value])
    assert result.exit_code == 2 and "--timeout" in result.stderr, result.output
    assert_clean(result, value)


def store_hostile_rows() -> str:
    """A job and events holding escape sequences, as rows written before the entry points
    refused them (the job row bypasses the producer API; appends store any text but NUL)."""
    with session_scope() as session:
        job = PushJob(
            source_image=f"img{ESC_SCREEN}", repository="team/app", tag="1",
            requested_registry_id=5,
            effective_registry_id=5, fallback_chain=[], status="failed",
            requested_by=f"platform:{ESC_SCREEN}", error_code="registry_error",
            error_message=f"the registry said {ESC_SCREEN}\x9b31m",
        )  # fmt: skip
        session.add(job)
        session.flush()
        events.append(
            session, stream=events.job_stream(job.id), type="job.failed",
            actor=f"producer:{ESC_SCREEN}", job_id=job.id, registry_id=5,
            payload={"error_code": "registry_error", "error_message": f"said {ESC_SCREEN}",
                     "reason": "\x7f\x1b[1m", "requested_by": ESC_SCREEN},
        )  # fmt: skip
        return job.id


@pytest.mark.parametrize(
    "command",
    [
        ["events"], ["events", "--json"], ["events", "--jsonl"], ["events", "export"],
        ["events", "export", "--format", "csv"], ["events", "verify"], ["jobs", "list"],
        ["jobs", "list", "--json"], ["jobs", "show", "{JOB}"], ["jobs", "show", "{JOB}", "--json"],
        ["jobs", "retry", "{JOB}", "--reason", "again"],
    ],
    ids=" ".join,
)  # fmt: skip
def test_stored_escape_sequences_are_printed_escaped(runner: CliRunner, command: list[str]) -> None:
    """No ESC, BEL, DEL or C1 byte of a stored row reaches stdout: each renderer escapes them
    (``\\x1b``, or JSON's ``\\u001b``), so the row is shown, not acted on by the terminal."""
    job = store_hostile_rows()
    result = runner.invoke(cli, [job if part == "{JOB}" else part for part in command])
    assert result.exit_code == 0, result.output
    assert_clean(result, command)
    if command[1:2] in (["retry"], ["verify"]):
        return  # they print no stored text
    assert "\\x1b" in result.stdout or "\\u001b" in result.stdout, result.stdout[-800:]


def test_db_upgrade_with_the_database_down_is_a_clear_storage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alembic connects by itself; a database that does not answer is exit 10, not a trace."""
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", "postgresql+psycopg://pw@127.0.0.1:1/pw")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 10, result.output
    assert result.stderr.startswith("error: the database does not answer")
    assert_clean(result, "db upgrade")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DataError("INSERT ...", {"v": "hunter2"}, Exception("invalid byte hunter2")), 2),
        (IntegrityError("INSERT ...", {"v": "hunter2"}, Exception("duplicate hunter2")), 10),
        (OperationalError("SELECT", {"v": "hunter2"}, Exception("disk I/O error hunter2")), 10),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), 2),
    ],
    ids=["DataError", "IntegrityError", "OperationalError", "OverflowError"],
)
def test_leftover_database_errors_become_a_message_without_the_drivers_text(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    """A database error no seam translated: a clear message and a documented exit code; the
    driver's text (which quotes the statement's parameters) is never printed."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise error

    monkeypatch.setattr(cli_jobs, "list_jobs", refuse)
    result = CliRunner().invoke(cli, ["jobs", "list"])
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and "hunter2" not in result.output
    assert_clean(result, type(error).__name__)
