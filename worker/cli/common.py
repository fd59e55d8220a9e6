"""Shared by every ``pushctl`` command: parsing, output, the error -> exit-code map, the root group.

Library errors are ``PushWorkerError``s; ``_Pushctl.invoke`` turns every one of them into
``error:``/``hint:`` lines on stderr and the error's exit code, in one place.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import DataError, OperationalError, ProgrammingError, SQLAlchemyError
from urllib3.exceptions import InsecureRequestWarning

from worker.core.errors import PushWorkerError, StorageError, ValidationError
from worker.core.logs import configure_logging
from worker.core.settings import get_settings
from worker.core.summaries import summarize
from worker.core.text import CONTROL, printable
from worker.jobs import MAX_ID
from worker.store.db import translate_error
from worker.store.models import Event, PushJob

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
    # isascii: str.isdigit also accepts digits such as "²", which int() does not.
    if not all(item.isascii() and item.isdigit() for item in items):
        raise ValueError(
            f"{printable(text)!r} is not a comma-separated list of registry ids, e.g. 4,7"
        )
    ids = [int(item) for item in items]
    if not all(1 <= member <= MAX_ID for member in ids):
        raise ValueError(f"registry ids are from 1 to {MAX_ID}")
    return ids


def check_plain(text: str) -> str:
    """``text`` if it is plain printable text: no control character (ESC, NUL, newline ...,
    see ``worker.core.text``) and valid Unicode (a command line can carry undecodable bytes, which
    Python turns into lone surrogates that no database driver can send); else ``ValueError``."""
    found = CONTROL.search(text)
    if found is not None:
        raise ValueError(
            f"contains a control character (U+{ord(found.group()):04X} at position "
            f"{found.start()}); give plain printable text"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 text") from None
    return text


#: Days of retention: a timedelta keeps at most 999,999,999 days; nobody means more than this.
MAX_DAYS = 1_000_000.0


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


class PlainTextType(click.ParamType[str]):
    """Free text from the command line that is stored or looked up (``--reason``, a job id,
    ``--repository`` ...): refused, as a usage error, when it holds control characters."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_plain(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class FiniteFloatType(click.ParamType[float]):
    """A number from 0 to ``maximum``: float() takes "nan" and "inf", which click's
    FloatRange lets through (nan compares false with both bounds)."""

    def __init__(self, name: str, maximum: float) -> None:
        self.name = name
        self.maximum = maximum

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{printable(value)!r} is not a number", param, ctx)
        if not (math.isfinite(number) and 0 <= number <= self.maximum):
            self.fail(f"must be a number from 0 to {self.maximum:.0f}", param, ctx)
        return number


SINCE = SinceType()
FALLBACK = FallbackType()
TEXT = PlainTextType()
DAYS = FiniteFloatType("DAYS", MAX_DAYS)
#: Seconds to wait for something: at most a year.
SECONDS = FiniteFloatType("SECONDS", 366 * 86400.0)
#: A record id (registry, event): the range of the Integer columns on every backend.
ID = click.IntRange(1, MAX_ID)
#: How many rows a listing shows.
LIMIT = click.IntRange(1, MAX_ID)


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
        # Text, not str: rich would read "[...]" in a registry's words as markup. printable:
        # a stored value may carry escape sequences (rows written before they were refused).
        table.add_row(*(Text("-" if cell is None else printable(cell)) for cell in row))
    return table


def _key_values(data: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        shown = "-" if value in (None, "") else printable(value)
        table.add_row(Text(printable(key), style="bold"), Text(shown))
    return table


def _fail(message: str, code: int) -> NoReturn:
    click.echo(printable(message), err=True)
    raise click.exceptions.Exit(code)


_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


# --- shared job and event formatting -----------------------------------------------------------


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
        printable(
            f"{row.time:%H:%M:%S} {row.type:<17} {row.step or '-':<20} {where:<12} "
            f"{summarize(row.type, row.payload or {})}".rstrip()
        )
    )


def _events_table(rows: Sequence[Event], *, with_job: bool = True) -> Table:
    job = ["job"] if with_job else []
    columns = ["time (UTC)", "type", *job, "step", "registry", "try", "actor", "summary"]
    return _table(columns, (_event_row(row, with_job) for row in rows))


def _event_row(row: Event, with_job: bool) -> list[object]:
    job = [(row.job_id or "-")[:8]] if with_job else []
    summary = summarize(row.type, row.payload or {})
    return [_when(row.time), row.type, *job, row.step, row.registry_id, row.attempt, row.actor,
            summary]  # fmt: skip


# --- the top-level group --------------------------------------------------------------------------


class _Pushctl(click.Group):
    """The group whose ``invoke`` is the one place library errors become exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PushWorkerError as exc:
            _report_error(exc)
        except SQLAlchemyError as exc:
            _report_error(_database_error(exc))
        except (OverflowError, UnicodeError):
            # A driver refusing a value before it reaches the database (sqlite3: an int beyond
            # 64 bits; a lone surrogate from undecodable command-line bytes).
            _report_error(
                ValidationError(
                    "a value given cannot be stored: a number out of range, or text that is "
                    "not valid Unicode",
                    hint="check the command's arguments",
                )
            )


def _database_error(exc: SQLAlchemyError) -> PushWorkerError:
    """A clear error for a database failure that no seam translated. Never the driver's own
    text: it quotes the statement's parameters, which can hold anything given."""
    if isinstance(exc, OperationalError | ProgrammingError) and _schema_missing(exc):
        return StorageError(
            "the database has no pushworker tables", hint="run `pushctl db upgrade`"
        )
    translated = translate_error(exc) if isinstance(exc, OperationalError) else None
    if translated is not None:
        return translated
    if isinstance(exc, DataError):
        return ValidationError(
            "the database cannot take a value given (a NUL byte, a number out of range, or "
            "text that is too long)",
            hint="check the command's arguments",
        )
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    code = f", SQLSTATE {sqlstate}" if sqlstate else ""
    return StorageError(
        f"the database refused the command ({type(exc).__name__}{code})",
        hint="check the database (PUSHWORKER_DATABASE_URL) and its logs",
    )


def _report_error(exc: PushWorkerError) -> NoReturn:
    click.echo(f"error: {printable(exc.message)}", err=True)
    if exc.hint:
        click.echo(f"hint: {printable(exc.hint)}", err=True)
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
