"""``pushctl``: the operator's command line for registries, pushes, jobs and the event log.

Commands are thin: they parse, call the library, and print (rich tables for people, ``--json``
for programs). Library errors are ``PushWorkerError``s; ``_Pushctl.invoke`` turns every one of
them into ``error:``/``hint:`` lines on stderr and the error's exit code, in one place.
Secrets are read from stdin or a hidden prompt only, and never printed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import OperationalError, ProgrammingError
from urllib3.exceptions import InsecureRequestWarning

from worker import client, events, migrate
from worker.config import get_settings, mask_url_password
from worker.connection_test import ConnectionReport, check_registry, record_test
from worker.credentials import new_key
from worker.db import session_scope
from worker.errors import PushWorkerError, StorageError, ValidationError
from worker.jobs import cancel_job, get_job, list_jobs, retry_job
from worker.logs import configure_logging
from worker.models import CredentialKind, Event, JobStatus, PushJob, Registry, RegistryKind
from worker.registries import (
    RegistrySpec,
    create_registry,
    get_registry,
    list_registries,
    remove_registry,
    update_registry,
)

F = TypeVar("F", bound=Callable[..., Any])

WAIT_TIMEOUT_EXIT = 124
INTERRUPTED_EXIT = 130  # the shell's own code for Ctrl-C
POLL_SECONDS = 0.3

EPILOG = """\b
Exit codes:
  0    ok
  1    internal error
  2    invalid input (also command-line usage errors)
  3    not found
  4    credential unavailable
  5    invalid state (e.g. retrying a running job)
  6    registry refused
  7    authentication failed
  8    registry unreachable, or TLS failed
  9    Docker Engine error
  10   storage (database) error
  124  --wait timed out (the job goes on)
  130  --wait interrupted (the job goes on)
"""


# --- pure helpers (unit-tested) -------------------------------------------------------------------


def error_exit_codes() -> dict[str, int]:
    """``{error code: exit code}`` over the whole ``PushWorkerError`` tree."""
    codes: dict[str, int] = {}
    pending: list[type[PushWorkerError]] = [PushWorkerError]
    while pending:
        cls = pending.pop()
        codes[cls.code] = cls.exit_code
        pending.extend(cls.__subclasses__())
    return codes


def exit_code_for(error_code: str | None) -> int:
    """The exit code for an error code recorded in a job or a report; 1 when unknown."""
    return error_exit_codes().get(error_code or "", PushWorkerError.exit_code)


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``1d``, ``1h30m`` (that long ago) or an ISO 8601 time -> aware UTC."""
    value = text.strip().lower()
    if value and _DURATION.sub("", value) == "":
        seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(value))
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 2h, 1d, 1h30m) nor an ISO 8601 time"
        ) from None
    # A time without a zone is taken as UTC: the event log's own zone.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_fallback(text: str) -> list[int]:
    """``4,7`` -> ``[4, 7]``; an empty string is the empty chain (clears it on update)."""
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if not all(item.isdigit() for item in items):
        raise ValueError(f"{text!r} is not a comma-separated list of registry ids, e.g. 4,7")
    return [int(item) for item in items]


def human_bytes(count: object) -> str:
    if not isinstance(count, int | float):
        return "?"
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def summarize(event_type: str, payload: dict[str, Any]) -> str:
    """One short line about an event's payload, for timelines and ``push --wait``."""
    if event_type == "step.progress":
        done, total = (
            human_bytes(payload.get("bytes_pushed")),
            human_bytes(payload.get("bytes_total")),
        )
        return (
            f"{done} / {total}, layers {payload.get('layers_done')}/{payload.get('layers_total')}"
        )
    if event_type == "fallback.applied":
        moved = f"registry {payload.get('from_registry_id')} -> {payload.get('to_registry_id')}"
        return f"{moved}: {payload.get('reason', '')}"
    if event_type == "registry.tested":
        return _summarize_test(payload)
    parts: list[str] = []
    if payload.get("error_message"):
        parts.append(f"{payload.get('error_code', 'error')}: {payload['error_message']}")
    if payload.get("hint"):
        parts.append(f"hint: {payload['hint']}")
    if payload.get("will_retry"):
        parts.append(f"retry in {payload.get('retry_in')} s")
    for key in ("reason", "reference", "digest", "credential_source", "username"):
        if payload.get(key):
            parts.append(f"{key}: {payload[key]}")
    if payload.get("previous_status"):
        parts.append(f"was {payload['previous_status']}")
    return "; ".join(parts)


