"""``pushworker.submit``: the message contract for producers that do not import this package.

One positional argument, a JSON object matching ``docs/push-request.schema.json``; no keyword
arguments. The task takes ``*args, **kwargs`` so that a malformed call is recorded as a
``submission.rejected`` event instead of failing inside Celery (see ``worker.contract``).
Rejections are never retried; only a database that does not answer is, with backoff.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from tasks.app import app
from worker.contract import TASK_NAME, handle_submission, submission_id_for
from worker.core.errors import PushWorkerError
from worker.core.logs import get_logger
from worker.core.settings import get_settings
from worker.engine.retry import backoff_delay

log = get_logger("pushworker.submit")


@app.task(bind=True, name=TASK_NAME)
def submit(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    submission_id = submission_id_for(self.request.id)
    try:
        result = handle_submission(args, kwargs, submission_id=submission_id)
    except PushWorkerError as exc:  # retryable only: handle_submission records the others
        settings = get_settings()
        tries = self.request.retries + 1
        if tries >= settings.max_attempts:
            # Nothing could be recorded: the log line is all that is left of this message.
            log.error(
                "submission.dropped", submission_id=submission_id, error_code=exc.code,
                error_message=exc.message, tries=tries,
            )  # fmt: skip
            return {"status": "dropped", "error_code": exc.code}
        delay = backoff_delay(tries, base=settings.retry_base, cap=settings.retry_max)
        log.warning(
            "submission.deferred", submission_id=submission_id, error_code=exc.code,
            retry_in=round(delay, 2),
        )  # fmt: skip
        raise self.retry(countdown=delay, max_retries=None) from None
    return result.to_dict()
