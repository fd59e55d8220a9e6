"""Tracing in process, with an in-memory exporter: when the OTEL_* variables turn it on, the span
tree of a job (the producer's span, each step's span, the daemon's and the registry's calls as
children of their step), the attributes its events add, the log lines' ids, the API request's
span continuing the caller's trace, and no secret in any span even with a password and a bearer
token in play. The real worker, broker and OTLP receiver: tests/e2e/test_tracing.py."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import requests
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.stub_seams import (
    DIGEST,
    HOST,
    PASSWORD,
    SOURCE,
    TOKEN,
    StubDockerApi,
    StubRegistry,
    TracedChain,
    stub_http,
)
from worker.api.app import create_app
from worker.core import tracing
from worker.core.credentials import Credential, Secret
from worker.core.errors import ValidationError
from worker.core.logs import configure_logging, get_logger
from worker.core.settings import Settings
from worker.engine.dispatch import set_dispatcher
from worker.engine.pipeline import StepRunner
from worker.engine.steps import STEP_NAMES
from worker.producer import enqueue_push, publish
from worker.registries import RegistrySpec, create_registry
from worker.seams.docker_engine import DockerEngine
from worker.seams.registry_http import RegistryEndpoint
from worker.seams.skopeo import CopySource, RegistryAccess, Skopeo
from worker.store.db import session_scope
from worker.store.models import PushJob
from worker.store.queries import select_events
from worker.tokens import create_token

OTEL_NAMES = (
    "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)  # fmt: skip


# --- when it is on --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "pw", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, None),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console, OTLP"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, None),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),
    ],
)
def test_only_the_otel_variables_turn_tracing_on(
    environ: dict[str, str], exporters: tuple[str, ...] | None
) -> None:
    """An exporter named or an OTLP endpoint set: on; nothing, ``none`` or the SDK disabled:
    off, whatever else is set."""
    found = tracing.requested(environ)
    assert (found.exporters if found else None) == exporters


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL":
          "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_naming_the_variable(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        tracing.requested(environ)


@pytest.fixture
def no_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in OTEL_NAMES:
        monkeypatch.delenv(name, raising=False)
    tracing.reset()
    yield
    tracing.reset()


def test_off_without_variables_the_api_is_a_no_op(no_otel: None) -> None:
    """No OTEL_* variable: nothing is set up, spans are the API's no-op ones, no trace id."""
    assert tracing.configure("producer", celery=True) is False
    assert not tracing.enabled()
    assert isinstance(tracing.tracer(), trace.NoOpTracer)
    with tracing.span("anything") as span:
        assert not span.is_recording()
        assert tracing.current_trace_id() is None


# --- a job's spans, with the real seams in front of stand-ins ----------------------------------


@pytest.fixture
def spans(no_otel: None) -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter


@pytest.fixture
def chain(sqlite_url: str) -> Iterator[TracedChain]:
    with session_scope() as session:
        spec = RegistrySpec(name="harbor", url=f"https://{HOST}", username="u", secret=PASSWORD)
        create_registry(session, spec, registry_id=5)
    traced = TracedChain()
    engine = DockerEngine(api=StubDockerApi())
    settings = dataclasses.replace(Settings.from_env(), retry_base=0.0, retry_max=0.0)
    traced.runner = StepRunner(
        dispatcher=traced, engine_factory=lambda: engine, settings=settings, http_factory=stub_http
    )
    set_dispatcher(traced)
    yield traced
    set_dispatcher(None)


def push_job() -> str:
    return enqueue_push(
        source_image=SOURCE, registry_id=5, repository="team/app", tag="v1", requested_by="t"
    )


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def everything(span: ReadableSpan) -> str:
    """All a span says, as text: name, attributes, events, links, status, resource."""
    return json.dumps(
        {
            "name": span.name,
            "attributes": dict(span.attributes or {}),
            "events": [(e.name, dict(e.attributes or {})) for e in span.events],
            "links": [dict(link.attributes or {}) for link in span.links],
            "status": span.status.description,
            "resource": dict(span.resource.attributes),
        },
        default=str,
    )


