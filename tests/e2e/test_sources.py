"""Sources other than the Docker Engine, on the real stack: a worker on the skopeo queue with no
Docker socket at all, the TLS and plain registries with htpasswd, images written byte by byte
(a two-platform OCI index, a docker-archive), never pulled.

The skopeo worker's HOME and XDG_RUNTIME_DIR hold a stale ``~/.docker/config.json`` and
``containers/auth.json`` naming both registries with a wrong password: the copies here succeed
with the registry records' credentials all the same. The last test turns it around: the host's
files hold the right password, the seam is given a wrong one, and nothing is copied."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness.stack import RegistryEndpoint
from harness.worker import CeleryProcess
from tests.e2e.conftest import ALTERNATIVE_ID, E2E, HARBOR_ID, password_of, wait_for_job
from tests.support.oci import INDEX, write_docker_archive, write_oci_layout
from worker.core.settings import get_settings
from worker.producer import enqueue_push
from worker.store.db import session_scope
from worker.store.models import Event, PushJob

ACCEPT = ", ".join(
    [
        INDEX,
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@pytest.fixture(scope="module")
def sources_dir(e2e: E2E) -> Path:
    directory = e2e.workdir / "sources"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def skopeo_worker(e2e: E2E, sources_dir: Path) -> Iterator[CeleryProcess]:
    home = e2e.workdir / "skopeo-home"
    stale = {"auths": {endpoint.host: {"auth": base64.b64encode(b"stale:wrong").decode()}
                       for endpoint in (e2e.stack.tls, e2e.stack.plain)}}  # fmt: skip
    for path in (home / ".docker" / "config.json", home / "run" / "containers" / "auth.json",
                 home / ".config" / "containers" / "auth.json"):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stale))
    env = {
        **e2e.env,
        "PUSHWORKER_SOURCES_DIR": str(sources_dir),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "XDG_CONFIG_HOME": str(home / ".config"),
    }
    worker = CeleryProcess(
        env, e2e.workdir / "skopeo-worker.log", queues="pushworker.skopeo", concurrency=2,
        name=f"skopeo-{uuid.uuid4().hex[:6]}@%h",
    )  # fmt: skip
    # No Docker socket: a skopeo worker must not need one.
    worker.env.pop("DOCKER_HOST", None)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(autouse=True)
def _producer_sees_the_sources_dir(
    sources_dir: Path, skopeo_worker: CeleryProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHWORKER_SOURCES_DIR", str(sources_dir))
    get_settings.cache_clear()


def head(endpoint: RegistryEndpoint, repository: str, reference: str) -> str | None:
    """The digest the registry itself serves (asked over HTTP, not through the project)."""
    response = requests.head(
        f"{endpoint.url}/v2/{repository}/manifests/{reference}",
        auth=(endpoint.user, endpoint.password),
        verify=endpoint.ca_file or True,
        headers={"Accept": ACCEPT},
        timeout=10,
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return str(response.headers["Docker-Content-Digest"])


def manifest(endpoint: RegistryEndpoint, repository: str, reference: str) -> dict[str, object]:
    response = requests.get(
        f"{endpoint.url}/v2/{repository}/manifests/{reference}",
        auth=(endpoint.user, endpoint.password),
        verify=endpoint.ca_file or True,
        headers={"Accept": ACCEPT},
        timeout=10,
    )
    response.raise_for_status()
    document: dict[str, object] = response.json()
    return document


def ran_on(worker: CeleryProcess, job_id: str) -> set[str]:
    """The actors of the job's step events: which processes ran its steps."""
    with session_scope() as session:
        rows = session.query(Event).filter(Event.job_id == job_id, Event.step.isnot(None)).all()
        return {row.actor for row in rows if row.actor.startswith("worker:")}


