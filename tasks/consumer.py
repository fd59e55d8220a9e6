"""The worker's consumer, with the message guard in front of Celery's strategy.

Configured by ``celeryconfig.worker_consumer``. Every message the worker reads, on any queue,
passes ``worker.core.messages.check_message`` before Celery decodes it; a refused message is
recorded
(``message.rejected`` on ``messages/<message id>``, or ``submission.rejected`` on
``submissions/<id>`` for ``pushworker.submit``, as docs/producers.md says) and acknowledged, so it
never comes back. Three more ways a message could stop the consumer are closed here:

- an exception escaping Celery's own handler for one accepted message: that message is
  recorded as ``crashed`` and acknowledged, the consumer goes on;
- Celery's own refusal paths (unknown task, invalid task, decode error), which would log the
  message body: they record metadata and acknowledge instead;
- an envelope that kombu's Redis transport cannot parse (not JSON, no properties): kombu has
  already popped it from the list when it fails, so it is recorded as ``envelope`` and dropped,
  instead of the exception reaching the event loop. On RabbitMQ there is no envelope to break:
  the broker frames every message, and whatever its body, headers or properties hold reaches
  the guard, which records and acknowledges it like any other (tests/e2e/test_amqp_broker.py).

If the database cannot record a refusal, the refusal is logged (metadata only) and the message
is still acknowledged: a poison message must never come back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from queue import Empty
from typing import Any

from celery.worker.consumer import Consumer
from kombu.message import Message
from vine import promise

from worker.contract import record_rejection
from worker.core.errors import InvalidMessage
from worker.core.logs import get_logger
from worker.core.messages import Refusal, check_message, message_id_of, shown, task_arguments
from worker.engine.steps import STEP_NAMES
from worker.store import events, queries
from worker.store.db import session_scope

log = get_logger("pushworker.consumer")

REJECTED = "message.rejected"
_HINT = "send JSON Celery protocol 2 messages of this worker's tasks; see docs/producers.md"
#: The tasks this worker accepts from the broker, with what each takes: one per step of
#: ``worker.engine.steps.STEPS``, the submission and the periodic tasks.
TASK_ARGUMENTS = task_arguments(STEP_NAMES)


def message_stream(message_id: str) -> str:
    return f"messages/{message_id}"


def record_refusal(refusal: Refusal, queue: str | None) -> bool:
    """Record a refused message; True if the event log has it, False if only the log line does."""
    try:
        with session_scope() as session:
            if refusal.is_submission:
                error = InvalidMessage(refusal.message, hint=_HINT)
                record_rejection(session, refusal.message_id, error, refusal.request)
            else:
                _append_rejected(session, refusal, queue)
    except Exception as exc:  # the database is away or refuses: the log line is all there is
        log.error(
            REJECTED, recorded=False, failure=type(exc).__name__, queue=queue,
            **refusal.to_payload(),
        )  # fmt: skip
        return False
    return True


def _append_rejected(session: Any, refusal: Refusal, queue: str | None) -> None:
    stream = message_stream(refusal.message_id)
    # A message redelivered after a crash between recording and acknowledging is recorded once.
    if queries.select_events(session, stream=stream, types=[REJECTED]):
        return
    payload = refusal.to_payload()
    if queue is not None:
        payload["queue"] = queue
    events.append(session, stream=stream, type=REJECTED, actor=events.worker_actor(),
                  payload=payload)  # fmt: skip


def _queue_of(message: Message) -> str | None:
    info = getattr(message, "delivery_info", None)
    key = info.get("routing_key") if isinstance(info, dict) else None
    return shown(key) if key is not None else None


def refusal_for(message: Message, reason: str, text: str) -> Refusal:
    """A refusal of a message that Celery, not the guard, found wrong."""
    headers = getattr(message, "headers", None)
    name = headers.get("task") if isinstance(headers, dict) else None
    body = getattr(message, "body", None)
    content_type = getattr(message, "content_type", None)
    return Refusal(
        reason, text, task_name=shown(name) if name is not None else None,
        message_id=message_id_of(headers),
        content_type=shown(content_type) if content_type is not None else None,
        body_bytes=len(body) if isinstance(body, bytes | str) else None,
    )  # fmt: skip


class GuardedConsumer(Consumer):  # type: ignore[misc]  # Celery is untyped
    """Celery's consumer with ``worker.core.messages``' guard in front of every task strategy."""

    def create_task_handler(self, promise: Any = promise) -> Callable[[Message], None]:
        celery_handler = super().create_task_handler(promise)
        self._guard_transport()
        passthrough = (*self.connection_errors, *self.channel_errors)

        def on_task_received(message: Message) -> None:
            verdict = check_message(
                tasks=TASK_ARGUMENTS, headers=message.headers, properties=message.properties,
                content_type=message.content_type, content_encoding=message.content_encoding,
                body=message.body,
            )  # fmt: skip
            if isinstance(verdict, Refusal):
                self._refuse(message, verdict)
                return
            try:
                celery_handler(message)
            except passthrough:  # the broker went away: the consumer reconnects, as Celery does
                raise
            except Exception as exc:
                text = f"the worker failed to take the message: {type(exc).__name__}"
                self._refuse(message, refusal_for(message, "crashed", text))

        return on_task_received

    def _refuse(self, message: Message, refusal: Refusal) -> None:
        record_refusal(refusal, _queue_of(message))
        if not message.acknowledged:
            message.ack()

    # Celery's own refusals log the message body; these record metadata and acknowledge.

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._refuse(message, refusal_for(message, "protocol", "not a Celery task message"))

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._refuse(message, refusal_for(message, "unknown_task", "no such task on this worker"))

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        text = f"Celery refused the message: {type(exc).__name__}"
        self._refuse(message, refusal_for(message, "headers", text))

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        text = f"the message could not be decoded: {type(exc).__name__}"
        self._refuse(message, refusal_for(message, "not_json", text))

    def _guard_transport(self) -> None:
        """Catch what kombu's Redis transport raises on an envelope it cannot parse."""
        channel = getattr(self.task_consumer, "channel", None)
        handlers = getattr(channel, "handlers", None)
        if not isinstance(handlers, dict) or "BRPOP" not in handlers:
            return  # another transport: nothing of this kind to guard
        read = handlers["BRPOP"]
        if getattr(read, "pushworker_guarded", False):
            return
        handlers["BRPOP"] = _guarded_read(read, (*self.connection_errors, *self.channel_errors))


def _guarded_read(read: Callable[..., Any], passthrough: tuple[type[BaseException], ...]) -> Any:
    passed: tuple[type[BaseException], ...] = (Empty, *passthrough)

    def guarded(**options: Any) -> Any:
        try:
            return read(**options)
        except passed:  # no message, or the broker went away: kombu's business
            raise
        except Exception as exc:
            # BRPOP has removed the item from the list: it cannot be acknowledged or restored.
            size = len(exc.doc) if isinstance(exc, json.JSONDecodeError) else None
            text = f"the broker envelope could not be read: {type(exc).__name__}"
            record_refusal(Refusal("envelope", text, body_bytes=size), None)
            return True

    guarded.pushworker_guarded = True  # type: ignore[attr-defined]
    return guarded
