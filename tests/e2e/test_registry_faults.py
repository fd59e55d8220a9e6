"""A misbehaving registry never becomes a refused credential (issue 13, items 1 and 2).

Every test pushes through ``FaultProxy`` (tests/support/faultproxy.py) in front of the real plain
registry, with the real worker process, Redis and dockerd. Each test gets its own proxy and its
own registry record (ids from 900) whose fallback chain is the TLS registry: a fallback applied
by mistake would show as a push there. Where the image went is read from the daemon's own push
events and from the registries' APIs, not from the project.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness.images import daemon_pushes
from tests.e2e.conftest import E2E, HARBOR_ID, served_digest, wait_for_job
from tests.support.faultproxy import Fault, FaultProxy
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import Event, PushJob
from worker.store.queries import select_events

TAG = "v1"
_ids = itertools.count(900)  # the e2e database is new for each session


@dataclass
class Faulty:
    """A registry record pointing at a fresh proxy in front of the plain registry."""

    proxy: FaultProxy
    registry_id: int


def _faulty_registry(e2e: E2E, *, password: str | None = None) -> Iterator[Faulty]:
    host, port = e2e.stack.plain.host.rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    registry_id = next(_ids)
    spec = RegistrySpec(
        name=f"faulty-{registry_id}",
        url=proxy.url,
        kind="generic",
        username=e2e.stack.plain.user,
        secret=password or e2e.stack.plain.password,
        insecure=True,
        fallback_chain=[HARBOR_ID],
    )
    with session_scope() as session:
        create_registry(session, spec, registry_id=registry_id)
    try:
        yield Faulty(proxy, registry_id)
    finally:
        proxy.close()


@pytest.fixture
def faulty(e2e: E2E) -> Iterator[Faulty]:
    # A new proxy (a new host:port) per test: the engine's remembered logins never span tests,
    # so a fault at login always meets a real login.
    yield from _faulty_registry(e2e)


@dataclass
class Run:
    job: PushJob
    events: list[Event]
    pushes: list[str]
    repository: str

    def story(self) -> list[tuple[Any, ...]]:
        """The job's timeline, for assertion messages."""
        return [
            (e.type, e.step, e.attempt, e.payload.get("error_code"), e.payload.get("observed"))
            for e in self.events
            if e.type != "step.progress"
        ]

    def failures(self) -> list[Event]:
        return [e for e in self.events if e.type == "step.failed"]


def run_job(
    e2e: E2E, image: str, faulty: Faulty, *faults: Fault, deadline: float | None = None
) -> Run:
    repository = f"faults/app-{uuid.uuid4().hex[:8]}"
    for fault in faults:
        faulty.proxy.add(fault)
    with daemon_pushes(e2e.api) as pushes:
        job_id = enqueue_push(
            source_image=image, registry_id=faulty.registry_id, repository=repository, tag=TAG,
            requested_by="fault-tests", fallback=[HARBOR_ID], deadline=deadline,
        )  # fmt: skip
        job = wait_for_job(job_id, timeout=150)
    with session_scope() as session:
        timeline = list(select_events(session, job_id=job_id))
    return Run(job, timeline, pushes.references, repository)


def assert_never_fell_back(e2e: E2E, run: Run, faulty: Faulty) -> None:
    """No fallback, no refusal recorded, nothing in the fallback registry, every push of the
    daemon to the proxy (the job's own registry)."""
    story = run.story()
    types = [e.type for e in run.events]
    assert "fallback.applied" not in types, story
    codes = {e.payload.get("error_code") for e in run.failures()}
    assert not codes & {"authentication_failed", "fallback_exhausted"}, story
    assert run.job.effective_registry_id == faulty.registry_id, story
    assert served_digest(e2e.stack.tls, run.repository, TAG) is None, story
    assert all(ref.startswith(f"{faulty.proxy.host}/") for ref in run.pushes), (run.pushes, story)


def assert_outcome(e2e: E2E, run: Run, expected: str) -> None:
    """``succeeded`` (and the plain registry serves the job's digest) or ``failed:<code>``."""
    story = run.story()
    got = run.job.status if run.job.status != "failed" else f"failed:{run.job.error_code}"
    assert got == expected, story
    if expected == "succeeded":
        assert served_digest(e2e.stack.plain, run.repository, TAG) == run.job.digest, story


# --- the incident's class -----------------------------------------------------------------------


def test_a_500_window_during_the_push_never_falls_back(
    e2e: E2E, image: str, faulty: Faulty
) -> None:
    """The incident: 500 on every request for 4 s from the push's first request (the login's two
    ``GET /v2/`` pass). dockerd's ping fails, it pushes without credentials and reports
    "unauthorized"; the worker checks the credential over HTTP, and the job is retried and
    succeeds in its own registry. Never a fallback."""
    window = Fault(status=500, skip=2, seconds=4)
    run = run_job(e2e, image, faulty, window)
    assert window.hits > 0, faulty.proxy.seen
    assert_never_fell_back(e2e, run, faulty)
    assert_outcome(e2e, run, "succeeded")