def _summarize_test(payload: dict[str, Any]) -> str:
    if payload.get("ok"):
        return "all checks passed"
    checks = payload.get("checks") or []
    failed = next((c for c in checks if not c.get("ok") and not c.get("skipped")), None)
    return f"failed at {failed.get('name')}: {failed.get('detail')}" if failed else "failed"


# --- click parameter types ------------------------------------------------------------------------


class SinceType(click.ParamType[datetime]):
    name = "2h|30m|1d|ISO8601"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_since(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class FallbackType(click.ParamType[list[int]]):
    name = "ID,ID"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> list[int]:
        if isinstance(value, list):
            return [int(item) for item in value]
        try:
            return parse_fallback(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SINCE = SinceType()
FALLBACK = FallbackType()


# --- output ---------------------------------------------------------------------------------------


def _out() -> Console:
    # Made per call: click's test runner swaps sys.stdout between invocations. Into a pipe or a
    # file, tables get room instead of rich's default 80 columns, so grep sees whole cells.
    wide = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 240
    return Console(highlight=False, width=wide)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _table(columns: Sequence[str], rows: Iterable[Sequence[object]], title: str = "") -> Table:
    table = Table(*columns, title=title or None, title_justify="left")
    for row in rows:
        # Text, not str: rich would read "[...]" in a registry's words as markup.
        table.add_row(*(Text("-" if cell is None else str(cell)) for cell in row))
    return table


def _key_values(data: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        table.add_row(Text(key, style="bold"), Text("-" if value in (None, "") else str(value)))
    return table


def _fail(message: str, code: int) -> NoReturn:
    click.echo(message, err=True)
    raise click.exceptions.Exit(code)


# --- the top-level group --------------------------------------------------------------------------


class _Pushctl(click.Group):
    """The group whose ``invoke`` is the one place library errors become exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PushWorkerError as exc:
            _report_error(exc)
        except (OperationalError, ProgrammingError) as exc:
            if not _schema_missing(exc):
                raise
            _report_error(
                StorageError(
                    "the database has no pushworker tables", hint="run `pushctl db upgrade`"
                )
            )


def _report_error(exc: PushWorkerError) -> NoReturn:
    click.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)
    raise click.exceptions.Exit(exc.exit_code)


def _schema_missing(exc: Exception) -> bool:
    text = str(exc).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


@click.group(
    name="pushctl",
    cls=_Pushctl,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="pushworker")
def cli() -> None:
    """Push Docker images to explicitly named registries, and read what happened.

    \b
    Example:
      pushctl registry add harbor https://harbor.example.com --username ci --password-stdin < pw
    """
    configure_logging(get_settings().log_format)  # logs go to stderr; stdout is the output
    # A registry marked insecure is reported as such by `registry test`; one warning per request
    # from urllib3 on top of that only buries the output.
    warnings.filterwarnings("ignore", category=InsecureRequestWarning)


def main() -> None:
    """The ``pushctl`` console script."""
    cli(prog_name="pushctl")


# --- db and config --------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The database schema.

    \b
    Example:
      pushctl db upgrade
    """


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision.

    \b
    Example:
      PUSHWORKER_DATABASE_URL=postgresql+psycopg://pw@db/pw pushctl db upgrade
    """
    migrate.upgrade()
    url = mask_url_password(get_settings().database_url)
    click.echo(f"database {url} is at revision {migrate.current()}")


@cli.group("config", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    """Show the settings (secrets masked).

    \b
    Example:
      pushctl config --json
    """
    if ctx.invoked_subcommand is not None:
        return
    shown = get_settings().masked()
    if as_json:
        _echo_json(shown)
    else:
        _out().print(_table(("setting", "value"), shown.items()))


@config.command("new-key")
def config_new_key() -> None:
    """Print a new Fernet key for PUSHWORKER_SECRET_KEY.

    \b
    Example:
      export PUSHWORKER_SECRET_KEY="$(pushctl config new-key)"
    """
    click.echo(new_key())


# --- registries -----------------------------------------------------------------------------------


@cli.group()
def registry() -> None:
    """Registries: add, change, test, remove.

    \b
    Example:
      pushctl registry list
    """


@dataclass(frozen=True)
class RegistryOptions:
    """The options ``registry add`` and ``registry update`` share."""

    kind: str | None = None
    username: str | None = None
    password_stdin: bool = False
    credential_ref: str | None = None
    ca_file: Path | None = None
    insecure: bool | None = None
    anonymous: bool | None = None
    fallback: list[int] | None = None
    no_test: bool = False
    as_json: bool = False
    timeout: float | None = None

    def spec(self, secret: str | None, **fields: Any) -> RegistrySpec:
        anonymous = self.anonymous
        return RegistrySpec(
            kind=self.kind,
            username=self.username,
            secret=secret,
            credential_ref=self.credential_ref,
            ca_cert=self.ca_file.read_text() if self.ca_file else None,
            insecure=self.insecure,
            auth_required=None if anonymous is None else not anonymous,
            fallback_chain=self.fallback,
            **fields,
        )


_KINDS = click.Choice([kind.value for kind in RegistryKind])
_PASSWORD_STDIN = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
_CREDENTIAL_REF = click.option(
    "--credential-ref",
    metavar="env:NAME|file:PATH",
    help="Read the password from the worker's environment or a file, when used.",
)
_NO_TEST = click.option("--no-test", is_flag=True, help="Do not run the connection test.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
_TEST_TIMEOUT = click.option(
    "--timeout", type=float, help="Seconds per connection-test request [PUSHWORKER_HTTP_TIMEOUT]."
)


def _registry_options(func: F) -> F:
    options = [
        click.option("--kind", type=_KINDS, help="Registry kind [add: generic]."),
        click.option("--username", help="User (or robot account) to push as."),
        _PASSWORD_STDIN,
        _CREDENTIAL_REF,
        click.option(
            "--ca-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="PEM bundle of the CA that signed the registry's certificate.",
        ),
        click.option(
            "--insecure/--verify-tls",
            default=None,
            help="Allow http:// or skip TLS verification (explicitly unsafe).",
        ),
        click.option(
            "--anonymous/--auth-required",
            default=None,
            help="The registry takes pushes without credentials.",
        ),
        click.option("--fallback", type=FALLBACK, help="Registry ids to fall back to, in order."),
        _NO_TEST,
        _JSON,
        _TEST_TIMEOUT,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _stdin_is_tty() -> bool:
    # sys.stdin, read when called: click's test runner replaces it (get_text_stream is deprecated).
    return sys.stdin.isatty()


def _read_secret(
    password_stdin: bool, credential_ref: str | None, prompt: str | None
) -> str | None:
    """The password from stdin or a hidden prompt; None when a reference (or nothing) is given."""
    if password_stdin and credential_ref is not None:
        raise click.UsageError("give --password-stdin or --credential-ref, not both")
    if password_stdin:
        # One line, so `echo pw | pushctl ...` and a password file without newline both work.
        secret = sys.stdin.readline().rstrip("\r\n")
        if not secret:
            raise ValidationError(
                "the password read from stdin is empty",
                hint="pipe the password in, e.g. `--password-stdin < password-file`",
            )
        return secret
    if credential_ref is None and prompt is not None and _stdin_is_tty():
        # On stderr, like every prompt here: stdout stays clean for --json.
        return click.prompt(prompt, hide_input=True, err=True)
    return None


def _require_credential(name: str, options: RegistryOptions) -> None:
    """Refuse, before anything is stored, a new registry that could not authenticate."""
    given = options.username or options.password_stdin or options.credential_ref
    if options.anonymous:
        if given:
            raise click.UsageError("--anonymous takes no --username or password")
        return
    hint = "or pass --anonymous if the registry takes pushes without credentials"
    if not options.username:
        raise ValidationError(
            f"registry {name!r} needs a username", hint=f"give --username, {hint}"
        )
    if not (options.password_stdin or options.credential_ref or _stdin_is_tty()):
        raise ValidationError(
            f"registry {name!r} needs a password",
            hint="give --password-stdin (password on stdin), --credential-ref env:NAME|file:PATH, "
            f"or run on a terminal to be prompted; {hint}",
        )


def credential_label(registry: Registry) -> str:
    """How the registry authenticates, as may be shown: references yes, secrets never."""
    if not registry.auth_required:
        return "anonymous"
    if registry.credential_kind == CredentialKind.SECRET:
        return "secret"
    if registry.credential_kind in (CredentialKind.ENV, CredentialKind.FILE):
        return f"{registry.credential_kind}:{registry.credential_ref}"
    return "none"


def registry_fields(registry: Registry) -> dict[str, Any]:
    return {
        "id": registry.id,
        "name": registry.name,
        "url": registry.url,
        "host": registry.host,
        "kind": registry.kind,
        "username": registry.username,
        "credential": credential_label(registry),
        "ca_cert": "set" if registry.ca_cert else None,
        "insecure": registry.insecure,
        "fallback_chain": list(registry.fallback_chain or []),
        "created_at": _iso(registry.created_at),
        "updated_at": _iso(registry.updated_at),
        "removed_at": _iso(registry.removed_at),
    }


def _test_and_record(registry_id: int, timeout: float | None) -> ConnectionReport:
    with session_scope() as session:
        registry = get_registry(session, registry_id)
    # The network part runs outside any transaction: SQLite's write lock is not held meanwhile.
    report = check_registry(registry, timeout=timeout or get_settings().http_timeout)
    with session_scope() as session:
        record_test(session, registry_id, report, events.operator_actor())
    return report


def _print_report(report: ConnectionReport) -> None:
    console = _out()
    for check in report.checks:
        mark = ("-", "dim") if check.skipped else ("✓", "green") if check.ok else ("✗", "red")
        latency = f"{check.latency_ms:.1f} ms" if check.latency_ms is not None else "-"
        console.print(
            Text.assemble(mark, f" {check.name:<12}{latency:>10}  ", check.detail), soft_wrap=True
        )
        if check.fix:
            console.print(Text(f"  fix: {check.fix}", style="yellow"), soft_wrap=True)


def _after_save(verb: str, shown: dict[str, Any], options: RegistryOptions) -> None:
    """Print the saved registry, then test it unless told not to; a failed test exits non-zero."""
    report = None if options.no_test else _test_and_record(shown["id"], options.timeout)
    if options.as_json:
        _echo_json({"registry": shown, "test": report.to_dict() if report else None})
    else:
        click.echo(f"registry {shown['id']} ({shown['name']}) {verb}: {shown['url']}")
        if report:
            _print_report(report)
    if report and not report.ok:
        _fail(
            f"registry {shown['id']} is saved, but its connection test failed; "
            f"fix it, then run `pushctl registry test {shown['id']}`",
            exit_code_for(report.error_code),
        )


@registry.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--id", "registry_id", type=int, help="Use this id (default: the next free one).")
@_registry_options
def registry_add(name: str, url: str, registry_id: int | None, **raw: Any) -> None:
    """Add a registry, then test the connection to it.

    The password is read from stdin (--password-stdin), from a hidden prompt on a terminal, or
    at push time from a reference (--credential-ref). It is never printed.

    \b
    Example:
      pushctl registry add harbor https://harbor.example.com --username ci --password-stdin < pw
    """
    options = RegistryOptions(**raw)
    _require_credential(name, options)
    prompt = f"Password for {options.username} at {url}" if not options.anonymous else None
    secret = _read_secret(options.password_stdin, options.credential_ref, prompt)
    spec = replace(
        options.spec(secret, name=name, url=url),
        kind=options.kind or RegistryKind.GENERIC.value,
        insecure=bool(options.insecure),
        auth_required=not options.anonymous,
    )
    with session_scope() as session:
        shown = registry_fields(create_registry(session, spec, registry_id=registry_id))
    _after_save("created", shown, options)


@registry.command("update")
@click.argument("registry_id", metavar="ID", type=int)
@click.option("--name", help="New name.")
@click.option("--url", help="New URL (scheme://host[:port]).")
@_registry_options
def registry_update(registry_id: int, name: str | None, url: str | None, **raw: Any) -> None:
    """Change a registry, then test the connection to it.

    \b
    Example:
      pushctl registry update 3 --ca-file /etc/ssl/harbor-ca.pem
    """
    options = RegistryOptions(**raw)
    secret = _read_secret(options.password_stdin, options.credential_ref, prompt=None)
    spec = options.spec(secret, name=name, url=url)
    with session_scope() as session:
        shown = registry_fields(update_registry(session, registry_id, spec))
    _after_save("updated", shown, options)


@registry.command("set-credential")
@click.argument("registry_id", metavar="ID", type=int)
@click.option("--username", help="New user; the stored one is kept when not given.")
@_PASSWORD_STDIN
@_CREDENTIAL_REF
@_NO_TEST
@_JSON
@_TEST_TIMEOUT
def registry_set_credential(
    registry_id: int,
    username: str | None,
    password_stdin: bool,
    credential_ref: str | None,
    **raw: Any,
) -> None:
    """Replace a registry's password (or reference), then test it.

    \b
    Example:
      pushctl registry set-credential 3 --password-stdin < new-password
    """
    if not (password_stdin or credential_ref or _stdin_is_tty()):
        raise click.UsageError("give --password-stdin or --credential-ref env:NAME|file:PATH")
    options = RegistryOptions(username=username, credential_ref=credential_ref, **raw)
    secret = _read_secret(
        password_stdin, credential_ref, f"New password for registry {registry_id}"
    )
    spec = RegistrySpec(
        username=username, secret=secret, credential_ref=credential_ref, auth_required=True
    )
    with session_scope() as session:
        shown = registry_fields(update_registry(session, registry_id, spec))
    _after_save("credential set", shown, options)


@registry.command("test")
@click.argument("registry_id", metavar="ID", type=int)
@_JSON
@_TEST_TIMEOUT
def registry_test(registry_id: int, as_json: bool, timeout: float | None) -> None:
    """Test the connection: dns, tcp, tls, /v2/, credentials. Exit 0 only if all pass.

    \b
    Example:
      pushctl registry test 3
    """
    report = _test_and_record(registry_id, timeout)
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_report(report)
    if not report.ok:
        raise click.exceptions.Exit(exit_code_for(report.error_code))


@registry.command("list")
@click.option("--all", "include_removed", is_flag=True, help="Include removed registries.")
@_JSON
def registry_list(include_removed: bool, as_json: bool) -> None:
    """List registries.

    \b
    Example:
      pushctl registry list --json
    """
    with session_scope() as session:
        rows = [
            registry_fields(r) for r in list_registries(session, include_removed=include_removed)
        ]
    if as_json:
        _echo_json(rows)
        return
    columns = ["id", "name", "url", "kind", "username", "credential", "ca", "fallback"]
    columns += ["removed_at"] if include_removed else []
    _out().print(_table(columns, (_registry_row(r, include_removed) for r in rows)))


def _registry_row(shown: dict[str, Any], with_removed: bool) -> list[object]:
    keys = ("id", "name", "url", "kind", "username", "credential", "ca_cert")
    row: list[object] = [*(shown[key] for key in keys), _ids(shown["fallback_chain"])]
    return [*row, shown["removed_at"]] if with_removed else row


def _ids(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) or "-"


@registry.command("show")
@click.argument("registry_id", metavar="ID", type=int)
@_JSON
def registry_show(registry_id: int, as_json: bool) -> None:
    """Show a registry and its last connection test.

    \b
    Example:
      pushctl registry show 3
    """
    with session_scope() as session:
        shown = registry_fields(get_registry(session, registry_id, include_removed=True))
        stream = events.registry_stream(registry_id)
        tests = events.select_events(session, stream=stream, types=["registry.tested"])
        last = events.event_fields(tests[-1]) if tests else None
    if as_json:
        _echo_json({**shown, "last_test": last})
        return
    console = _out()
    console.print(_key_values(shown))
    if last is None:
        console.print(f"never tested; run `pushctl registry test {registry_id}`")
        return
    console.print(Text(f"last test {last['time']} by {last['actor']}: "), end="")
    console.print(Text(_summarize_test(last["payload"])), soft_wrap=True)


@registry.command("remove")
@click.argument("registry_id", metavar="ID", type=int)
def registry_remove(registry_id: int) -> None:
    """Remove a registry: no new pushes to it; its jobs and events stay readable.

    \b
    Example:
      pushctl registry remove 3
    """
    with session_scope() as session:
        removed = remove_registry(session, registry_id)
        name = removed.name
    click.echo(
        f"registry {registry_id} ({name}) removed; `pushctl registry show {registry_id}` "
        "still shows it"
    )


# --- pushes ---------------------------------------------------------------------------------------


def job_fields(job: PushJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "source_image": job.source_image,
        "repository": job.repository,
        "tag": job.tag,
        "requested_registry_id": job.requested_registry_id,
        "effective_registry_id": job.effective_registry_id,
        "fallback_chain": list(job.fallback_chain or []),
        "current_step": job.current_step,
        "attempt": job.attempt,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "pushed_reference": job.pushed_reference,
        "digest": job.digest,
        "requested_by": job.requested_by,
        "idempotency_key": job.idempotency_key,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def event_line(row: Event) -> Text:
    """One timeline line: time, type, step, registry, summary."""
    where = f"registry {row.registry_id}" if row.registry_id is not None else ""
    return Text(
        f"{row.time:%H:%M:%S} {row.type:<17} {row.step or '-':<20} {where:<12} "
        f"{summarize(row.type, row.payload or {})}".rstrip()
    )


@dataclass
class _Follow:
    """What ``push --wait`` has seen so far."""

    job_id: str
    last_id: int = 0
    job: dict[str, Any] | None = None

    def poll(self) -> list[Event]:
        with session_scope() as session:
            rows = events.select_events(session, job_id=self.job_id, after_id=self.last_id)
            self.job = job_fields(get_job(session, self.job_id))
        if rows:
            self.last_id = rows[-1].id
        return rows

    @property
    def final(self) -> bool:
        return self.job is not None and JobStatus(self.job["status"]).is_final

    def state(self) -> str:
        job = self.job or {}
        step = f", step {job['current_step']}" if job.get("current_step") else ""
        return f"job {self.job_id}: {job.get('status', 'queued')}{step}"


def _follow(
    follow: _Follow,
    timeout: float | None,
    show: Callable[[Event], None],
    on_state: Callable[[str], None],
) -> bool:
    """Poll until the job is final (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        for row in follow.poll():
            show(row)
        on_state(follow.state())
        if follow.final:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def _wait_for(job_id: str, timeout: float | None, as_json: bool) -> None:
    follow = _Follow(job_id)
    seen: list[dict[str, Any]] = []
    console = _out()
    try:
        if as_json:
            finished = _follow(
                follow, timeout, lambda r: seen.append(events.event_fields(r)), lambda _s: None
            )
        elif console.is_terminal:
            with console.status(follow.state()) as status:
                finished = _follow(
                    follow,
                    timeout,
                    lambda r: console.print(event_line(r)),
                    lambda s: status.update(Text(s)),
                )
        else:
            finished = _follow(
                follow, timeout, lambda r: click.echo(event_line(r).plain), lambda _s: None
            )
    except KeyboardInterrupt:
        _fail(f"stopped following; the job goes on: `pushctl jobs show {job_id}`", INTERRUPTED_EXIT)
    if as_json:
        # "job_id" first, as without --wait, so scripts read the id the same way either way.
        _echo_json({"job_id": job_id, "job": follow.job, "events": seen})
    _finish_wait(follow, finished, timeout)


def _finish_wait(follow: _Follow, finished: bool, timeout: float | None) -> None:
    job = follow.job or {}
    if not finished:
        _fail(
            f"job {follow.job_id} is still {job.get('status')} after {timeout:g} s; "
            f"follow it with `pushctl jobs show {follow.job_id}`",
            WAIT_TIMEOUT_EXIT,
        )
    if job.get("status") == JobStatus.SUCCEEDED:
        click.echo(
            f"job {follow.job_id} succeeded: {job.get('pushed_reference')}@{job.get('digest')}",
            err=True,
        )
        return
    message = job.get("error_message") or f"the job is {job.get('status')}"
    _fail(
        f"error: job {follow.job_id} {job.get('status')}: {message}",
        exit_code_for(job.get("error_code")),
    )


@cli.command("push")
@click.argument("source")
@click.option("--registry", "registry_id", type=int, required=True, help="Registry id to push to.")
@click.option("--repository", required=True, help="Repository path in the registry, e.g. team/app.")
@click.option("--tag", required=True, help="Tag to push.")
@click.option("--fallback", type=FALLBACK, help="Registry ids to try if credentials are refused.")
@click.option("--idempotency-key", help="The same key returns the first job instead of a new one.")
@click.option("--requested-by", help="Who asks [operator:$USER].")
@click.option("--wait", is_flag=True, help="Follow the job's events until it ends.")
@click.option("--timeout", type=float, help="With --wait: give up after SECONDS (exit 124).")
@_JSON
def push(
    source: str,
    registry_id: int,
    repository: str,
    tag: str,
    fallback: list[int] | None,
    idempotency_key: str | None,
    requested_by: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Queue a push of local image SOURCE to a registry; --wait follows it to the end.

    \b
    Example:
      pushctl push app:1.4 --registry 3 --repository team/app --tag 1.4 --wait --timeout 600
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait")
    job_id = client.enqueue_push(
        source_image=source,
        registry_id=registry_id,
        repository=repository,
        tag=tag,
        requested_by=requested_by or events.operator_actor(),
        fallback=fallback,
        idempotency_key=idempotency_key,
    )
    if not wait:
        if as_json:
            _echo_json({"job_id": job_id})
        else:
            click.echo(job_id)
        return
    if not as_json:
        click.echo(f"job {job_id} queued", err=True)
    _wait_for(job_id, timeout, as_json)


# --- jobs -----------------------------------------------------------------------------------------


@cli.group()
def jobs() -> None:
    """Push jobs: list, show, retry, cancel.

    \b
    Example:
      pushctl jobs list --status failed --since 2h
    """


_STATUSES = click.Choice([status.value for status in JobStatus])


def _job_row(job: dict[str, Any]) -> list[object]:
    requested, effective = job["requested_registry_id"], job["effective_registry_id"]
    registries = str(requested) if requested == effective else f"{requested}->{effective}"
    target = f"{job['source_image']} -> {job['repository']}:{job['tag']}"
    created = job["created_at"][:19].replace("T", " ")
    return [
        job["id"],
        job["status"],
        created,
        registries,
        target,
        job["current_step"],
        job["attempt"],
        job["error_code"],
    ]


@jobs.command("list")
@click.option("--status", type=_STATUSES, help="Only jobs in this status.")
@click.option("--registry", "registry_id", type=int, help="Only jobs requested for this registry.")
@click.option("--since", type=SINCE, help="Only jobs created since then.")
@click.option(
    "--limit", type=int, default=50, show_default=True, help="At most this many, newest first."
)
@_JSON
def jobs_list(
    status: str | None, registry_id: int | None, since: datetime | None, limit: int, as_json: bool
) -> None:
    """List jobs, newest first.

    \b
    Example:
      pushctl jobs list --status failed --registry 3 --since 2h
    """
    with session_scope() as session:
        rows = [
            job_fields(job)
            for job in list_jobs(
                session, status=status, registry_id=registry_id, since=since, limit=limit
            )
        ]
    if as_json:
        _echo_json(rows)
        return
    columns = ("id", "status", "created (UTC)", "registry", "image", "step", "try", "error")
    _out().print(_table(columns, (_job_row(job) for job in rows)))


@jobs.command("show")
@click.argument("job_id", metavar="JOB")
@_JSON
def jobs_show(job_id: str, as_json: bool) -> None:
    """Show a job and its event timeline.

    \b
    Example:
      pushctl jobs show 5f0c...
    """
    with session_scope() as session:
        job = job_fields(get_job(session, job_id))
        rows = events.select_events(session, job_id=job_id)
        timeline = [events.event_fields(row) for row in rows]
    if as_json:
        _echo_json({"job": job, "events": timeline})
        return
    console = _out()
    console.print(_key_values(job))
    console.print(_events_table(rows, with_job=False))


def _retry_one(job_id: str, reason: str, actor: str) -> str:
    with session_scope() as session:
        job = retry_job(session, job_id, actor=actor, reason=reason)
        registry_id, attempt = job.requested_registry_id, job.attempt
    # Published after the commit, so the worker finds the job queued (the producer's own order).
    published = client.publish(job_id, registry_id)
    note = "" if published else " (broker unreachable: the reconcile task will publish it)"
    return f"job {job_id} queued again as attempt {attempt} on registry {registry_id}{note}"


@jobs.command("retry")
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option("--status", type=_STATUSES, help="Bulk: jobs in this status [failed].")
@click.option("--registry", "registry_id", type=int, help="Bulk: jobs requested for this registry.")
@click.option("--since", type=SINCE, help="Bulk: jobs created since then.")
@click.option("--limit", type=int, default=100, show_default=True, help="Bulk: at most this many.")
@click.option("--reason", required=True, help="Why (recorded in the event log).")
@click.option("--actor", help="Who retries [operator:$USER].")
def jobs_retry(
    job_id: str | None,
    status: str | None,
    registry_id: int | None,
    since: datetime | None,
    limit: int,
    reason: str,
    actor: str | None,
) -> None:
    """Retry one failed or cancelled job, or every job a selection matches.

    Steps that already succeeded are skipped. Bulk selection defaults to --status failed.

    \b
    Example:
      pushctl jobs retry --registry 3 --since 2h --reason "password fixed"
    """
    bulk = status is not None or registry_id is not None or since is not None
    if job_id and bulk:
        raise click.UsageError(
            "name a JOB or select jobs with --status/--registry/--since, not both"
        )
    who = events.operator_actor(actor)
    if job_id:
        click.echo(_retry_one(job_id, reason, who))  # errors end the command via _Pushctl
        return
    if not bulk:
        raise click.UsageError(
            "name a JOB, or select jobs with --status, --registry and/or --since"
        )
    with session_scope() as session:
        selected = [
            job.id
            for job in list_jobs(
                session,
                status=status or JobStatus.FAILED.value,
                registry_id=registry_id,
                since=since,
                limit=limit,
            )
        ]
    _retry_many(selected, reason, who)


def _retry_many(job_ids: list[str], reason: str, actor: str) -> None:
    """One line per job; a job that cannot be retried does not stop the others."""
    errors: list[PushWorkerError] = []
    for job_id in job_ids:
        try:
            click.echo(f"✓ {_retry_one(job_id, reason, actor)}")
        except PushWorkerError as exc:
            errors.append(exc)
            click.echo(f"✗ job {job_id}: {exc.message}", err=True)
    click.echo(f"{len(job_ids) - len(errors)} of {len(job_ids)} selected job(s) retried", err=True)
    if errors:
        raise click.exceptions.Exit(errors[0].exit_code)


@jobs.command("cancel")
@click.argument("job_id", metavar="JOB")
@click.option("--reason", help="Why (recorded in the event log).")
@click.option("--actor", help="Who cancels [operator:$USER].")
def jobs_cancel(job_id: str, reason: str | None, actor: str | None) -> None:
    """Cancel a queued or running job: steps not yet started are skipped.

    \b
    Example:
      pushctl jobs cancel 5f0c... --reason "wrong tag"
    """
    with session_scope() as session:
        job = cancel_job(session, job_id, actor=events.operator_actor(actor), reason=reason)
        status = job.status
    click.echo(f"job {job_id} {status}")


# --- the event log --------------------------------------------------------------------------------


def _events_table(rows: Sequence[Event], *, with_job: bool = True) -> Table:
    job = ["job"] if with_job else []
    columns = ["time (UTC)", "type", *job, "step", "registry", "try", "actor", "summary"]
    return _table(columns, (_event_row(row, with_job) for row in rows))


def _event_row(row: Event, with_job: bool) -> list[object]:
    job = [(row.job_id or "-")[:8]] if with_job else []
    summary = summarize(row.type, row.payload or {})
    return [_when(row.time), row.type, *job, row.step, row.registry_id, row.attempt, row.actor,
            summary]  # fmt: skip


@cli.command("events")
@click.option("--job", "job_id", help="Only this job's events.")
@click.option("--registry", "registry_id", type=int, help="Only events about this registry.")
@click.option(
    "--type", "types", multiple=True, help="Only this type (repeatable), e.g. job.failed."
)
@click.option("--actor", help="Only this actor, exactly (e.g. operator:alice).")
@click.option("--since", type=SINCE, help="From then on.")
@click.option("--until", type=SINCE, help="Before then.")
@click.option(
    "--limit",
    type=int,
    default=500,
    show_default=True,
    help="At most this many, oldest first (narrow with --since).",
)
@_JSON
@click.option("--jsonl", is_flag=True, help="Print one JSON object per line.")
def events_command(
    job_id: str | None,
    registry_id: int | None,
    types: tuple[str, ...],
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
    jsonl: bool,
) -> None:
    """Read the event log, oldest first.

    \b
    Example:
      pushctl events --type job.failed --type fallback.applied --since 1d --jsonl
    """
    if as_json and jsonl:
        raise click.UsageError("give --json or --jsonl, not both")
    with session_scope() as session:
        rows = events.select_events(
            session,
            job_id=job_id,
            registry_id=registry_id,
            types=list(types) or None,
            actor=actor,
            since=since,
            until=until,
            limit=limit,
        )
    if as_json:
        _echo_json([events.event_fields(row) for row in rows])
    elif jsonl:
        for row in rows:
            click.echo(json.dumps(events.event_fields(row), default=str))
    else:
        _out().print(_events_table(rows))


if __name__ == "__main__":  # pragma: no cover
    main()