def test_off_a_job_records_no_trace_id(no_otel: None, chain: TracedChain) -> None:
    """Without OTEL_* variables a whole job runs with no span recorded: its events name no
    trace."""
    job_id = push_job()
    assert not tracing.enabled()
    with session_scope() as session:
        recorded = select_events(session, job_id=job_id)
        job = session.get(PushJob, job_id)
    assert job is not None and job.status == "succeeded"
    assert len(recorded) == 10 and {e.trace_id for e in recorded} == {None}


def test_a_job_is_one_span_tree_with_its_steps_and_their_calls(
    spans: InMemorySpanExporter, chain: TracedChain
) -> None:
    """The producer's span holds each step's span; the daemon's calls and the registry's HTTP
    requests are children of the step that made them; one trace id throughout."""
    job_id = push_job()
    found = list(spans.get_finished_spans())
    (root,) = named(found, "pushworker.enqueue_push")
    assert root.parent is None and root.context is not None
    assert {s.context.trace_id for s in found if s.context} == {root.context.trace_id}
    steps = {step: named(found, f"step {step}") for step in STEP_NAMES}
    assert all(len(spans_of) == 1 for spans_of in steps.values()), steps
    for (span,) in steps.values():
        assert parent_of(span) == span_id(root)
    (login,) = steps["login"]
    (daemon_login,) = named(found, "docker login")
    assert parent_of(daemon_login) == span_id(login)
    (tag,) = steps["tag"]
    (daemon_tag,) = named(found, "docker tag")
    assert parent_of(daemon_tag) == span_id(tag)
    (push,) = steps["push"]
    (daemon_push,) = named(found, "docker push")
    assert parent_of(daemon_push) == span_id(push)
    assert daemon_push.kind == trace.SpanKind.CLIENT
    assert daemon_push.attributes == {
        tracing.REGISTRY_HOST: HOST, tracing.REPOSITORY: "team/app", tracing.DIGEST: DIGEST,
        tracing.BYTES_PUSHED: 9,
    }  # fmt: skip
    # The registry's answer to "what do you serve now?": a 401, the token, then the HEAD again.
    requests_of_push = [s for s in found if parent_of(s) == span_id(push) and s != daemon_push]
    assert [s.name for s in requests_of_push] == ["HEAD", "GET", "HEAD"]
    head = requests_of_push[-1]
    assert head.attributes == {
        "http.request.method": "HEAD", "server.address": "reg.example.com", "server.port": 10443,
        "url.full": f"https://{HOST}/v2/team/app/manifests/v1", "http.response.status_code": 200,
    }  # fmt: skip
    token_request = requests_of_push[1]
    assert token_request.attributes is not None
    assert token_request.attributes["url.full"] == f"https://{HOST}/token"  # no query
    assert requests_of_push[0].attributes == {
        **(head.attributes or {}),
        "http.response.status_code": 401,
        "error.type": "401",
    }
    with session_scope() as session:
        job = session.get(PushJob, job_id)
        assert job is not None and job.status == "succeeded"


def test_step_spans_carry_what_the_job_recorded(
    spans: InMemorySpanExporter, chain: TracedChain
) -> None:
    """Registry id and host, repository, try, outcome, digest: from the job's events, each of
    which is also an event of its step's span."""
    job_id = push_job()
    found = list(spans.get_finished_spans())
    (push,) = named(found, "step push")
    assert push.attributes is not None
    assert {k: push.attributes.get(k) for k in (
        tracing.JOB_ID, tracing.STEP, tracing.REGISTRY_ID, tracing.REGISTRY_HOST,
        tracing.REPOSITORY, tracing.ATTEMPT, tracing.OUTCOME, tracing.DIGEST,
    )} == {
        tracing.JOB_ID: job_id, tracing.STEP: "push", tracing.REGISTRY_ID: 5,
        tracing.REGISTRY_HOST: HOST, tracing.REPOSITORY: "team/app", tracing.ATTEMPT: 1,
        tracing.OUTCOME: "succeeded", tracing.DIGEST: DIGEST,
    }  # fmt: skip
    assert [e.name for e in push.events] == ["step.started", "step.succeeded", "job.succeeded"]
    with session_scope() as session:
        ids = [e.id for e in select_events(session, job_id=job_id) if e.step == "push"]
    assert [e.attributes[tracing.EVENT_ID] for e in push.events[:2]] == ids  # type: ignore[index]
    (root,) = named(found, "pushworker.enqueue_push")
    assert [e.name for e in root.events] == ["job.enqueued"]


