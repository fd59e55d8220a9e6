"""No way to reach an unintended host, on the real stack (real worker, Redis, dockerd, registries).

- A registry record stored before today's address rules (written directly into the database, an
  odd spelling of a host that resolves to a capture server) receives nothing: not through a push
  job's login, not through ``pushctl registry test``. The capture server is a plain TCP listener
  on 127.0.0.1 that records every connection, whoever makes it (the worker or dockerd).
- A removed registry receives no push through a fallback chain: neither when it was removed
  before the job (it left the chain) nor when it was removed while the job waited (the fallback
  skips it). Proven with the daemon's own push events and the registry's HTTP API.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.images import daemon_pushes
from harness.stack import RegistryEndpoint
from tests.e2e.conftest import E2E, password_of, served_digest, wait_for_job
from worker.core.credentials import encrypt_secret
from worker.core.errors import ValidationError
from worker.jobs import PushRequest, create_job
from worker.producer import enqueue_push, publish
from worker.registries import RegistrySpec, create_registry, remove_registry, update_registry
from worker.store.db import session_scope
from worker.store.models import JobStatus, PushJob, Registry
from worker.store.queries import select_events

TAG = "t1"


class CaptureServer:
    """Accepts and records every TCP connection on 127.0.0.1, then closes it at once (so that
    a client waiting for an answer fails fast instead of stalling)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append((str(peer[0]), int(peer[1])))
            conn.close()

    @contextmanager
    def running(self) -> Iterator[CaptureServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
            self.sock.close()


def _probe_capture(server: CaptureServer) -> None:
    """The capture server does record a connection (so that an empty record means something)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    for _ in range(50):
        if server.connections:
            break
        threading.Event().wait(0.05)
    assert len(server.connections) == 1
    server.connections.clear()


def _insert_old_record(url: str, host: str) -> int:
    """A registry row as a record saved before the address rules: written directly."""
    with session_scope() as session:
        newest = session.query(Registry.id).order_by(Registry.id.desc()).first()
        assert newest is not None, "the e2e stack registers its registries first"
        registry_id = int(newest[0]) + 1
        session.add(
            Registry(
                id=registry_id, name=f"old-{uuid.uuid4().hex[:8]}", url=url, host=host,
                kind="generic", username="capture-user", auth_required=True,
                credential_kind="secret", credential_secret=encrypt_secret("capture-secret"),
                insecure=True, fallback_chain=[],
            )
        )  # fmt: skip
    return registry_id


def _insert_old_job(registry_id: int, image: str, repository: str) -> str:
    """A queued job for that registry, as a job created before the rules: written directly."""
    with session_scope() as session:
        job = PushJob(
            source_image=image, repository=repository, tag=TAG,
            requested_registry_id=registry_id, effective_registry_id=registry_id,
            fallback_chain=[], status=JobStatus.QUEUED.value, attempt=1, requested_by="e2e",
        )  # fmt: skip
        session.add(job)
        session.flush()
        return job.id


#: Odd spellings of 127.0.0.1 (the capture server) that older rules stored as they were typed.
ODD_SPELLINGS = [
    ("https://LOCALHOST.:{port}", "LOCALHOST.:{port}"),
    ("https://localhost.:{port}", "localhost.:{port}"),
    ("http://127.1:{port}", "127.1:{port}"),
    ("https://127.0.0.1.:{port}", "127.0.0.1.:{port}"),
    ("https://\uff4cocalhost:{port}", "\uff4cocalhost:{port}"),  # full-width l
    # The incident's class: Docker Hub spelled with a trailing dot, saved as generic. Not the
    # capture server (no Docker Hub here), but no step may start and the daemon may not push.
    ("https://registry-1.docker.io.", "registry-1.docker.io."),
]


@pytest.mark.parametrize(("url", "host"), ODD_SPELLINGS)
def test_an_old_odd_record_sends_nothing_anywhere(
    e2e: E2E, image: str, url: str, host: str
) -> None:
    """A stored odd-spelled record pointing at the capture server: its queued push job fails
    (invalid_registry) before any login, a new job for it is refused, and ``pushctl registry
    test`` fails with exit code 2 and a fix; the capture server sees no connection at all, and
    the daemon performs no push."""
    server = CaptureServer()
    with server.running():
        _probe_capture(server)
        rid = _insert_old_record(url.format(port=server.port), host.format(port=server.port))
        repository = f"targets/odd-{uuid.uuid4().hex[:8]}"
        with daemon_pushes(e2e.api) as pushes:
            job_id = _insert_old_job(rid, image, repository)
            assert publish(job_id, rid)
            job = wait_for_job(job_id)
            with pytest.raises(ValidationError):
                enqueue_push(
                    source_image=image, registry_id=rid, repository=repository, tag=TAG,
                    requested_by="e2e",
                )  # fmt: skip
            tested = subprocess.run(
                [sys.executable, "-m", "worker.cli", "registry", "test", str(rid)],
                capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
            )  # fmt: skip
        assert server.connections == []
    assert pushes.references == []
    assert (job.status, job.error_code) == ("failed", "invalid_registry")
    assert f"pushctl registry update {rid} --url" in (job.error_message or "")
    with session_scope() as session:
        types = [e.type for e in select_events(session, job_id=job_id)]
    assert types == ["job.failed"]  # no step started, so no login was tried
    assert tested.returncode == 2, tested.stderr
    assert "stored address is refused" in tested.stdout or "canonical" in tested.stdout
    assert "Traceback" not in tested.stderr
    assert "capture-secret" not in tested.stdout + tested.stderr


def _registry(endpoint: RegistryEndpoint, label: str) -> int:
    ca = Path(endpoint.ca_file).read_text() if endpoint.ca_file else None
    spec = RegistrySpec(
        name=f"{label}-{uuid.uuid4().hex[:8]}", url=endpoint.url, kind="generic",
        username=endpoint.user, secret=endpoint.password, ca_cert=ca,
        insecure=endpoint.ca_file is None,
    )  # fmt: skip
    with session_scope() as session:
        return create_registry(session, spec).id


@pytest.fixture
def a_and_b(e2e: E2E) -> tuple[int, int]:
    """A (the TLS registry) falls back to B (the plain registry): fresh records per test."""
    a, b = _registry(e2e.stack.tls, "a"), _registry(e2e.stack.plain, "b")
    with session_scope() as session:
        update_registry(session, a, RegistrySpec(fallback_chain=[b]))
    return a, b


def test_a_removed_registry_leaves_the_chain_and_gets_nothing(
    e2e: E2E, image: str, a_and_b: tuple[int, int]
) -> None:
    """A -> [B], ``pushctl registry remove B``, A refuses the credential: the job fails
    (authentication_failed), B's chain entry is gone, and nothing was pushed anywhere."""
    a, b = a_and_b
    removed = subprocess.run(
        [sys.executable, "-m", "worker.cli", "registry", "remove", str(b)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    assert f"fallback chain of registries {a}" in removed.stdout
    repository = f"targets/removed-{uuid.uuid4().hex[:8]}"
    with password_of(a, "not-the-password"), daemon_pushes(e2e.api) as pushes:
        job_id = enqueue_push(
            source_image=image, registry_id=a, repository=repository, tag=TAG,
            requested_by="e2e",
        )  # fmt: skip
        job = wait_for_job(job_id)
    assert (job.status, job.error_code) == ("failed", "authentication_failed")
    assert job.fallback_chain == []
    assert pushes.references == []
    assert served_digest(e2e.stack.plain, repository, TAG) is None
    assert served_digest(e2e.stack.tls, repository, TAG) is None


def test_a_registry_removed_while_the_job_waits_is_skipped(
    e2e: E2E, image: str, a_and_b: tuple[int, int]
) -> None:
    """The job copied A -> [B]; B is removed before the job runs; A refuses: the fallback
    skips B (named in job.failed), the job fails with fallback_exhausted saying B was removed,
    and the daemon pushed nothing (B's API does not serve the tag)."""
    a, b = a_and_b
    repository = f"targets/waiting-{uuid.uuid4().hex[:8]}"
    with password_of(a, "not-the-password"), daemon_pushes(e2e.api) as pushes:
        with session_scope() as session:
            job_row, _ = create_job(
                session, PushRequest(image, a, repository, TAG, "e2e"), actor="producer:e2e"
            )
            job_id = job_row.id
        assert job_row.fallback_chain == [b]
        with session_scope() as session:
            remove_registry(session, b)
        assert publish(job_id, a)
        job = wait_for_job(job_id)
    assert (job.status, job.error_code) == ("failed", "fallback_exhausted")
    assert f"registry {b} was removed (skipped, nothing sent to it)" in (job.error_message or "")
    assert pushes.references == []
    assert served_digest(e2e.stack.plain, repository, TAG) is None
    with session_scope() as session:
        log = select_events(session, job_id=job_id)
    assert [(e.type, e.registry_id) for e in log if e.type == "fallback.applied"] == []
    (failed,) = [e for e in log if e.type == "job.failed"]
    assert failed.payload["skipped"] == [{"registry_id": b, "reason": f"registry {b} was removed"}]
