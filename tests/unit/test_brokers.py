"""Redis and RabbitMQ as brokers: the Celery settings each gets, flow control's Redis beside
RabbitMQ, and an AMQP URL's password kept out of what the settings show."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.utils.quorum_queues import detect_quorum_queues

from worker.core.brokers import (
    broker_kind,
    celery_broker_options,
    delayed_delivery_seconds,
    visibility_timeout,
)
from worker.core.errors import ValidationError
from worker.core.settings import Settings, mask_url_password

AMQP = "amqp://pushworker:s3cr%40t-pw@rabbit.internal:5672/pushworker"
PASSWORD = "s3cr%40t-pw"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", "redis"),
        ("rediss://:pw@r:6380/1", "redis"),
        ("unix:///run/redis.sock", "redis"),
        (AMQP, "amqp"),
        ("pyamqp://guest@localhost//", "amqp"),
        ("AMQPS://h/v", "amqp"),
        ("memory://", "other"),
        ("sqs://", "other"),
    ],
)
def test_broker_kind_follows_the_scheme(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


def test_redis_keeps_its_visibility_timeout_and_nothing_of_rabbitmq() -> None:
    options = celery_broker_options("redis://127.0.0.1:6379/0", push_timeout=1800)
    assert options == {"broker_transport_options": {"visibility_timeout": 2400}}
    assert visibility_timeout(1799.2) == 2400


def app_for(url: str) -> Celery:
    app = Celery(broker=url)
    app.conf.update(task_default_queue="pushworker", **celery_broker_options(url, 1800))
    return app


def test_rabbitmq_queues_are_quorum_queues_with_confirms() -> None:
    """The default queue and every queue made on demand (a Docker host's) are quorum queues on
    topic exchanges (native delayed delivery needs them); publishes wait for confirms; the worker
    detects the quorum queues, so it uses per-consumer prefetch and delayed delivery."""
    app = app_for(AMQP)
    options = celery_broker_options(AMQP, 1800)
    assert options["broker_transport_options"] == {"confirm_publish": True}
    assert "visibility_timeout" not in options["broker_transport_options"]
    assert app.conf.task_default_delivery_mode == "persistent"
    assert app.conf.worker_detect_quorum_queues is True
    for name in ("pushworker", "pushworker.builder-1", "pushworker.webhooks"):
        queue = app.amqp.queues[name]
        assert queue.queue_arguments == {"x-queue-type": "quorum"}, name
        assert queue.exchange.type == "topic", name
    assert detect_quorum_queues(app, "amqp") == (True, "pushworker")


def test_the_celeryconfig_options_follow_the_configured_broker() -> None:
    """What celeryconfig applies: the same function, so producers and workers declare alike."""
    assert celery_broker_options("memory://", 1800) == {}


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def test_flow_control_uses_the_brokers_redis_by_default() -> None:
    chosen = settings(PUSHWORKER_BROKER_URL="redis://r:6379/3")
    assert chosen.flow_redis_url == "redis://r:6379/3"
    assert settings().flow_redis_url == "redis://127.0.0.1:6379/0"


def test_flow_control_beside_rabbitmq_takes_its_own_redis() -> None:
    chosen = settings(PUSHWORKER_BROKER_URL=AMQP, PUSHWORKER_FLOW_REDIS_URL="redis://r:6379/4")
    assert (chosen.broker_url, chosen.flow_redis_url) == (AMQP, "redis://r:6379/4")


def test_rabbitmq_without_a_flow_redis_is_refused_when_flow_control_is_on() -> None:
    """A worker that enforced no registry limits would push past them for all the others: the
    settings refuse to load, naming both ways out, and never the broker's password."""
    with pytest.raises(ValidationError) as refused:
        settings(PUSHWORKER_BROKER_URL=AMQP)
    message = refused.value.message
    assert message.startswith("PUSHWORKER_FLOW_REDIS_URL must be set")
    assert "PUSHWORKER_FLOW_CONTROL=0" in message
    assert PASSWORD not in message and "s3cr" not in message
    assert "amqp://pushworker:***@rabbit.internal:5672/pushworker" in message


def test_rabbitmq_with_flow_control_off_needs_no_redis() -> None:
    chosen = settings(PUSHWORKER_BROKER_URL=AMQP, PUSHWORKER_FLOW_CONTROL="0")
    assert chosen.flow_redis_url is None


def test_a_flow_redis_url_that_is_not_redis_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        settings(PUSHWORKER_BROKER_URL=AMQP, PUSHWORKER_FLOW_REDIS_URL="amqp://u:pw@h//")
    assert refused.value.message.startswith("PUSHWORKER_FLOW_REDIS_URL must be a redis://")
    assert ":pw@" not in refused.value.message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (AMQP, "amqp://pushworker:***@rabbit.internal:5672/pushworker"),
        ("amqps://u:p@ss:w@rd@h:5671/v", "amqps://u:***@h:5671/v"),
        ("pyamqp://guest@localhost//", "pyamqp://guest@localhost//"),
        ("amqp://localhost:5672//", "amqp://localhost:5672//"),
    ],
)
def test_an_amqp_password_is_masked(url: str, shown: str) -> None:
    assert mask_url_password(url) == shown


def test_pushctl_config_never_shows_the_amqp_or_flow_redis_password() -> None:
    shown = settings(
        PUSHWORKER_BROKER_URL=AMQP, PUSHWORKER_FLOW_REDIS_URL="redis://:redis-pw@r:6379/4"
    ).masked()
    assert shown["broker_url"] == "amqp://pushworker:***@rabbit.internal:5672/pushworker"
    assert shown["flow_redis_url"] == "redis://:***@r:6379/4"
    assert not [value for value in shown.values() if PASSWORD in value or "redis-pw" in value]


NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("countdown", "eta", "seconds"),
    [
        (0.39, None, 1),  # kombu would truncate it to 0 and refuse it
        (1.0, None, 1),
        (1.2, None, 2),  # never earlier than asked
        (300, None, 300),
        (None, NOW + timedelta(seconds=0.2), 1),
        (None, (NOW + timedelta(seconds=2.5)).isoformat(), 3),
        (None, NOW - timedelta(seconds=5), None),  # already due: no delay
        (0, None, None),
        (-1, None, None),
        (None, None, None),
    ],
)
def test_delays_become_whole_seconds_rounded_up(
    countdown: float | None, eta: datetime | str | None, seconds: int | None
) -> None:
    assert delayed_delivery_seconds(countdown, eta, NOW) == seconds


def test_the_app_sends_sub_second_retries_to_rabbitmq_as_whole_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only on RabbitMQ: Redis' ETA handling takes fractions as they are."""
    from tasks.app import PushworkerCelery

    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(Celery, "send_task", lambda self, name, *a, **o: sent.append(o))
    for url in (AMQP, "redis://r:6379/0"):
        app = PushworkerCelery(broker=url)
        app.send_task("pushworker.step.login", ["j", 5], {}, countdown=0.39, queue="pushworker")
    assert [options["countdown"] for options in sent] == [1, 0.39]
    assert sent[0]["eta"] is None and sent[0]["queue"] == "pushworker"


def test_readyz_asks_an_amqp_broker_with_a_handshake() -> None:
    """/readyz on RabbitMQ: a connection is made (kombu), not a Redis PING; nothing listening
    on the port is a failure, which readyz reports as unavailable."""
    from worker.api.routes import _ping_broker

    _ping_broker("memory://")  # kombu's in-process transport: connects
    with pytest.raises(OSError):
        _ping_broker("amqp://guest:guest@127.0.0.1:1//")
