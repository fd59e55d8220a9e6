"""The compose deployment, for real: docker-compose.yml brought up on the stack's own Docker
Engine, and an image pushed through the composed worker.

Nothing here is pulled: ``scripts/compose-image`` builds the Python base from Debian's packages
(debootstrap of this machine's release), the project's image on it, and Redis, PostgreSQL and
RabbitMQ images from the same base; an override file made here puts those in place of the
official images the compose file names, and nothing else. Debian's docker-compose then runs the
project's own docker-compose.yml: the one-shot ``migrate``, the worker (the stack's engine
through its mounted socket, as the host's engine in production) and beat, on Redis, and again
with RabbitMQ as the broker (``deploy/compose.rabbitmq.yml``). The push goes to the stack's TLS
registry with htpasswd authentication; ``pushctl`` runs inside the worker's container.

The slowest e2e test: a few minutes when the images are cached (~/.cache/pushworker and the
stack's engine), longer on a fresh machine. A missing tool (debootstrap, docker-compose, the
docker CLI) fails it; nothing is skipped. Each test prints its timings.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
from cryptography.fernet import Fernet

from harness.images import daemon_pushes, new_image
from harness.stack import Stack, free_port
from tests.e2e.conftest import served_digest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compose-image"
TAG = "e2e-compose"  # the project's image: pushworker:e2e-compose
REGISTRY_ID = 5
CA_IN_CONTAINER = "/run/pushworker-e2e/ca.crt"
STEPS = ("resolve_credentials", "login", "tag", "push")
#: The machine's own HOME, read before any test gives the process a throwaway one: the script's
#: pip reads the machine's pip configuration there too, and its cache lives under it.
MACHINE_HOME = os.environ.get("HOME", str(Path.home()))

pytestmark = [pytest.mark.docker, pytest.mark.compose]


@pytest.fixture(autouse=True)
def _e2e_settings() -> None:
    """Replaces the package's: no worker runs on this host here; the composed one is tested."""


@pytest.fixture(scope="module")
def images(stack: Stack) -> dict[str, Any]:
    """The base, the project's image and the service images, on the stack's engine."""
    started = time.monotonic()
    result = subprocess.run(
        [str(SCRIPT), "--docker-host", stack.docker_host, "--tag", f"pushworker:{TAG}",
         "--services", "redis,postgres,rabbitmq"],
        capture_output=True, text=True, timeout=1800, check=False,
        env={**os.environ, "HOME": MACHINE_HOME},
    )  # fmt: skip
    assert result.returncode == 0, f"scripts/compose-image failed:\n{result.stderr[-4000:]}"
    built: dict[str, Any] = json.loads(result.stdout)
    print(f"\nimages in {time.monotonic() - started:.1f} s: {built['timings']}")
    return built


