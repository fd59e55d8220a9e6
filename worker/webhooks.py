"""Webhooks: subscriptions, deliveries planned from the event log, sent, retried, dead.

- **Subscriptions** (``add_subscription``): a URL, the event types it wants, optionally one
  registry and failures only. The URL is checked by the SSRF rule now and again at every attempt
  (``worker.seams.webhook_http``). The signing secret (``whsec_...``) is returned once, stored
  encrypted like registry secrets (``worker.core.credentials``), and is never in an event, a log
  line or an output after that.
- **Planning** (``plan``): each subscription has a cursor, the last event id it looked at. In one
  transaction, with the subscription's row locked, the events after the cursor are read in id
  order, a delivery is inserted for each that matches (``UNIQUE(subscription_id, event_id)``), and
  the cursor moves to the last event read. So an event is planned once, none is skipped across
  restarts, and a planner that dies plans nothing half. Event ids become visible in id order
  (appends are serialised by the chain lock), so a cursor never passes an event still to commit.
- **Delivering** (``deliver_due``): a due delivery is taken by bumping its ``attempts`` and
  pushing its ``next_attempt_at`` a lease ahead, in one transaction that also inserts the
  attempt's row; then it is sent (outside any transaction), and the outcome is recorded. A worker
  that dies mid-attempt leaves the delivery pending: once the lease passes, another attempt sends
  it again, with the same ``webhook-id``. A job's deliveries to one subscription go out in event
  order: one waits while an earlier one of the same job is pending.
- **Retries**: a failed attempt is tried again after ``PUSHWORKER_WEBHOOK_RETRY_BASE`` seconds,
  doubling, at most ``PUSHWORKER_WEBHOOK_RETRY_MAX``; once ``PUSHWORKER_WEBHOOK_RETRY_FOR``
  seconds have passed since the delivery was planned (or redelivered) it is dead.
  ``redeliver`` makes a delivery pending again, with the same ``webhook-id``.
"""

from __future__ import annotations

import enum
import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session, aliased

