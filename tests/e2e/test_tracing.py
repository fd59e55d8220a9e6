"""Tracing on the real stack: a real OTLP/HTTP receiver process on loopback
(``tests.support.otlp_receiver``), a real Celery worker on real Redis, the real Docker Engine and
registries. The worker and this process (the producer) are turned on by ``OTEL_*`` variables only.

A pushed job is one trace: the producer's span, through the broker, to each step's span, with
the daemon's push and the registry's HTTP requests as children of the step that made them; a job
that falls back after an authentication refusal is one trace too, across both registries. The
events of the job name that trace, the worker's log lines too, and no span holds a password.

A module of its own worker (on the session's second broker database, with OTEL_* set), so the
session's worker, which has no tracing, takes none of these jobs.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from harness.publish import BrokerDispatcher
from harness.stack import Stack
from tests.e2e.conftest import (
    ALTERNATIVE_ID,
    BROKER_DB,
    E2E,
    HARBOR_ID,
    e2e_env,
    password_of,
    running_e2e,
    wait_for_job,
)
from tests.support.otlp_receiver import OtlpReceiver
from worker.core import tracing
from worker.core.settings import get_settings
from worker.engine.dispatch import set_dispatcher
from worker.producer import enqueue_push
from worker.store.db import session_scope
from worker.store.queries import select_events

Span = dict[str, Any]
STEPS = ("resolve_credentials", "login", "tag", "push")


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(tmp_path_factory.mktemp("otlp")) as running:
        yield running


@pytest.fixture(scope="module")
def e2e(
    stack: Stack, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    """The session's ``e2e``, with tracing turned on by OTEL_* in the worker and here."""
    workdir = tmp_path_factory.mktemp("e2e-tracing")
    url = f"{stack.redis_url}/{BROKER_DB + 1}"
    env = e2e_env(
        stack, workdir, url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_SERVICE_NAME="pushworker-e2e",
        # Spans leave a process within a fifth of a second (the default waits 5 s).
        OTEL_BSP_SCHEDULE_DELAY="200",
        # Room for a registry to come back between two tries (the retry test).
        PUSHWORKER_MAX_ATTEMPTS="5", PUSHWORKER_RETRY_BASE="2", PUSHWORKER_RETRY_MAX="5",
    )  # fmt: skip
    redis.Redis.from_url(url).flushdb()
    dispatcher = BrokerDispatcher(url)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        set_dispatcher(dispatcher)
        tracing.reset()  # this process reads the variables above at its next enqueue
        try:
            with running_e2e(stack, workdir, env) as e2e:
                yield e2e
        finally:
            tracing.reset()
            set_dispatcher(None)
            dispatcher.close()
    get_settings.cache_clear()


def repo() -> str:
    return f"traced/app-{uuid.uuid4().hex[:8]}"


def trace_of(
    receiver: OtlpReceiver, job_id: str, done: Callable[[list[Span]], bool], timeout: float = 60
) -> list[Span]:
    """Every span of the trace the job's producer span started, once ``done`` says all are in."""
    tracing.force_flush()
    deadline = time.monotonic() + timeout
    spans: list[Span] = []
    while time.monotonic() < deadline:
        roots = [
            s
            for s in receiver.spans()
            if s["name"] == "pushworker.enqueue_push"
            and s["attributes"].get("pushworker.job.id") == job_id
        ]
        if roots:
            spans = [s for s in receiver.spans() if s["trace_id"] == roots[0]["trace_id"]]
            if done(spans):
                return spans
        time.sleep(0.2)
    names = sorted(s["name"] for s in spans)
    raise AssertionError(f"the trace of job {job_id} is incomplete after {timeout} s: {names}")


def by_id(spans: list[Span]) -> dict[str, Span]:
    return {s["span_id"]: s for s in spans}


def ancestors(span: Span, spans: list[Span]) -> list[Span]:
    """The span's parent, its parent's parent, and so on to the root."""
    index, chain = by_id(spans), []
    parent = index.get(span["parent_span_id"])
    while parent is not None:
        chain.append(parent)
        parent = index.get(parent["parent_span_id"])
    return chain


def step_spans(spans: list[Span], step: str, registry_id: int) -> list[Span]:
    return [
        s
        for s in spans
        if s["name"] == f"step {step}"
        and s["attributes"].get("pushworker.registry.id") == registry_id
    ]


def children(parent: Span, spans: list[Span], name: str | None = None) -> list[Span]:
    return [
        s
        for s in spans
        if s["parent_span_id"] == parent["span_id"] and (name is None or s["name"] == name)
    ]


def steps_done(registry_id: int) -> Callable[[list[Span]], bool]:
    """All four step spans of ``registry_id`` (and the daemon's push under the last) are in."""

    def done(spans: list[Span]) -> bool:
        pushes = step_spans(spans, "push", registry_id)
        return all(step_spans(spans, step, registry_id) for step in STEPS) and any(
            children(push, spans, "docker push") for push in pushes
        )

    return done