def test_a_refused_login_marks_its_step_failed_with_the_code_only(
    spans: InMemorySpanExporter, chain: TracedChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure is recorded as its error code (``error.type`` and the status), never as its
    message."""
    monkeypatch.setattr(StubRegistry, "password", "the-one-it-takes-now")
    assert chain.runner is not None
    engine = chain.runner.engine_factory()
    refusal = "unauthorized: incorrect username or password"

    def refuse(**_kwargs: Any) -> None:
        from docker.errors import APIError

        answer = requests.Response()
        answer.status_code = 500  # as dockerd answers a login the registry refused
        raise APIError("500 Server Error", response=answer, explanation=refusal)

    engine._api.login = refuse  # type: ignore[attr-defined]
    push_job()
    found = list(spans.get_finished_spans())
    (login,) = named(found, "step login")
    assert login.status.status_code == trace.StatusCode.ERROR
    assert login.status.description == "authentication_failed"
    assert login.attributes is not None
    assert login.attributes["error.type"] == "authentication_failed"
    assert "step.failed" in [e.name for e in login.events]
    (daemon_login,) = named(found, "docker login")
    assert daemon_login.attributes is not None
    assert daemon_login.attributes["error.type"] == "authentication_failed"
    assert not [s for s in found if refusal in everything(s)]


def test_no_span_holds_a_secret(spans: InMemorySpanExporter, chain: TracedChain) -> None:
    """The registry's password (sent as Basic to the token realm) and its bearer token are in
    no span: not in an attribute, an event, a status, a link or the resource."""
    push_job()
    found = list(spans.get_finished_spans())
    assert len(found) > 10
    basic = base64.b64encode(f"u:{PASSWORD}".encode()).decode()
    for span in found:
        text = everything(span)
        for secret in (PASSWORD, TOKEN, basic):
            assert secret not in text, span.name


def test_event_attributes_are_an_allow_list() -> None:
    """Only the listed columns and payload keys of an event reach a span."""
    fields = {
        "id": 7, "job_id": "j", "type": "step.succeeded", "step": "login", "registry_id": 5,
        "attempt": 2, "actor": "worker:h:1", "repository": "team/app", "outcome": "succeeded",
        "hash": "h", "prev_hash": "p",
        "payload": {"username": "admin", "credential_source": "env:REGISTRY_CREDENTIAL_X",
                    "error_message": "anything at all", "hint": "h", "bytes_pushed": 12,
                    "reference": f"{HOST}/team/app:v1", "observed": {"engine": "x"}},
    }  # fmt: skip
    assert tracing.event_attributes(fields) == {
        tracing.EVENT_ID: 7, tracing.JOB_ID: "j", tracing.STEP: "login", tracing.REGISTRY_ID: 5,
        tracing.REPOSITORY: "team/app", tracing.ATTEMPT: 2, tracing.OUTCOME: "succeeded",
        tracing.BYTES_PUSHED: 12, tracing.REGISTRY_HOST: HOST,
    }  # fmt: skip


def test_the_skopeo_copy_is_a_span_with_its_digest_and_exit_code(
    spans: InMemorySpanExporter,
) -> None:
    def runner(argv: Any, env: Mapping[str, str], timeout: float) -> tuple[int, bytes, bytes]:
        digestfile = argv[argv.index("--digestfile") + 1]
        with open(digestfile, "w") as out:
            out.write(DIGEST)
        return 0, b"", b""

    endpoint = RegistryEndpoint(id=5, url=f"https://{HOST}", host=HOST)
    credential = Credential("u", Secret(PASSWORD), "secret")
    source = CopySource("oci", "/srv/images/app")
    digest = Skopeo(runner=runner).copy(
        source, f"{HOST}/team/app:v1", RegistryAccess(endpoint, credential)
    )
    assert digest == DIGEST
    (copy,) = spans.get_finished_spans()
    assert copy.name == "skopeo copy"
    assert copy.attributes == {
        "process.executable.name": "skopeo", "pushworker.source.transport": "oci",
        tracing.REGISTRY_HOST: HOST, tracing.REGISTRY_ID: 5, "process.exit.code": 0,
        tracing.DIGEST: DIGEST,
    }  # fmt: skip


# --- logs ---------------------------------------------------------------------------------------


def test_log_lines_inside_a_span_carry_its_ids_and_others_none(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """structlog's lines and the standard library's (Celery's) alike."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("json")
    get_logger("pushworker.test").info("outside")
    with tracing.span("work") as span:
        get_logger("pushworker.test").info("inside")
        logging.getLogger("celery.worker").warning("celery inside")
        context = span.get_span_context()
    lines = {line["event"]: line for line in map(json.loads, out.getvalue().splitlines())}
    assert "trace_id" not in lines["outside"] and "span_id" not in lines["outside"]
    for event in ("inside", "celery inside"):
        assert lines[event]["trace_id"] == format(context.trace_id, "032x")
        assert lines[event]["span_id"] == format(context.span_id, "016x")


# --- one trace per job, whoever publishes -----------------------------------------------------


def test_a_republished_job_continues_the_trace_of_its_run(
    spans: InMemorySpanExporter, sqlite_url: str
) -> None:
    """Reconcile republishing a job (in its own span) publishes it in the job's trace, with a
    link to the span that republished it; the recorded events name that trace."""
    with session_scope() as session:
        spec = RegistrySpec(name="harbor", url=f"https://{HOST}", username="u", secret=PASSWORD)
        create_registry(session, spec, registry_id=5)
    published: list[str | None] = []

    class Recording:
        def start_chain(self, job_id: str, registry_id: int) -> None:
            published.append(tracing.current_trace_id())

    set_dispatcher(Recording())
    try:
        job_id = push_job()
        with tracing.span("reconcile") as reconcile:
            assert publish(job_id, 5)
    finally:
        set_dispatcher(None)
    with session_scope() as session:
        (enqueued,) = select_events(session, job_id=job_id)
    job_trace = enqueued.trace_id
    assert job_trace is not None
    assert published == [job_trace, job_trace]
    (republish,) = named(list(spans.get_finished_spans()), "pushworker.republish")
    assert [link.context.span_id for link in republish.links] == [
        reconcile.get_span_context().span_id
    ]


# --- the API ----------------------------------------------------------------------------------


def test_an_api_request_continues_the_callers_trace(
    spans: InMemorySpanExporter, sqlite_url: str
) -> None:
    """``traceparent`` from the platform: the request's span is its child, the producer's span
    the request's; the method, route and status are recorded, the bearer token is not."""
    with session_scope() as session:
        spec = RegistrySpec(name="harbor", url=f"https://{HOST}", username="u", secret=PASSWORD)
        create_registry(session, spec, registry_id=5)
    token, _ = create_token("platform", "producer", actor="operator:test", registry_ids=[5])

    class Recording:
        def start_chain(self, job_id: str, registry_id: int) -> None:
            return None

    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    set_dispatcher(Recording())
    try:
        with TestClient(create_app()) as client:
            answer = client.post(
                "/v1/pushes",
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "build-1",
                         "traceparent": f"00-{caller_trace}-{caller_span}-01"},
                json={"source_image": SOURCE, "registry_id": 5, "repository": "team/app",
                      "tag": "v1"},
            )  # fmt: skip
    finally:
        set_dispatcher(None)
    assert answer.status_code == 201, answer.text
    found = list(spans.get_finished_spans())
    (request,) = [s for s in found if s.kind == trace.SpanKind.SERVER]
    assert request.name == "POST /v1/pushes"
    assert request.context is not None and request.parent is not None
    assert format(request.context.trace_id, "032x") == caller_trace
    assert format(request.parent.span_id, "016x") == caller_span
    assert request.attributes == {
        "http.request.method": "POST", "url.path": "/v1/pushes", "http.route": "/v1/pushes",
        "http.response.status_code": 201,
    }  # fmt: skip
    (enqueue,) = named(found, "pushworker.enqueue_push")
    # In the caller's trace, under the request (directly, or through spans another provider of
    # this test process records: the e2e modules that ran before leave theirs installed).
    assert enqueue.context is not None and enqueue.parent is not None
    assert format(enqueue.context.trace_id, "032x") == caller_trace
    by_id = {span_id(s): s for s in found}
    if parent_of(enqueue) in by_id:
        assert parent_of(enqueue) == span_id(request)
    for span in found:
        assert token not in everything(span)
