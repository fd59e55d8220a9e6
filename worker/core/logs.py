"""structlog configuration: JSON lines in production, readable in a terminal, secrets masked.

Redaction is a processor like any other: it runs on every line, whatever its origin, so a
credential-like field that slips into a log call is masked before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.core.text import printable
from worker.core.tracing import current_ids

MASK = "***"
#: Keys whose values are never written, wherever they appear in an event dict.
_SECRET_KEY = re.compile(r"pass(word)?|secret|token|authorization|auth_config|api_key|cookie", re.I)
#: Keys that match the pattern above but only ever hold safe descriptions.
_SAFE_KEYS = frozenset({"credential_source", "secret_key_set"})


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask the values of credential-like keys, also inside nested dicts."""
    return _redact_mapping(event_dict)


def _redact_mapping(mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(mapping.items()):
        if key not in _SAFE_KEYS and _SECRET_KEY.search(str(key)):
            mapping[key] = MASK
        elif isinstance(value, dict):
            mapping[key] = _redact_mapping(dict(value))
    return mapping


#: Loggers of the libraries that print what a broker message carries (Celery, kombu).
_MESSAGE_LOGGERS = ("celery", "kombu")
#: Where such a line starts to show a message's contents: the body, its headers (``argsrepr`` is
#: the arguments' repr), ``dump_body`` output, a payload kombu could not restore.
_MESSAGE_CONTENT = re.compile(
    r"message body was|decode message body|restore message|\bbody\s*[:=]|\bheaders\s*[:=]"
    r"|\bargsrepr\b|\bkwargsrepr\b|\bpayload\s*[:=]|\(\d+b\)",
    re.I,
)
WITHHELD = "[message contents withheld]"


def drop_message_bodies(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Cut Celery's and kombu's lines where they start to print a message's contents.

    Those lines (an unknown task, an undecodable body, a message that could not be restored)
    print the whole body, which a producer may have filled with anything, a password too; key
    masking cannot see into it. The exception of such a line is kept as its type only, because
    a decoding error's text quotes the bytes it failed on.
    """
    if not str(event_dict.get("logger", "")).startswith(_MESSAGE_LOGGERS):
        return event_dict
    text = str(event_dict.get("event", ""))
    found = _MESSAGE_CONTENT.search(text)
    if found is None:
        return event_dict
    event_dict["event"] = f"{text[: found.start()]}{WITHHELD}"
    exc_info = event_dict.pop("exc_info", None)
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        event_dict["exception_type"] = exc_info[0].__name__
    event_dict.pop("exception", None)
    return event_dict


def add_trace_ids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add ``trace_id`` and ``span_id`` of the span current where the line is written, when
    there is one (tracing on, inside a job's span), so a log line leads to its trace. A line
    that carries its own ``trace_id`` (an event's, as recorded) keeps it."""
    ids = current_ids()
    if ids is not None:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    return event_dict


def escape_controls(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Escape control characters in text values, for a terminal: a producer's ``requested_by``
    or a registry's words must not repaint an operator's screen. (JSON escapes them itself.)"""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = printable(value, keep_lines=key == "exception")
    return event_dict


class _StderrLogger:
    """Writes each line to the process's *current* ``sys.stderr``.

    Not the stream that was current when logging was configured: test runners, CLI runners and
    daemons swap ``sys.stderr``, and a line written to a stream closed since must not fail.
    """

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to the current ``sys.stderr`` (see ``_StderrLogger``)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Route structlog (and the stdlib loggers Celery uses) through one processor chain."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
        redact,
    ]
    terminal: list[Any] = [] if use_json else [escape_controls]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, *terminal, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
    # Lines from the standard library's loggers (Celery, kombu) get the same shape and masking.
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, drop_message_bodies, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *terminal,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic narrates every migration step at INFO; operators need only its warnings.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