def assert_no_secret(spans: list[Span], *secrets: str) -> None:
    """No attribute, event attribute, name or status message of any span holds a secret."""
    text = json.dumps(spans)
    for secret in secrets:
        assert secret and secret not in text


def assert_events_name_the_trace(job_id: str, trace_id: str) -> None:
    """Every event of the job carries the trace's id (an auditor's way from the log to it)."""
    with session_scope() as session:
        recorded = [(e.type, e.trace_id) for e in select_events(session, job_id=job_id)]
    assert recorded, "the job has events"
    assert {found for _, found in recorded} == {trace_id}, recorded


def assert_log_lines_name_the_trace(e2e: E2E, job_id: str, trace_id: str) -> None:
    """The worker's lines about the job (its own and the event lines) carry the trace id."""
    lines = [line for line in e2e.worker.log_lines() if line.get("job_id") == job_id]
    assert lines, "the worker logged the job"
    assert {line.get("trace_id") for line in lines} == {trace_id}, lines[:3]


def test_a_pushed_job_is_one_trace_from_the_producer_to_each_step(
    e2e: E2E, receiver: OtlpReceiver, image: str
) -> None:
    """Producer span -> broker -> each step's span -> the daemon's push and the registry's
    HTTP requests, one trace id; the step spans carry registry, repository, digest, try,
    outcome; the events and log lines name the trace; no span holds a password."""
    repository = repo()
    job_id = enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=repository, tag="v1",
        requested_by="tracing-e2e",
    )  # fmt: skip
    job = wait_for_job(job_id)
    assert job.status == "succeeded"
    spans = trace_of(receiver, job_id, steps_done(HARBOR_ID))
    (root,) = [s for s in spans if s["name"] == "pushworker.enqueue_push"]
    trace_id = root["trace_id"]
    assert root["parent_span_id"] == ""
    assert root["resource"]["service.name"] == "pushworker-e2e"
    assert any(e["name"] == "job.enqueued" for e in root["events"])
    host = e2e.stack.tls.host
    for step in STEPS:
        (span,) = step_spans(spans, step, HARBOR_ID)
        assert root in ancestors(span, spans), f"step {step} is not under the producer's span"
        # Through the broker: a Celery publish span and the worker's run span in between.
        assert any(a["name"].startswith("run/pushworker.step.") for a in ancestors(span, spans))
        attributes = span["attributes"]
        assert attributes["pushworker.job.id"] == job_id
        assert attributes["pushworker.registry.host"] == host
        assert attributes["pushworker.repository"] == repository
        assert attributes["pushworker.attempt"] == 1
        assert attributes["pushworker.outcome"] == "succeeded"
        assert span["status"]["code"] != "STATUS_CODE_ERROR"
        assert {"step.started", "step.succeeded"} <= {e["name"] for e in span["events"]}
        assert span["resource"]["pushworker.process"] == "worker"
    (push,) = step_spans(spans, "push", HARBOR_ID)
    assert push["attributes"]["pushworker.digest"] == job.digest
    (daemon_push,) = children(push, spans, "docker push")
    assert daemon_push["kind"] == "SPAN_KIND_CLIENT"
    assert daemon_push["attributes"]["pushworker.digest"] == job.digest
    assert daemon_push["attributes"]["pushworker.bytes_pushed"] > 0
    assert daemon_push["attributes"]["pushworker.registry.host"] == host
    requests = children(push, spans, "HEAD")  # is it there already? then: is it there now?
    assert requests, [s["name"] for s in children(push, spans)]
    for request in requests:
        attributes = request["attributes"]
        assert attributes["http.request.method"] == "HEAD"
        assert f"{attributes['server.address']}:{attributes['server.port']}" == host
        assert attributes["url.full"] == f"{e2e.stack.tls.url}/v2/{repository}/manifests/v1"
    assert 200 in {r["attributes"]["http.response.status_code"] for r in requests}
    (login,) = step_spans(spans, "login", HARBOR_ID)
    assert children(login, spans, "docker login") or any(
        e["name"] == "step.skipped" for e in login["events"]
    )
    assert_no_secret(spans, e2e.stack.tls.password, e2e.stack.plain.password)
    assert_events_name_the_trace(job_id, trace_id)
    assert_log_lines_name_the_trace(e2e, job_id, trace_id)