def test_one_failed_ping_then_unauthorized_is_a_misbehaving_registry(
    e2e: E2E, image: str, faulty: Faulty
) -> None:
    """The mechanism alone: one 500 on dockerd's ping at the push makes it push without
    credentials and report "unauthorized"; the check finds the credential working, so the
    failure is ``registry_misbehaved`` (retried), and both answers are recorded."""
    ping = Fault(method="GET", path="^/v2/$", status=500, skip=2, times=1)
    run = run_job(e2e, image, faulty, ping)
    assert_never_fell_back(e2e, run, faulty)
    assert_outcome(e2e, run, "succeeded")
    failed = run.failures()
    assert [e.payload["error_code"] for e in failed] == ["registry_misbehaved"], run.story()
    observed = failed[0].payload["observed"]
    assert "unauthorized" in observed["engine"], observed
    assert observed["registry"] == "GET /v2/ accepted the credential", observed
    assert failed[0].payload["will_retry"] is True


def test_unauthorized_while_the_check_gets_5xx_is_unavailable(
    e2e: E2E, image: str, faulty: Faulty
) -> None:
    """dockerd's ping and the worker's check both get 500: the refusal cannot be confirmed, so
    the failure is the check's own (``registry_unavailable``), retried, never a refusal."""
    pings = Fault(method="GET", path="^/v2/$", status=500, skip=2, times=2)
    run = run_job(e2e, image, faulty, pings)
    assert_never_fell_back(e2e, run, faulty)
    assert_outcome(e2e, run, "succeeded")
    failed = run.failures()
    assert [e.payload["error_code"] for e in failed] == ["registry_unavailable"], run.story()
    observed = failed[0].payload["observed"]
    assert "unauthorized" in observed["engine"], observed
    assert observed["registry"].startswith("registry_unavailable: "), observed
    assert "HTTP 500" in observed["registry"], observed


def test_a_wrong_password_is_a_confirmed_refusal_and_falls_back(e2e: E2E, image: str) -> None:
    """Regression guard: a really wrong password is refused by the engine and by the HTTP check,
    so the job falls back to the TLS registry (its chain) and lands there; both answers are
    recorded on the refusal."""
    for faulty in _faulty_registry(e2e, password="not-the-password"):
        run = run_job(e2e, image, faulty)
        story = run.story()
        refusals = [e for e in run.failures() if e.payload["error_code"] == "authentication_failed"]
        assert [(e.step, e.registry_id) for e in refusals] == [("login", faulty.registry_id)]
        observed = refusals[0].payload["observed"]
        assert "401" in observed["engine"] and "HTTP 401" in observed["registry"], observed
        assert "not-the-password" not in str(run.events[-1].payload) + str(observed)
        assert ("fallback.applied", "login") in [(e.type, e.step) for e in run.events], story
        assert (run.job.status, run.job.effective_registry_id) == ("succeeded", HARBOR_ID), story
        assert served_digest(e2e.stack.tls, run.repository, TAG) == run.job.digest
        assert run.pushes == [f"{e2e.stack.tls.host}/{run.repository}:{TAG}"]


# --- the misbehaviour matrix --------------------------------------------------------------------

LOGIN = r"^/v2/$"
UPLOADS = r"^/v2/faults/app-[0-9a-f]+/blobs/uploads/"
MANIFEST = r"^/v2/faults/app-[0-9a-f]+/manifests/"


@dataclass(frozen=True)
class Case:
    fault: Fault
    expected: str  # "succeeded" or "failed:<code>"
    #: Error codes of the step.failed events the worker records (the engine's own retries of
    #: layer uploads record none).
    failures: tuple[str, ...] = ()
    #: The job's flow-control deadline in seconds (None: the setting's hour).
    deadline: float | None = None
    #: Instead of an exact list: every recorded failure has this code, and there are several.
    #: A throttled registry is waited for until the job's deadline, not for a number of tries,
    #: so how many 429s a job meets depends on the clock.
    repeated: str | None = None


def _case(expected: str, *failures: str, **fault: Any) -> Case:
    return Case(Fault(**fault), expected, tuple(failures))


