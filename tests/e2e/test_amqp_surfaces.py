"""The HTTP API and webhooks with RabbitMQ as the broker: the same tests as on Redis, unchanged.

This module's ``e2e`` is ``tests/e2e/test_amqp_broker.py``'s (a worker on the stack's RabbitMQ
vhost, quorum queues, publisher confirms); the API server (a real uvicorn process), the webhook
worker and beat are started here with that environment, so a push enqueued through the API and
the deliveries that report it all travel through RabbitMQ.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import E2E
from tests.e2e.test_amqp_broker import e2e
from tests.e2e.test_api import (
    ApiServer,
    serving_api,
    test_a_push_through_the_api_is_pushed_and_followed_to_its_end,
)
from tests.e2e.test_webhooks import (
    hooks,
    subscribe,
    test_a_push_produces_a_signed_job_succeeded_delivery,
    test_a_receiver_answering_500_then_200_gets_two_attempts,
)

__all__ = [
    "e2e",
    "hooks",
    "subscribe",
    "test_a_push_produces_a_signed_job_succeeded_delivery",
    "test_a_push_through_the_api_is_pushed_and_followed_to_its_end",
    "test_a_receiver_answering_500_then_200_gets_two_attempts",
]


@pytest.fixture(scope="module")
def api_server(e2e: E2E) -> Iterator[ApiServer]:
    """``test_api``'s server, on this module's RabbitMQ environment."""
    assert e2e.env["PUSHWORKER_BROKER_URL"].startswith("amqp://")
    with serving_api(e2e, "e2e-amqp") as server:
        yield server