def test_a_job_that_falls_back_is_one_trace_across_both_registries(
    e2e: E2E, receiver: OtlpReceiver, image: str
) -> None:
    """Registry 5 refuses the credential, the job falls back to 4 (its explicit chain): the
    refused login (the daemon's and the registry's own answer), the fallback and every step at 4
    are in the producer's trace; the refused password is in no span."""
    repository = repo()
    wrong = f"not-the-password-{uuid.uuid4().hex[:6]}"
    with password_of(HARBOR_ID, wrong):
        job_id = enqueue_push(
            source_image=image, registry_id=HARBOR_ID, repository=repository, tag="v1",
            requested_by="tracing-e2e", fallback=[ALTERNATIVE_ID],
        )  # fmt: skip
        job = wait_for_job(job_id)
    assert (job.status, job.effective_registry_id) == ("succeeded", ALTERNATIVE_ID)
    spans = trace_of(receiver, job_id, steps_done(ALTERNATIVE_ID))
    (root,) = [s for s in spans if s["name"] == "pushworker.enqueue_push"]
    (refused,) = step_spans(spans, "login", HARBOR_ID)
    assert root in ancestors(refused, spans)
    assert refused["status"]["code"] == "STATUS_CODE_ERROR"
    assert refused["attributes"]["error.type"] == "authentication_failed"
    assert refused["attributes"]["pushworker.registry.host"] == e2e.stack.tls.host
    assert {"step.failed", "fallback.applied"} <= {e["name"] for e in refused["events"]}
    (fallback,) = [e for e in refused["events"] if e["name"] == "fallback.applied"]
    assert fallback["attributes"]["pushworker.fallback.to_registry_id"] == ALTERNATIVE_ID
    (daemon_login,) = children(refused, spans, "docker login")
    assert daemon_login["attributes"]["error.type"] == "authentication_failed"
    # The refusal is confirmed by asking the registry itself: its 401, in the same step.
    checks = children(refused, spans, "GET")
    assert 401 in {c["attributes"]["http.response.status_code"] for c in checks}
    assert not step_spans(spans, "push", HARBOR_ID)
    for step in STEPS:
        (span,) = step_spans(spans, step, ALTERNATIVE_ID)
        assert root in ancestors(span, spans), f"step {step} at 4 is not under the producer's"
        # The new chain was published by the refused login's step.
        assert refused in ancestors(span, spans)
        assert span["attributes"]["pushworker.registry.host"] == e2e.stack.plain.host
    (push,) = step_spans(spans, "push", ALTERNATIVE_ID)
    assert push["attributes"]["pushworker.digest"] == job.digest
    assert children(push, spans, "docker push")
    assert_no_secret(spans, wrong, e2e.stack.tls.password, e2e.stack.plain.password)
    assert_events_name_the_trace(job_id, root["trace_id"])


def wait_for_event(job_id: str, type: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            if any(e.type == type for e in select_events(session, job_id=job_id)):
                return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} recorded no {type} within {timeout} s")


def test_a_retried_step_stays_in_the_jobs_trace(
    e2e: E2E, receiver: OtlpReceiver, image: str
) -> None:
    """Registry 5 down: the first step that reaches it (the login, or the push when the engine
    reuses a login it accepted minutes ago) fails and is retried; the registry back, a later
    try succeeds. Every try is a span of the job's one trace, each retry under the task run of
    the try before (Celery publishes the retry from there)."""
    repository = repo()
    e2e.stack.service("down", "tls-registry")
    try:
        job_id = enqueue_push(
            source_image=image, registry_id=HARBOR_ID, repository=repository, tag="v1",
            requested_by="tracing-e2e",
        )  # fmt: skip
        wait_for_event(job_id, "step.failed")
    finally:
        e2e.stack.service("up", "tls-registry")
    job = wait_for_job(job_id)
    assert job.status == "succeeded"
    with session_scope() as session:
        failed_step = next(
            e.step for e in select_events(session, job_id=job_id) if e.type == "step.failed"
        )
    assert failed_step in ("login", "push")
    steps_in = steps_done(HARBOR_ID)

    def retried_and_done(spans: list[Span]) -> bool:
        # The failed try's span (the push's with its daemon call) arrives before the retry's:
        # wait for the try that succeeded too.
        return steps_in(spans) and any(
            t["attributes"].get("pushworker.outcome") == "succeeded"
            for t in step_spans(spans, failed_step, HARBOR_ID)
        )

    spans = trace_of(receiver, job_id, retried_and_done)
    (root,) = [s for s in spans if s["name"] == "pushworker.enqueue_push"]
    tries = sorted(step_spans(spans, failed_step, HARBOR_ID), key=lambda s: int(s["start"]))
    assert len(tries) >= 2
    assert [t["attributes"]["pushworker.attempt"] for t in tries] == list(range(1, len(tries) + 1))
    for failed, retried in itertools.pairwise(tries):
        assert failed["attributes"]["error.type"] == "registry_unavailable"
        assert failed["status"]["code"] == "STATUS_CODE_ERROR"
        assert failed["attributes"]["pushworker.step.next"] == "retry"
        run_of_failed = by_id(spans)[failed["parent_span_id"]]
        assert run_of_failed in ancestors(retried, spans)
    assert tries[-1]["attributes"]["pushworker.outcome"] == "succeeded"
    assert root in ancestors(tries[-1], spans)
    assert_events_name_the_trace(job_id, root["trace_id"])


def test_every_span_of_the_module_is_free_of_passwords(e2e: E2E, receiver: OtlpReceiver) -> None:
    """Whatever else the receiver got from these runs (Celery's spans, the worker's start),
    no password of either registry is in it."""
    tracing.force_flush()
    spans = receiver.spans()
    assert spans
    assert_no_secret(spans, e2e.stack.tls.password, e2e.stack.plain.password)
