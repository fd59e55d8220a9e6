"""Exporting the event log: JSON lines or CSV, streamed from one consistent snapshot (memory
stays flat at any size of log). A JSON-lines export is also the format of a retention archive.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from typing import IO, Any

from worker.core.errors import ValidationError
from worker.core.text import printable
from worker.store.db import read_snapshot
from worker.store.queries import RECORD_FIELDS, EventQuery, iter_records

EXPORT_FORMATS = ("jsonl", "csv")


def jsonl_line(record: Mapping[str, Any]) -> str:
    # ASCII only: JSON escapes C0 controls anyway, but would write DEL and the C1 controls
    # (U+009B is a CSI on some terminals) raw; escaped, an export on a terminal is inert.
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, default=str)


def write_records(out: IO[str], records: Iterable[Mapping[str, Any]], fmt: str) -> int:
    """Write ``records`` as JSON lines or CSV (payload as JSON in one column); the count."""
    count = 0
    if fmt == "jsonl":
        for record in records:
            out.write(jsonl_line(record) + "\n")
            count += 1
        return count
    if fmt != "csv":
        raise ValidationError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    for record in records:
        row = dict(record)
        row["payload"] = json.dumps(row["payload"], sort_keys=True, separators=(",", ":"))
        writer.writerow([_csv_cell(row[name]) for name in RECORD_FIELDS])
        count += 1
    return count


def _csv_cell(value: object) -> object:
    # CSV is read by people and spreadsheets: control characters in text (rows written before
    # they were refused at the entry points) are shown as escapes, never written raw.
    if value is None:
        return ""
    return printable(value) if isinstance(value, str) else value


def export(out: IO[str], fmt: str, query: EventQuery | None = None, url: str | None = None) -> int:
    """Stream the events matching ``query`` to ``out``; how many were written."""
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"unknown export format {fmt!r}; use one of {EXPORT_FORMATS}")
    with read_snapshot(url) as connection:
        return write_records(out, iter_records(connection, query or EventQuery()), fmt)
