"""The end-to-end harness: a real Celery worker process on real Redis, a real Docker Engine and
two real registries with htpasswd authentication (``scripts/stack``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import redis
import requests
from cryptography.fernet import Fernet

from harness.images import new_image
from harness.stack import RegistryEndpoint, Stack
from harness.worker import CeleryProcess
from worker.core.settings import get_settings
from worker.registries import RegistrySpec, create_registry, update_registry
from worker.store.db import session_scope
from worker.store.migrate import upgrade
from worker.store.models import JobStatus, PushJob

# Another e2e run on this machine can use another broker database (its flushdb is per db).
BROKER_DB = int(os.environ.get("PUSHWORKER_E2E_BROKER_DB", "11"))
HARBOR_ID, ALTERNATIVE_ID = 5, 4  # the incident's Harbor and its GitLab alternative


@dataclass
class E2E:
    stack: Stack
    env: dict[str, str]
    workdir: Path
    worker_log: Path
    api: docker.APIClient
    worker: CeleryProcess

    @property
    def broker_url(self) -> str:
        return self.env["PUSHWORKER_BROKER_URL"]


@pytest.fixture(scope="session")
def e2e(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    """Settings shared by this process and the worker process, and the worker itself."""
    workdir = tmp_path_factory.mktemp("e2e")
    env = e2e_env(stack, workdir, f"{stack.redis_url}/{BROKER_DB}")
    os.environ.update(env)  # before tasks.app is imported: celeryconfig reads the broker URL
    get_settings.cache_clear()
    redis.Redis.from_url(env["PUSHWORKER_BROKER_URL"]).flushdb()
    with running_e2e(stack, workdir, env) as e2e:
        yield e2e


def e2e_env(stack: Stack, workdir: Path, broker_url: str, **extra: str) -> dict[str, str]:
    """The settings of an end-to-end worker on ``broker_url``, and of this process."""
    return {
        "PUSHWORKER_DATABASE_URL": f"sqlite:///{workdir / 'pushworker.db'}",
        "PUSHWORKER_BROKER_URL": broker_url,
        "PUSHWORKER_SECRET_KEY": Fernet.generate_key().decode(),
        "DOCKER_HOST": stack.docker_host,
        "PUSHWORKER_LOG_FORMAT": "json",
        "PUSHWORKER_MAX_ATTEMPTS": "3",
        "PUSHWORKER_RETRY_BASE": "0.5",
        "PUSHWORKER_RETRY_MAX": "2",
        "HOME": str(workdir / "home"),
        **extra,
    }


@contextmanager
def running_e2e(stack: Stack, workdir: Path, env: dict[str, str]) -> Iterator[E2E]:
    """A fresh database with the registries, and a worker with ``env`` (already this process's
    settings) for the duration of the block."""
    upgrade(env["PUSHWORKER_DATABASE_URL"])
    _add_registries(stack)
    log_path = workdir / "worker.log"
    worker = _start_worker(env, log_path)
    try:
        api = docker.APIClient(base_url=stack.docker_host)
        yield E2E(stack, env, workdir, log_path, api, worker)
    finally:
        worker.stop()


@pytest.fixture(autouse=True)
def _e2e_settings(e2e: E2E, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in e2e.env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()


def _add_registries(stack: Stack) -> None:
    with session_scope() as session:
        create_registry(session, _spec("harbor", "harbor", stack.tls), registry_id=HARBOR_ID)
        create_registry(
            session,
            _spec("gitlab", "gitlab", stack.plain, insecure=True),
            registry_id=ALTERNATIVE_ID,
        )


def _spec(name: str, kind: str, endpoint: RegistryEndpoint, insecure: bool = False) -> RegistrySpec:
    ca = Path(endpoint.ca_file).read_text() if endpoint.ca_file else None
    return RegistrySpec(
        name=name,
        url=endpoint.url,
        kind=kind,
        username=endpoint.user,
        secret=endpoint.password,
        ca_cert=ca,
        insecure=insecure,
    )


def _start_worker(env: dict[str, str], log_path: Path) -> CeleryProcess:
    # Concurrency 4: the load test measures the worker as operators would run it.
    return CeleryProcess(env, log_path, concurrency=4, name=f"e2e-{os.getpid()}@%h").start()


# --- helpers for the tests ---------------------------------------------------------------------


@pytest.fixture
def image(e2e: E2E) -> str:
    return new_image(e2e.api)


def wait_for_job(job_id: str, timeout: float = 120) -> PushJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            job = session.get(PushJob, job_id)
            assert job is not None
            if JobStatus(job.status).is_final:
                return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s")


@contextmanager
def password_of(registry_id: int, password: str) -> Iterator[None]:
    """Give a registry another stored password for the duration of the block."""
    e2e_password = _current_password(registry_id)
    with session_scope() as session:
        update_registry(session, registry_id, RegistrySpec(secret=password))
    try:
        yield
    finally:
        with session_scope() as session:
            update_registry(session, registry_id, RegistrySpec(secret=e2e_password))


def _current_password(registry_id: int) -> str:
    from worker.core.credentials import resolve_credential
    from worker.registries import get_registry

    with session_scope() as session:
        credential = resolve_credential(get_registry(session, registry_id))
        assert credential is not None
        return credential.password.reveal()


def served_digest(endpoint: RegistryEndpoint, repository: str, tag: str) -> str | None:
    """What the registry itself says, asked directly over HTTP (not through the project)."""
    response = requests.head(
        f"{endpoint.url}/v2/{repository}/manifests/{tag}",
        auth=(endpoint.user, endpoint.password),
        verify=endpoint.ca_file or True,
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        timeout=10,
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.headers["Docker-Content-Digest"]