@dataclass
class Deployment:
    """One compose project on the stack's engine: its files, its .env, and the CLI."""

    name: str
    broker: str
    files: list[Path]
    env_file: Path
    docker_host: str
    settings: dict[str, str]
    log: list[str] = field(default_factory=list)

    def compose(
        self, *args: str, stdin: str | None = None, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("docker-compose")
        if binary is None:
            pytest.fail("docker-compose is missing: run scripts/bootstrap as root", pytrace=False)
        files = [arg for path in self.files for arg in ("-f", str(path))]
        # A clean environment: only the .env file made here fills the compose file's variables.
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
               "DOCKER_HOST": self.docker_host}  # fmt: skip
        result = subprocess.run(
            [binary, "--project-name", self.name, "--project-directory", str(ROOT), *files,
             "--env-file", str(self.env_file), *args],
            input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
            check=False,
        )  # fmt: skip
        self.log.append(f"$ docker-compose {' '.join(args)} -> {result.returncode}")
        if check:
            assert result.returncode == 0, (
                f"docker-compose {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stderr[-3000:]}\n{result.stdout[-2000:]}"
            )
        return result

    def pushctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """pushctl in the running worker's container, with the worker's settings."""
        return self.compose("exec", "-T", "worker", "pushctl", *args, stdin=stdin, timeout=300)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", timeout=120, check=False).stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest, stack: Stack, images: dict[str, Any], tmp_path: Path
) -> Iterator[Deployment]:
    """The compose project with ``request.param`` as its broker; down (volumes too) afterwards,
    whatever happened."""
    broker: str = request.param
    socket_path = stack.docker_host.removeprefix("unix://")
    settings = {
        "COMPOSE_PROFILES": "rabbitmq" if broker == "rabbitmq" else "",
        "PUSHWORKER_IMAGE_TAG": TAG,
        "REDIS_PASSWORD": secrets.token_hex(16),
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "RABBITMQ_PASSWORD": secrets.token_hex(16),
        "PUSHWORKER_SECRET_KEY": Fernet.generate_key().decode(),
        "DOCKER_GID": str(os.stat(socket_path).st_gid),
        "DOCKER_SOCKET": socket_path,
        # The pushworker containers use the host's network: ports nobody else holds.
        "REDIS_PORT": str(free_port()),
        "POSTGRES_PORT": str(free_port()),
        "RABBITMQ_PORT": str(free_port()),
        "PUSHWORKER_METRICS_PORT": str(free_port()),
        "PUSHWORKER_COPIER_METRICS_PORT": str(free_port()),
        "PUSHWORKER_API_PORT": str(free_port()),
        "PUSHWORKER_CONCURRENCY": "2",
        # Beat's reconcile every 5 s, so the test sees beat's task reach the worker.
        "PUSHWORKER_RECONCILE_EVERY": "5",
        "PUSHWORKER_OPERATOR": "compose-e2e",
    }
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    env_file.chmod(0o600)
    services = images["services"]
    # Only what cannot be pulled is replaced, plus the registry's CA for the worker.
    override = tmp_path / "override.yml"
    override.write_text(
        "services:\n"
        f"  redis:\n    image: {services['redis']}\n"
        f"  postgres:\n    image: {services['postgres']}\n"
        f"  rabbitmq:\n    image: {services['rabbitmq']}\n"
        f"  worker:\n    volumes:\n      - {stack.tls.ca_file}:{CA_IN_CONTAINER}:ro\n"
    )
    files = [ROOT / "docker-compose.yml"]
    if broker == "rabbitmq":
        files.append(ROOT / "deploy" / "compose.rabbitmq.yml")
    name = f"pwcompose{broker}{os.getpid()}"
    deployment = Deployment(name, broker, [*files, override], env_file, stack.docker_host, settings)
    try:
        yield deployment
    finally:
        # Captured: pytest shows it when the test failed.
        print(f"\n--- docker-compose logs of {name} ---\n{deployment.logs()[-20000:]}")
        started = time.monotonic()
        deployment.compose("down", "--volumes", "--remove-orphans", "--timeout", "20", check=False)
        print(f"compose down in {time.monotonic() - started:.1f} s")


