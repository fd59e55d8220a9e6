"""The two supported brokers, Redis and RabbitMQ, and the Celery settings each one needs.

``celeryconfig`` (the worker and every producer) and the test harness's own Celery apps take their
broker settings from ``celery_broker_options``: a producer that declared a queue with other
arguments than the worker's would be refused by RabbitMQ (``PRECONDITION_FAILED``), so there is one
place that says how a queue is declared. docs/deploy.md ("Choosing a broker") says when to use
which.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

BrokerKind = Literal["redis", "amqp", "other"]

#: kombu's Redis transport (``unix://`` is a Redis socket to kombu) and its AMQP transports.
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: How much longer than the longest push an unacknowledged Redis message stays invisible.
VISIBILITY_MARGIN = 600


def broker_kind(url: str) -> BrokerKind:
    """``redis`` or ``amqp`` by the URL's scheme; ``other`` for anything else (e.g. ``memory://``)."""
    scheme = url.partition("://")[0].lower()
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    return "other"


def visibility_timeout(push_timeout: float) -> int:
    """Seconds Redis keeps an unacknowledged message invisible: longer than any push."""
    return math.ceil(push_timeout) + VISIBILITY_MARGIN


def celery_broker_options(url: str, push_timeout: float) -> dict[str, Any]:
    """The Celery settings that depend on the broker, for the broker at ``url``.

    Redis: an unacknowledged message comes back after the visibility timeout, which must exceed
    the longest push (and every retry delay stays far under it).

    RabbitMQ: every queue is a quorum queue (replicated, durable, and it counts redeliveries in
    ``x-delivery-count``), messages are persistent and every publish waits for the broker's
    confirm, so a job the producer reported as published is on disk. Quorum queues have no global
    QoS: ``worker_detect_quorum_queues`` makes the worker use per-consumer prefetch, and Celery's
    native delayed delivery carries countdowns (retries, flow control's polls) through the broker
    instead of holding them in the worker, which needs topic exchanges.
    """
    kind = broker_kind(url)
    if kind == "amqp":
        return {
            "broker_transport_options": {"confirm_publish": True},
            "task_default_queue_type": "quorum",
            "task_create_missing_queue_type": "quorum",
            "task_default_exchange_type": "topic",
            "task_create_missing_queue_exchange_type": "topic",
            "task_default_delivery_mode": "persistent",
            "worker_detect_quorum_queues": True,
        }
    if kind == "redis":
        return {
            "broker_transport_options": {"visibility_timeout": visibility_timeout(push_timeout)}
        }
    return {}


def delayed_delivery_seconds(
    countdown: float | None, eta: datetime | str | None, now: datetime
) -> int | None:
    """The whole seconds a delayed message should wait in RabbitMQ, or None when it is not
    delayed (no countdown or ETA, or one already due).

    Celery's native delayed delivery (quorum queues) routes a message by the countdown's whole
    seconds, truncated: under a second becomes 0, which kombu refuses ("countdown must be a
    positive number") and Celery then drops the retry. Rounded up, a delay is never shorter than
    asked, and at most a second longer.
    """
    if countdown:
        seconds = float(countdown)
    elif eta is not None:
        when = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        seconds = (when - now).total_seconds()
    else:
        return None
    return math.ceil(seconds) if seconds > 0 else None