from worker.core.credentials import decrypt_secret, encrypt_secret
from worker.core.errors import (
    NotFound,
    ValidationError,
    WebhookUnreachable,
    WebhookURLRefused,
)
from worker.core.logs import get_logger
from worker.core.settings import Settings, get_settings
from worker.registries import get_registry
from worker.seams.protocols import WebhookSender
from worker.seams.webhook_http import (
    HttpxSender,
    WebhookRequest,
    WebhookResult,
    checked_addresses,
    new_secret,
    parse_url,
)
from worker.store import events
from worker.store.db import read_connection, session_scope
from worker.store.models import (
    Event,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from worker.store.queries import event_fields

log = get_logger("pushworker.webhooks")

#: Events read per subscription per planning transaction.
PLAN_BATCH = 500
#: Deliveries taken per look at what is due.
DUE_BATCH = 20
EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")
#: Types a subscription may not ask for: deliveries' own bookkeeping would feed itself.
OWN_PREFIX = "webhook."


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


def webhook_stream(subscription_id: int) -> str:
    return f"webhooks/{subscription_id}"


def lease_seconds(settings: Settings) -> float:
    """How long a taken delivery is left to its worker before another may send it again."""
    return settings.webhook_timeout * 2 + 5


def backoff(attempts: int, settings: Settings) -> float:
    """Seconds before the next attempt, after ``attempts`` failed ones."""
    exponent = min(max(attempts - 1, 0), 40)
    return float(min(settings.webhook_retry_base * 2**exponent, settings.webhook_retry_max))


# --- subscriptions --------------------------------------------------------------------------------


def _event_types(types: Sequence[str]) -> list[str]:
    chosen = list(dict.fromkeys(t.strip() for t in types if t.strip()))
    if not chosen:
        raise ValidationError("name at least one event type, e.g. job.succeeded,job.failed")
    for name in chosen:
        if len(name) > 40 or not EVENT_TYPE.fullmatch(name):
            raise ValidationError(
                f"{name[:40]!r} is not an event type (lower-case words joined by dots)",
                hint="see `pushctl events --type ...`; e.g. job.succeeded, job.failed",
            )
        if name.startswith(OWN_PREFIX):
            raise ValidationError(f"webhooks cannot subscribe to their own events ({name})")
    return chosen


def add_subscription(
    session: Session,
    url: str,
    event_types: Sequence[str],
    *,
    registry_id: int | None = None,
    only_failures: bool = False,
    allow_private: bool = False,
    actor: str,
) -> tuple[WebhookSubscription, str]:
    """Save a subscription; returns it and its signing secret (shown once, never again).

    Deliveries start with the events appended after it: its cursor is the log's newest event.
    """
    parts = parse_url(url)
    types = _event_types(event_types)
    if registry_id is not None:
        get_registry(session, registry_id)
    try:
        checked_addresses(url, allow_private=allow_private)
    except WebhookUnreachable as exc:
        raise WebhookURLRefused(exc.message, hint="check the URL's host name") from None
    secret = new_secret()
    newest = session.execute(select(func.max(Event.id))).scalar()
    subscription = WebhookSubscription(
        url=url, event_types=types, registry_id=registry_id, only_failures=only_failures,
        allow_private=allow_private, secret=encrypt_secret(secret), cursor=int(newest or 0),
        created_by=actor,
    )  # fmt: skip
    session.add(subscription)
    session.flush()
    events.append(
        session, stream=webhook_stream(subscription.id), type="webhook.added", actor=actor,
        registry_id=registry_id,
        payload={
            "webhook_id": subscription.id, "url_host": parts.hostname, "event_types": types,
            "only_failures": only_failures, "allow_private": allow_private,
        },
    )  # fmt: skip
    return subscription, secret


def get_subscription(session: Session, subscription_id: int) -> WebhookSubscription:
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is None or subscription.removed_at is not None:
        raise NotFound(
            f"webhook {subscription_id} does not exist", hint="see `pushctl webhooks list`"
        )
    return subscription


def list_subscriptions(
    session: Session, *, include_removed: bool = False
) -> list[WebhookSubscription]:
    query = select(WebhookSubscription).order_by(WebhookSubscription.id)
    if not include_removed:
        query = query.where(WebhookSubscription.removed_at.is_(None))
    return list(session.scalars(query))


def remove_subscription(session: Session, subscription_id: int, *, actor: str) -> None:
    """Stop a subscription: nothing more is planned or sent for it (its history stays)."""
    subscription = get_subscription(session, subscription_id)
    subscription.removed_at = utcnow()
    events.append(
        session, stream=webhook_stream(subscription_id), type="webhook.removed", actor=actor,
        payload={"webhook_id": subscription_id},
    )  # fmt: skip


def subscription_fields(subscription: WebhookSubscription) -> dict[str, Any]:
    """A subscription as plain data, without its secret."""
    return {
        "id": subscription.id, "url": subscription.url,
        "event_types": list(subscription.event_types), "registry_id": subscription.registry_id,
        "only_failures": subscription.only_failures,
        "allow_private": subscription.allow_private, "cursor": subscription.cursor,
        "created_at": subscription.created_at.isoformat(),
        "created_by": subscription.created_by,
        "removed_at": subscription.removed_at.isoformat() if subscription.removed_at else None,
    }  # fmt: skip


# --- planning -------------------------------------------------------------------------------------


def matches(subscription: WebhookSubscription, event: Event) -> bool:
    """Whether ``event`` is one ``subscription`` asked for."""
    if event.type not in subscription.event_types:
        return False
    if subscription.registry_id is not None:
        requested = (event.payload or {}).get("requested_registry_id")
        if subscription.registry_id not in (event.registry_id, requested):
            return False
    return not (subscription.only_failures and event.outcome != "failed")


def plan_subscription(session: Session, subscription_id: int) -> int:
    """Plan the deliveries of the events after the subscription's cursor (at most
    ``PLAN_BATCH``) and move the cursor past them, in the caller's transaction. Returns how
    many deliveries were planned."""
    subscription = session.get(WebhookSubscription, subscription_id, with_for_update=True)
    if subscription is None or subscription.removed_at is not None:
        return 0
    rows = session.scalars(
        select(Event).where(Event.id > subscription.cursor).order_by(Event.id).limit(PLAN_BATCH)
    ).all()
    if not rows:
        return 0
    now = utcnow()
    planned = 0
    for event in rows:
        if matches(subscription, event):
            session.add(
                WebhookDelivery(
                    subscription_id=subscription.id, event_id=event.id, job_id=event.job_id,
                    message_id=f"msg_{uuid.uuid4().hex}", status=DeliveryStatus.PENDING.value,
                    attempts=0, next_attempt_at=now, retry_since=now,
                )
            )  # fmt: skip
            planned += 1
    subscription.cursor = rows[-1].id
    return planned


def plan() -> int:
    """Plan every subscription, each in its own transaction, until each has caught up with the
    log. Returns how many deliveries were planned."""
    with session_scope() as session:
        ids = [s.id for s in list_subscriptions(session)]
    total = 0
    for subscription_id in ids:
        while True:
            with session_scope() as session:
                planned = plan_subscription(session, subscription_id)
                caught_up = _caught_up(session, subscription_id)
            total += planned
            if caught_up:
                break
    return total


def _caught_up(session: Session, subscription_id: int) -> bool:
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is None or subscription.removed_at is not None:
        return True
    newer = session.execute(select(Event.id).where(Event.id > subscription.cursor).limit(1))
    return newer.first() is None


# --- delivering -----------------------------------------------------------------------------------


def due_delivery_ids(session: Session, now: datetime, limit: int = DUE_BATCH) -> list[int]:
    """Pending deliveries whose time has come, oldest first, leaving out any that waits for an
    earlier pending delivery of the same job to the same subscription."""
    delivery, earlier = WebhookDelivery, aliased(WebhookDelivery)
    waits = exists().where(
        and_(
            earlier.subscription_id == delivery.subscription_id,
            earlier.job_id == delivery.job_id,
            earlier.id < delivery.id,
            earlier.status == DeliveryStatus.PENDING.value,
        )
    )
    query = (
        select(delivery.id)
        .join(WebhookSubscription, WebhookSubscription.id == delivery.subscription_id)
        .where(
            delivery.status == DeliveryStatus.PENDING.value,
            delivery.next_attempt_at <= now,
            WebhookSubscription.removed_at.is_(None),
            ~waits,
            ~_in_flight(delivery.subscription_id, now),
        )
        .order_by(delivery.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def _in_flight(subscription_id: Any, now: datetime) -> Any:
    """Whether an attempt to the subscription is under way: taken, not finished, its lease not
    run out. One at a time per subscription: a receiver that hangs holds one slot of the webhook
    worker, never all of them, and the others go on delivering (and planning)."""
    other = aliased(WebhookDelivery)
    return exists().where(
        and_(
            other.subscription_id == subscription_id,
            other.status == DeliveryStatus.PENDING.value,
            other.next_attempt_at > now,
            WebhookAttempt.delivery_id == other.id,
            WebhookAttempt.attempt == other.attempts,
            WebhookAttempt.finished_at.is_(None),
        )
    )


@dataclass(frozen=True)
class Taken:
    """A delivery a worker took: which attempt this is, and what to send."""

    delivery_id: int
    attempt: int
    request: WebhookRequest


def payload_of(event: Event) -> str:
    """The JSON body of an event's delivery: its type, its time and its fields (which hold no
    secret: ``worker.store.queries.event_fields``)."""
    body = {"type": event.type, "timestamp": event.time.isoformat(), "data": event_fields(event)}
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def take(session: Session, delivery_id: int, settings: Settings) -> Taken | None:
    """Take one due delivery for one attempt (None: another worker has it, or it is no longer
    due), in the caller's transaction."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    now = utcnow()
    if (
        delivery is None
        or delivery.status != DeliveryStatus.PENDING
        or delivery.next_attempt_at is None
        or delivery.next_attempt_at > now
    ):
        return None
    # The subscription's row too: takers of one subscription's deliveries go one at a time, so
    # the in-flight check below is exact on PostgreSQL as well (SQLite serialises writers anyway).
    subscription = session.get(WebhookSubscription, delivery.subscription_id, with_for_update=True)
    event = session.get(Event, delivery.event_id)
    if subscription is None or subscription.removed_at is not None:
        return None
    busy = select(_in_flight(subscription.id, now))
    if session.execute(busy).scalar():
        return None  # another worker took one of this subscription's deliveries meanwhile
    if event is None:  # pruned by retention before it could be delivered
        delivery.status = DeliveryStatus.DEAD.value
        delivery.last_error = "the event was pruned from the log before it was delivered"
        delivery.next_attempt_at = None
        return None
    delivery.attempts += 1
    delivery.next_attempt_at = now + timedelta(seconds=lease_seconds(settings))
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id, attempt=delivery.attempts, started_at=now,
            worker=events.worker_actor(),
        )
    )  # fmt: skip
    secret = decrypt_secret(subscription.secret, f"webhook {subscription.id}")
    request = WebhookRequest(
        url=subscription.url, message_id=delivery.message_id, body=payload_of(event),
        secret=secret, allow_private=subscription.allow_private,
        timeout=settings.webhook_timeout,
    )  # fmt: skip
    return Taken(delivery.id, delivery.attempts, request)


def record(session: Session, taken: Taken, result: WebhookResult, settings: Settings) -> str:
    """Record one attempt's outcome; returns the delivery's status after it."""
    now = utcnow()
    attempt = session.scalars(
        select(WebhookAttempt).where(
            WebhookAttempt.delivery_id == taken.delivery_id,
            WebhookAttempt.attempt == taken.attempt,
        )
    ).one()
    error = result.error.message if result.error is not None else None
    attempt.finished_at = now
    attempt.status_code = result.status_code
    attempt.latency_ms = result.latency_ms
    attempt.error = error
    delivery = session.get(WebhookDelivery, taken.delivery_id, with_for_update=True)
    assert delivery is not None, "a taken delivery exists"
    if delivery.status != DeliveryStatus.PENDING:
        return delivery.status  # delivered by an attempt that took over, or dead meanwhile
    delivery.last_status_code = result.status_code
    delivery.last_latency_ms = result.latency_ms
    delivery.last_error = error
    if result.ok:
        delivery.status = DeliveryStatus.DELIVERED.value
        delivery.delivered_at = now
        delivery.next_attempt_at = None
    elif delivery.attempts > taken.attempt:
        pass  # a later attempt (after this one's lease ran out) decides
    else:
        wait = timedelta(seconds=backoff(delivery.attempts, settings))
        give_up = delivery.retry_since + timedelta(seconds=settings.webhook_retry_for)
        if now + wait > give_up:
            delivery.status = DeliveryStatus.DEAD.value
            delivery.next_attempt_at = None
        else:
            delivery.next_attempt_at = now + wait
    return delivery.status


@dataclass
class SweepReport:
    planned: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    statuses: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, int]:
        return {
            "planned": self.planned, "delivered": self.delivered, "failed": self.failed,
            "dead": self.dead,
        }  # fmt: skip


def deliver_due(
    sender: WebhookSender | None = None,
    *,
    budget: float | None = None,
    settings: Settings | None = None,
) -> SweepReport:
    """Send due deliveries, one attempt each, until none is due or ``budget`` seconds have
    passed (it is checked between attempts; each attempt takes at most the webhook timeout)."""
    settings = settings or get_settings()
    sender = sender or HttpxSender()
    report = SweepReport()
    deadline = time.monotonic() + (budget if budget is not None else settings.webhook_every * 5)
    while time.monotonic() < deadline:
        with session_scope() as session:
            ids = due_delivery_ids(session, utcnow())
        if not ids:
            break
        for delivery_id in ids:
            if time.monotonic() >= deadline:
                break
            with session_scope() as session:
                taken = take(session, delivery_id, settings)
            if taken is None:
                continue
            result = sender.send(taken.request)
            with session_scope() as session:
                status = record(session, taken, result, settings)
            _count(report, taken, result, status)
    return report


def _count(report: SweepReport, taken: Taken, result: WebhookResult, status: str) -> None:
    report.statuses.append(status)
    common = {"delivery_id": taken.delivery_id, "attempt": taken.attempt,
              "status_code": result.status_code, "latency_ms": result.latency_ms}  # fmt: skip
    if result.ok:
        report.delivered += 1
        log.info("webhook.delivered", **common)
        return
    report.failed += 1
    error = result.error.message if result.error is not None else None
    if status == DeliveryStatus.DEAD:
        report.dead += 1
        log.error("webhook.dead", error=error, **common)
    else:
        log.warning("webhook.attempt_failed", error=error, **common)


def run(sender: WebhookSender | None = None, *, budget: float | None = None) -> SweepReport:
    """What the periodic task does: plan from the log, then send what is due."""
    planned = plan()
    report = deliver_due(sender, budget=budget)
    report.planned = planned
    return report


# --- operators ------------------------------------------------------------------------------------


def list_deliveries(
    session: Session,
    *,
    status: str | None = None,
    subscription_id: int | None = None,
    limit: int = 100,
) -> list[WebhookDelivery]:
    """Newest first."""
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if status is not None:
        if status not in set(DeliveryStatus):
            raise ValidationError(
                f"no delivery status {status!r}; use one of {', '.join(DeliveryStatus)}"
            )
        query = query.where(WebhookDelivery.status == status)
    if subscription_id is not None:
        query = query.where(WebhookDelivery.subscription_id == subscription_id)
    return list(session.scalars(query))


def attempts_of(session: Session, delivery_id: int) -> list[WebhookAttempt]:
    return list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.attempt)
        )
    )


def delivery_fields(session: Session, delivery: WebhookDelivery) -> dict[str, Any]:
    event_type = session.execute(select(Event.type).where(Event.id == delivery.event_id)).scalar()
    return {
        "id": delivery.id, "webhook_id": delivery.subscription_id,
        "event_id": delivery.event_id, "event_type": event_type, "job_id": delivery.job_id,
        "message_id": delivery.message_id, "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "last_status_code": delivery.last_status_code,
        "last_latency_ms": delivery.last_latency_ms, "last_error": delivery.last_error,
        "created_at": _iso(delivery.created_at), "delivered_at": _iso(delivery.delivered_at),
        "tries": [
            {
                "attempt": a.attempt, "started_at": _iso(a.started_at),
                "status_code": a.status_code, "latency_ms": a.latency_ms, "error": a.error,
                "worker": a.worker,
            }
            for a in attempts_of(session, delivery.id)
        ],
    }  # fmt: skip


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def redeliver(session: Session, delivery_id: int, *, actor: str) -> WebhookDelivery:
    """Send a delivery again (dead or delivered), with the same ``webhook-id``; its retry window
    starts again now."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None:
        raise NotFound(
            f"webhook delivery {delivery_id} does not exist",
            hint="see `pushctl webhooks deliveries`",
        )
    get_subscription(session, delivery.subscription_id)
    now = utcnow()
    delivery.status = DeliveryStatus.PENDING.value
    delivery.next_attempt_at = now
    delivery.retry_since = now
    events.append(
        session, stream=webhook_stream(delivery.subscription_id), type="webhook.redelivered",
        actor=actor, payload={"webhook_id": delivery.subscription_id, "delivery_id": delivery.id},
    )  # fmt: skip
    return delivery


def pending_count(session: Session) -> int:
    """Deliveries still to send (the CLI's summary, the tests' wait)."""
    return int(
        session.execute(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.status == DeliveryStatus.PENDING.value)
        ).scalar_one()
    )


# --- kicking a run as soon as a wanted event commits ----------------------------------------------

#: Seconds the set of subscribed event types is kept before it is read again.
WANTED_TTL = 5.0
_wanted: tuple[float, frozenset[str]] = (-WANTED_TTL, frozenset())


def wanted_types(now: float | None = None) -> frozenset[str]:
    """The event types some subscription wants, read at most every ``WANTED_TTL`` seconds (a
    subscription added meanwhile is served by beat's next run)."""
    global _wanted
    moment = time.monotonic() if now is None else now
    read_at, types = _wanted
    if 0 <= moment - read_at < WANTED_TTL:
        return types
    with read_connection() as connection:
        rows = connection.execute(
            select(WebhookSubscription.event_types).where(WebhookSubscription.removed_at.is_(None))
        ).all()
    types = frozenset(name for (names,) in rows for name in names)
    _wanted = (moment, types)
    return types