def wait_for(what: str, check: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@pytest.mark.parametrize("deployment", ["redis", "rabbitmq"], indirect=True)
def test_a_push_through_the_composed_worker(deployment: Deployment, stack: Stack) -> None:
    """docker-compose up runs migrate once, then the worker and beat from the built image; a
    job given to the composed worker pushes a real image to an authenticating registry, whose
    own API then serves the digest the job recorded; the job's events verify; beat's tasks
    reach the worker; the worker's health check passes; no password is in any log."""
    api = docker.APIClient(base_url=stack.docker_host)
    started = time.monotonic()
    deployment.compose("up", "--detach", "--no-build", "worker", "beat", timeout=600)
    up = time.monotonic() - started
    wait_for(
        "the worker ready", lambda: " ready." in deployment.compose("logs", "worker").stdout, 120
    )
    ready = time.monotonic() - started

    # migrate ran once and exited 0 before the worker started (depends_on), and stays down.
    migrate = api.inspect_container(deployment.container("migrate"))
    assert migrate["State"]["Status"] == "exited" and migrate["State"]["ExitCode"] == 0
    assert api.inspect_container(deployment.container("beat"))["State"]["Running"]

    registry = stack.tls
    added = deployment.pushctl(
        "registry", "add", "harbor", registry.url, "--kind", "harbor", "--username", registry.user,
        "--password-stdin", "--ca-file", CA_IN_CONTAINER, "--id", str(REGISTRY_ID),
        stdin=registry.password,
    )  # fmt: skip
    assert f"registry {REGISTRY_ID} (harbor) created" in added.stdout

    source = new_image(api)
    repository, tag = f"compose/{deployment.broker}", uuid.uuid4().hex[:10]
    pushed_at = time.monotonic()
    with daemon_pushes(api) as pushes:
        result = deployment.pushctl(
            "push", source, "--registry", str(REGISTRY_ID), "--repository", repository,
            "--tag", tag, "--wait", "--timeout", "240", "--json",
        )  # fmt: skip
    push_seconds = time.monotonic() - pushed_at
    job = json.loads(result.stdout)["job"]
    assert job["status"] == "succeeded", job
    assert job["pushed_reference"] == f"{registry.host}/{repository}:{tag}"
    # The registry itself serves the tag at the digest the job recorded, and the engine whose
    # socket the worker mounts is the one that pushed it, to that reference only.
    assert served_digest(registry, repository, tag) == job["digest"]
    assert pushes.references == [f"{registry.host}/{repository}:{tag}"]

    events = json.loads(deployment.pushctl("events", "--job", job["id"], "--json").stdout)
    types = [event["type"] for event in events]
    assert types[0] == "job.enqueued" and types[-1] == "job.succeeded", types
    succeeded = [event["step"] for event in events if event["type"] == "step.succeeded"]
    assert succeeded == list(STEPS), types
    verified = json.loads(deployment.pushctl("events", "verify", "--json").stdout)
    assert verified["ok"] is True, verified

    # Beat publishes, the worker runs: reconcile every 5 s here. ("NAME[task id]": the
    # worker's line for a task it received, not its list of known tasks at start.)
    wait_for(
        "beat's reconcile run by the worker",
        lambda: "pushworker.maintenance.reconcile[" in deployment.compose("logs", "worker").stdout,
        60,
    )
    # The image's HEALTHCHECK (the worker's /metrics): first run 30 s after the start.
    worker = deployment.container("worker")
    wait_for(
        "the worker's health check",
        lambda: api.inspect_container(worker)["State"]["Health"]["Status"] == "healthy",
        120,
        every=2,
    )

    if deployment.broker == "rabbitmq":
        assert_rabbitmq_carried_it(deployment)

    logs = deployment.logs()
    for name, value in [("registry password", registry.password)] + [
        (key, deployment.settings[key])
        for key in (
            "REDIS_PASSWORD",
            "POSTGRES_PASSWORD",
            "RABBITMQ_PASSWORD",
            "PUSHWORKER_SECRET_KEY",
        )
    ]:
        assert value not in logs, f"the {name} is in the deployment's logs"
        assert value not in result.stdout + result.stderr
    print(
        f"compose ({deployment.broker}): up {up:.1f} s, "
        f"worker ready {ready:.1f} s after `up`, push job {push_seconds:.1f} s"
    )


def assert_rabbitmq_carried_it(deployment: Deployment) -> None:
    """The worker consumed from RabbitMQ: its default queue is there, a quorum queue with a
    consumer; and the broker runs with the compose file's consumer_timeout."""
    queues = deployment.compose(
        "exec", "-T", "rabbitmq", "rabbitmqctl", "-q", "list_queues", "-p", "pushworker",
        "name", "type", "consumers",
    ).stdout  # fmt: skip
    rows = {
        line.split("\t")[0]: line.split("\t")[1:] for line in queues.splitlines() if "\t" in line
    }
    assert rows.get("pushworker", [None])[0] == "quorum", queues
    assert int(rows["pushworker"][1]) >= 1, queues
    setting = "application:get_env(rabbit, consumer_timeout)."
    timeout = deployment.compose(
        "exec", "-T", "rabbitmq", "rabbitmqctl", "eval", setting
    ).stdout.strip()
    assert timeout == "{ok,2000000}", timeout