def push(source: str, registry_id: int, repository: str, **extra: object) -> PushJob:
    job_id = enqueue_push(
        source=source, registry_id=registry_id, repository=repository, tag="1",
        requested_by="e2e:sources", **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    return wait_for_job(job_id, timeout=180)


def test_an_oci_index_reaches_the_tls_registry_whole(
    e2e: E2E, sources_dir: Path, skopeo_worker: CeleryProcess
) -> None:
    image = write_oci_layout(sources_dir / "multi", layer_bytes=64 * 1024)
    repository = f"sources/oci-{uuid.uuid4().hex[:8]}"
    job = push("oci-layout:multi", HARBOR_ID, repository)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    tls = e2e.stack.tls
    assert job.source_digest == image.index_digest and job.digest == image.index_digest
    assert head(tls, repository, "1") == image.index_digest
    served = manifest(tls, repository, "1")
    assert served["mediaType"] == INDEX
    for platform, digest in image.manifests.items():
        assert head(tls, repository, digest) == digest, platform
    pids = {str(pid) for pid in skopeo_worker.pids()}
    actors = ran_on(skopeo_worker, job.id)
    assert actors and all(actor.rsplit(":", 1)[1] in pids for actor in actors)


def test_a_promotion_between_the_two_registries_keeps_the_digest(
    e2e: E2E, sources_dir: Path
) -> None:
    image = write_oci_layout(sources_dir / "promote", layer_bytes=32 * 1024)
    repository = f"sources/promote-{uuid.uuid4().hex[:8]}"
    first = push("oci-layout:promote", HARBOR_ID, repository)
    assert first.status == "succeeded", first.error_message
    promoted = push(f"registry:{HARBOR_ID}/{repository}:1", ALTERNATIVE_ID, repository)
    assert promoted.status == "succeeded", (promoted.error_code, promoted.error_message)
    assert promoted.source_digest == image.index_digest == promoted.digest
    plain = e2e.stack.plain
    assert head(plain, repository, "1") == image.index_digest
    for digest in image.manifests.values():
        assert head(plain, repository, digest) == digest


def test_a_docker_archive_reaches_the_registry(e2e: E2E, sources_dir: Path) -> None:
    archive = write_docker_archive(sources_dir / "app.tar", layer_bytes=32 * 1024)
    repository = f"sources/archive-{uuid.uuid4().hex[:8]}"
    job = push("docker-archive:app.tar", HARBOR_ID, repository)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    tls = e2e.stack.tls
    assert head(tls, repository, "1") == job.digest == job.source_digest
    config = manifest(tls, repository, "1")["config"]
    assert isinstance(config, dict) and config["digest"] == archive.config_digest


def test_a_refused_destination_copies_nothing_and_falls_back_only_when_asked(
    e2e: E2E, sources_dir: Path
) -> None:
    image = write_oci_layout(sources_dir / "refused", layer_bytes=16 * 1024)
    repository = f"sources/refused-{uuid.uuid4().hex[:8]}"
    tls, plain = e2e.stack.tls, e2e.stack.plain
    with password_of(HARBOR_ID, "wrong-password"):
        failed = push("oci-layout:refused", HARBOR_ID, repository, fallback=[])
        assert failed.status == "failed"
        assert failed.error_code == "authentication_failed", failed.error_message
        assert head(tls, repository, "1") is None and head(plain, repository, "1") is None
        for digest in image.manifests.values():
            assert head(tls, repository, digest) is None
        moved = push("oci-layout:refused", HARBOR_ID, repository, fallback=[ALTERNATIVE_ID])
    assert moved.status == "succeeded", (moved.error_code, moved.error_message)
    assert moved.effective_registry_id == ALTERNATIVE_ID
    assert head(plain, repository, "1") == image.index_digest
    assert head(tls, repository, "1") is None
    with session_scope() as session:
        types = [e.type for e in session.query(Event).filter(Event.job_id == moved.id)]
    assert "fallback.applied" in types


def test_a_file_outside_the_sources_dir_is_refused_before_anything_is_queued(
    e2e: E2E, sources_dir: Path
) -> None:
    (sources_dir / "escape").symlink_to(e2e.workdir)
    with session_scope() as session:
        before = session.query(PushJob).count()
    for spec in ("oci-layout:../", "oci-layout:escape", "docker-archive:/etc/passwd"):
        with pytest.raises(Exception, match="outside the sources directory"):
            push(spec, HARBOR_ID, "sources/never")
    with session_scope() as session:
        assert session.query(PushJob).count() == before


def test_right_credentials_in_the_hosts_files_are_not_used_either(
    e2e: E2E, sources_dir: Path, tmp_path: Path
) -> None:
    """The seam's own check: with the host's ~/.docker/config.json and containers/auth.json
    holding the registry's *right* password (a bare skopeo copy with that HOME succeeds: the
    control), the seam given a wrong password fails with an authentication error and nothing
    is copied. Only the per-call authfile ever speaks for the job."""
    import subprocess

    from worker.core.credentials import Credential, Secret
    from worker.core.errors import AuthenticationError
    from worker.seams.registry_http import RegistryEndpoint as Endpoint
    from worker.seams.skopeo import CopySource, RegistryAccess, Skopeo

    tls = e2e.stack.tls
    assert tls.ca_file is not None
    right = {"auths": {tls.host: {"auth": base64.b64encode(
        f"{tls.user}:{tls.password}".encode()).decode()}}}  # fmt: skip
    home = tmp_path / "home"
    for path in (home / ".docker" / "config.json", home / "run" / "containers" / "auth.json"):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(right))
    image = write_oci_layout(sources_dir / "stale-right", layer_bytes=8 * 1024)
    control, refused = (
        f"sources/control-{uuid.uuid4().hex[:8]}",
        f"sources/stale-{uuid.uuid4().hex[:8]}",
    )
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text(Path(tls.ca_file).read_text())
    bare = subprocess.run(
        ["/usr/bin/skopeo", "copy", "--quiet", "--all", "--dest-cert-dir", str(certs),
         f"oci:{image.path}", f"docker://{tls.host}/{control}:1"],
        env={"HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bare.returncode == 0, bare.stderr  # the host's files do authenticate a bare skopeo
    assert head(tls, control, "1") == image.index_digest
    endpoint = Endpoint(HARBOR_ID, tls.url, tls.host, ca_cert=Path(tls.ca_file).read_text())
    wrong = RegistryAccess(endpoint, Credential(tls.user, Secret("wrong-password"), "secret"))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HOME", home), ("XDG_RUNTIME_DIR", home / "run")):
            patch.setenv(name, str(value))
        with pytest.raises(AuthenticationError):
            Skopeo().copy(CopySource("oci", str(image.path)), f"{tls.host}/{refused}:1", wrong)
    assert head(tls, refused, "1") is None
    for digest in image.manifests.values():
        assert head(tls, refused, digest) is None


def test_a_promotion_asked_through_the_http_api(e2e: E2E, sources_dir: Path) -> None:
    """``POST /v1/pushes`` with a ``source`` on a real uvicorn process: a producer token scoped
    to the destination alone is refused (a promotion reads with the source registry's
    credential), one scoped to both gets a job that the skopeo worker carries out."""
    from tests.e2e.test_api import start_api
    from worker.tokens import create_token

    image = write_oci_layout(sources_dir / "via-api", layer_bytes=16 * 1024)
    repository = f"sources/api-{uuid.uuid4().hex[:8]}"
    first = push("oci-layout:via-api", HARBOR_ID, repository)
    assert first.status == "succeeded", first.error_message
    suffix = uuid.uuid4().hex[:6]
    narrow, _ = create_token(f"dest-only-{suffix}", "producer", actor="operator:e2e",
                             registry_ids=[ALTERNATIVE_ID])  # fmt: skip
    both, _ = create_token(f"both-{suffix}", "producer", actor="operator:e2e",
                           registry_ids=[ALTERNATIVE_ID, HARBOR_ID])  # fmt: skip
    body = {"source": f"registry:{HARBOR_ID}/{repository}:1", "registry_id": ALTERNATIVE_ID,
            "repository": repository, "tag": "1"}  # fmt: skip
    url, process = start_api(e2e.env, e2e.workdir / f"sources-api-{suffix}.log")
    try:
        refused = requests.post(
            f"{url}/v1/pushes", json=body, timeout=30,
            headers={"Authorization": f"Bearer {narrow}", "Idempotency-Key": f"n-{suffix}"},
        )  # fmt: skip
        assert refused.status_code == 403, refused.text
        assert f"may not push to registry {HARBOR_ID}" in refused.json()["message"]
        made = requests.post(
            f"{url}/v1/pushes", json=body, timeout=30,
            headers={"Authorization": f"Bearer {both}", "Idempotency-Key": f"b-{suffix}"},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        assert made.json()["source_kind"] == "registry"
    finally:
        process.terminate()
        process.wait(timeout=30)
    job = wait_for_job(made.json()["id"], timeout=180)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert job.source_digest == image.index_digest == job.digest
    assert head(e2e.stack.plain, repository, "1") == image.index_digest
    with session_scope() as session:  # the refused request made no job
        jobs = session.query(PushJob).filter(PushJob.repository == repository).all()
        assert len(jobs) == 2