UNAV, THROTTLED = "registry_unavailable", "registry_throttled"
# dockerd makes two GET /v2/ per failing login; the worker's own digest check (HEAD manifest)
# runs only after the push. Persistent blob-upload faults are left out: dockerd retries each
# layer upload itself after 5, 10 and 15 s, so they would take minutes per case.
MATRIX: dict[str, Case] = {
    "login-500": _case("succeeded", UNAV, method="GET", path=LOGIN, status=500, times=2),
    "login-502": _case("succeeded", UNAV, method="GET", path=LOGIN, status=502, times=2),
    "login-503": _case("succeeded", UNAV, method="GET", path=LOGIN, status=503, times=2),
    "login-429": _case(
        "succeeded", THROTTLED, method="GET", path=LOGIN, status=429, retry_after="1", times=2
    ),
    "login-reset": _case("succeeded", UNAV, method="GET", path=LOGIN, reset=True, times=1),
    "login-slow": _case("succeeded", method="GET", path=LOGIN, delay=3, times=1),
    "login-503-persistent": _case(
        f"failed:{UNAV}", UNAV, UNAV, UNAV, method="GET", path=LOGIN, status=503
    ),
    # Waiting is not failing (flow control): a registry that keeps answering 429 is waited for,
    # after each Retry-After, until the job's deadline; then the job fails with its own code.
    "login-429-persistent": Case(
        Fault(method="GET", path=LOGIN, status=429, retry_after="1"),
        "failed:throttled_past_deadline",
        deadline=6,
        repeated=THROTTLED,
    ),
    "upload-post-500": _case("succeeded", method="POST", path=UPLOADS, status=500, times=1),
    "upload-put-503": _case("succeeded", method="PUT", path=UPLOADS, status=503, times=1),
    "upload-patch-reset": _case("succeeded", method="PATCH", path=UPLOADS, reset=True, times=1),
    "upload-post-429": _case(
        "succeeded", THROTTLED, method="POST", path=UPLOADS, status=429, retry_after="1", times=1
    ),
    "upload-patch-slow": _case("succeeded", method="PATCH", path=UPLOADS, delay=3, times=1),
    "manifest-put-500": _case("succeeded", UNAV, method="PUT", path=MANIFEST, status=500, times=1),
    "manifest-put-502": _case("succeeded", UNAV, method="PUT", path=MANIFEST, status=502, times=1),
    "manifest-put-503": _case("succeeded", UNAV, method="PUT", path=MANIFEST, status=503, times=1),
    "manifest-put-429": _case(
        "succeeded", THROTTLED, method="PUT", path=MANIFEST, status=429, retry_after="1", times=1
    ),
    "manifest-put-reset": _case(
        "succeeded", UNAV, method="PUT", path=MANIFEST, reset=True, times=1
    ),
    "manifest-put-slow": _case("succeeded", method="PUT", path=MANIFEST, delay=3, times=1),
    "manifest-put-503-persistent": _case(
        f"failed:{UNAV}", UNAV, UNAV, UNAV, method="PUT", path=MANIFEST, status=503
    ),
    "digest-500": _case("succeeded", UNAV, method="HEAD", path=MANIFEST, status=500, times=1),
    "digest-502": _case("succeeded", UNAV, method="HEAD", path=MANIFEST, status=502, times=1),
    "digest-503": _case("succeeded", UNAV, method="HEAD", path=MANIFEST, status=503, times=1),
    "digest-429": _case(
        "succeeded", THROTTLED, method="HEAD", path=MANIFEST, status=429, retry_after="2", times=1
    ),
    "digest-reset": _case("succeeded", UNAV, method="HEAD", path=MANIFEST, reset=True, times=1),
    "digest-slow": _case("succeeded", method="HEAD", path=MANIFEST, delay=3, times=1),
    "digest-503-persistent": _case(
        f"failed:{UNAV}", UNAV, UNAV, UNAV, method="HEAD", path=MANIFEST, status=503
    ),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_registry_misbehaviour_matrix(e2e: E2E, image: str, faulty: Faulty, name: str) -> None:
    """Each (phase, fault): the outcome expected (retried by the engine or by the step, then
    succeeded; or failed with a retryable code once the tries are used up), the failures the
    worker recorded, and never a fallback."""
    case = MATRIX[name]
    fault = Fault(**{k: v for k, v in vars(case.fault).items() if not k.startswith("_")})
    run = run_job(e2e, image, faulty, fault, deadline=case.deadline)
    story = run.story()
    assert fault.hits > 0, f"{name}: the fault never fired: {faulty.proxy.seen}"
    assert_never_fell_back(e2e, run, faulty)
    assert_outcome(e2e, run, case.expected)
    got = tuple(e.payload["error_code"] for e in run.failures())
    if case.repeated is None:
        assert got == case.failures, f"{name}: {story}"
    else:
        throttled = [code for code in got if code == case.repeated]
        assert len(throttled) >= 2, f"{name}: {story}"
        assert set(got) <= {case.repeated, case.expected.partition(":")[2]}, f"{name}: {story}"
    if name == "digest-429":
        first = run.failures()[0].payload
        # The registry asked for 2 s: the wait is max(backoff, 2) bounded by retry_max (2 s).
        assert first["retry_after"] == 2.0 and first["retry_in"] == 2.0, first
