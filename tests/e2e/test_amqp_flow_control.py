"""Flow control with RabbitMQ as the broker: its state in the stack's Redis
(``PUSHWORKER_FLOW_REDIS_URL``), its polls delayed deliveries in RabbitMQ. The tests of
test_flow_control.py, unchanged, on the RabbitMQ worker of test_amqp_broker.py (a module of its
own: their module-scoped workers replace that module's worker until the module ends)."""

from __future__ import annotations

from tests.e2e.test_amqp_broker import e2e
from tests.e2e.test_flow_control import (
    test_a_registry_answering_429_above_3_pushes_gets_every_job_through,
    test_a_registry_capped_at_2_never_sees_more_and_another_is_not_held_up,
    two_workers,
)

__all__ = [
    "e2e",
    "test_a_registry_answering_429_above_3_pushes_gets_every_job_through",
    "test_a_registry_capped_at_2_never_sees_more_and_another_is_not_held_up",
    "two_workers",
]
