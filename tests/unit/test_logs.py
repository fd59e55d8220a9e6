"""Logging writes where the process's stderr is now, and shows a person no raw control bytes."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import structlog

from worker.core.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _fresh_loggers() -> None:
    structlog.reset_defaults()


def test_a_stderr_swapped_and_closed_after_configuration_does_not_break_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Configured while stderr was a stream that is closed since (a CLI runner's capture, say):
    later lines, structlog's and the standard library's, go to the stderr of now."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("json")
    first.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    get_logger("pushworker.test").info("after.swap", job_id="j-1")
    logging.getLogger("celery.test").warning("stdlib after swap")
    text = now.getvalue()
    assert '"event": "after.swap"' in text and "stdlib after swap" in text


def test_console_lines_escape_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer's escape sequence in a logged field reaches a terminal as text, not as a
    command; a traceback keeps its lines."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("console")
    get_logger("pushworker.test").info("job.enqueued", requested_by="x\x1b[2Jy\x00")
    logging.getLogger("celery.test").warning("from \x1b]0;title\x07 celery")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("pushworker.test").exception("step.crashed")
    text = out.getvalue()
    assert "\x1b" not in text and "\x00" not in text and "\x07" not in text
    assert "x\\x1b[2Jy\\x00" in text and "\\x1b]0;title\\x07" in text
    assert "Traceback (most recent call last):\n" in text


def test_json_lines_keep_values_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON escapes control characters itself; the value a machine reads back is exact."""
    import json

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("json")
    get_logger("pushworker.test").info("job.enqueued", requested_by="x\x1b[2J")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["requested_by"] == "x\x1b[2J" and "\x1b" not in out.getvalue()
