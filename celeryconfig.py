"""Celery settings for the push worker. Values explained where they are not Celery's defaults.

The values pushworker chooses come from its settings (``worker.core.settings``), so a variable
has one default and one validation wherever it is read.
"""

import math

from worker.core.brokers import celery_broker_options
from worker.core.queues import DEFAULT_QUEUE, SEAL_TASK, WEBHOOK_QUEUE, WEBHOOK_TASK
from worker.core.settings import get_settings as _get_settings

# Underscored, as _push_timeout below: helpers of this file, not Celery settings.
_settings = _get_settings()

broker_url = _settings.broker_url
# Job state and events live in the database; Celery keeps no results (nothing to leak, no keys).
result_backend = None
task_ignore_result = True

# JSON only: no pickle from the broker, and messages that non-Python producers can write.
task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"

# At-least-once delivery: a step whose worker dies is redelivered; steps are idempotent and
# guarded by claims in the database, and a step whose worker keeps dying fails its job after
# PUSHWORKER_MAX_ATTEMPTS claims, so redelivery is bounded.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# A pool process whose resident memory passed PUSHWORKER_WORKER_MAX_MEMORY MiB is replaced once
# its task ends (no task is cut short; the new process warms up in the background). A safety
# net against growth in a long-lived process, whatever its cause: the pool processes stay near
# 110 MiB through bursts of thousands of jobs (docs/benchmarks.md, capacity model). 0: never
# replaced. Celery (billiard) compares the process's peak RSS (getrusage), which a forked child
# starts from its parent's: a cap under the main process's size replaces the child after every
# task.
if _settings.worker_max_memory:
    worker_max_memory_per_child = _settings.worker_max_memory * 1024  # Celery counts KiB

# What depends on the broker (worker.core.brokers). Redis: unacked messages return after the
# visibility timeout, which exceeds the longest push; every retry delay (PUSHWORKER_RETRY_MAX,
# 300 s) stays far under it. RabbitMQ: quorum queues on topic exchanges, persistent messages,
# publisher confirms; an unacked message returns as soon as its consumer's connection drops.
# Producers use the same options, so every process declares each queue alike.
globals().update(celery_broker_options(broker_url, _settings.push_timeout))
_push_timeout = math.ceil(_settings.push_timeout)

# Queues. `pushworker` (the default) carries jobs that name no Docker host and the periodic
# tasks below; `pushworker.<host>` carries the jobs whose image is on the Docker Engine named
# <host> (PUSHWORKER_DOCKER_HOSTS). tasks.dispatch picks the queue of each job's chain, and a
# worker started with PUSHWORKER_WORKER_HOST=<host> consumes `pushworker.<host>` on top of its
# -Q queues (tasks.app). Explicit queues win over these routes.
task_default_queue = DEFAULT_QUEUE
task_routes = {
    # Webhook deliveries run on their own queue (and worker): a receiver that hangs or answers
    # slowly never holds a pool slot a push needs. An exact name wins over the glob below.
    WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
    "pushworker.*": {"queue": DEFAULT_QUEUE},
}
task_time_limit = _push_timeout + 60
task_soft_time_limit = _push_timeout

# Celery beat: republish jobs that were committed but never reached the broker, and watch
# every registry's health so a failing credential is seen before a push fails (worker.health:
# a registry.health event and an error line on every change of state). Run exactly one beat.
beat_schedule = {
    "reconcile-unpublished-jobs": {
        "task": "pushworker.maintenance.reconcile",
        "schedule": _settings.reconcile_every,
    },
    # Seal the event log's chains (worker.store.seals): a chain's newest events are named by a
    # seal within this many seconds.
    "seal-event-log": {
        "task": SEAL_TASK,
        "schedule": _settings.seal_every,
    },
    "registry-health": {
        "task": "pushworker.health.check_registries",
        "schedule": _settings.health_every,
    },
    # Plan webhook deliveries from the event log (each subscription's cursor) and send the due
    # ones (worker.webhooks), on the webhook queue.
    "webhook-deliveries": {
        "task": WEBHOOK_TASK,
        "schedule": _settings.webhook_every,
        "options": {"queue": WEBHOOK_QUEUE},
    },
}

broker_connection_retry_on_startup = True
worker_hijack_root_logger = False
worker_send_task_events = False
timezone = "UTC"
enable_utc = True

# Every message passes the message guard (worker.core.messages) before Celery's strategy sees it: a
# message that is not a well-formed JSON call of one of our tasks is recorded and acknowledged,
# never handed to the pool, never requeued (tasks.consumer).
worker_consumer = "tasks.consumer:GuardedConsumer"
