"""The deployment files: docker-compose.yml validated by a real Compose implementation
(``docker-compose config``, Debian's 1.29.2, installed by scripts/bootstrap), .env.example
documenting every setting, the Dockerfile's practice, and the pinned dependencies."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PUSHWORKER_SERVICES = ("migrate", "worker", "copier", "webhooks", "beat", "api")
#: Read by something other than pushworker's code: Compose itself, docker-py, prometheus_client.
EXTERNAL_SETTINGS = {"COMPOSE_PROFILES", "DOCKER_HOST", "PROMETHEUS_MULTIPROC_DIR"}


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail(
            "docker-compose is not installed: run scripts/bootstrap as root "
            "(Debian: apt-get install docker-compose)",
            pytrace=False,
        )
    # A clean environment: the developer's own variables must not fill in the file's gaps.
    clean = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        **(env or {}),
    }
    return subprocess.run(
        [binary, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
         "--env-file", str(ENV_EXAMPLE), *args],
        capture_output=True, text=True, env=clean, cwd=ROOT, timeout=120,
    )  # fmt: skip


def yaml_to_data(text: str) -> Any:
    """Parse YAML with the interpreter that runs docker-compose (it ships PyYAML)."""
    binary = shutil.which("docker-compose")
    assert binary is not None
    first = Path(binary).read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("#!"), f"{binary} is not a Python script; cannot parse its YAML"
    interpreter = first[2:].strip().split()
    script = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    result = subprocess.run(
        [*interpreter, "-c", script], input=text, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose("config", env={"PUSHWORKER_SECRET_KEY": "a-key-for-the-test"})
    assert result.returncode == 0, f"docker-compose config refused the file:\n{result.stderr}"
    data: dict[str, Any] = yaml_to_data(result.stdout)
    return data


def test_the_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {
        "redis", "postgres", "migrate", "worker", "copier", "webhooks", "beat", "api",
        "registry-htpasswd", "registry",
    }  # fmt: skip


def test_the_api_serves_without_the_docker_socket(config: dict[str, Any]) -> None:
    """The HTTP API: `pushctl api serve` on loopback by default, after the migrations, checked
    by its /readyz; it never gets the Docker socket."""
    api = config["services"]["api"]
    assert api["command"][:3] == ["pushctl", "api", "serve"]
    assert api["environment"]["PUSHWORKER_API_HOST"] == "127.0.0.1"
    assert api["environment"]["PUSHWORKER_API_PORT"] == "8080"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert "docker.sock" not in str(api.get("volumes", ""))
    assert api["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_webhooks_are_delivered_by_their_own_worker(config: dict[str, Any]) -> None:
    """Only the webhooks service consumes the webhook queue, and it does nothing else: a
    receiver that hangs never holds a slot a push needs."""
    services = config["services"]
    command = services["webhooks"]["command"]
    assert command[:4] == ["celery", "-A", "tasks.app", "worker"]
    assert command[command.index("-Q") + 1] == "pushworker.webhooks"
    assert "pushworker.webhooks" not in services["worker"]["command"]
    assert "docker.sock" not in str(services["webhooks"].get("volumes", ""))


def test_the_copier_serves_the_skopeo_queue_without_the_docker_socket(
    config: dict[str, Any],
) -> None:
    """Copied sources (docs/sources.md) run on their own queue, in a container with no Docker
    socket and no engine address, reading file sources from a read-only mount that is its
    PUSHWORKER_SOURCES_DIR; the Docker worker does not consume that queue."""
    services = config["services"]
    copier = services["copier"]
    command = copier["command"]
    assert command[:4] == ["celery", "-A", "tasks.app", "worker"]
    assert command[command.index("-Q") + 1] == "pushworker.skopeo"
    assert "pushworker.skopeo" not in services["worker"]["command"]
    assert "docker.sock" not in str(copier.get("volumes", "")) and "group_add" not in copier
    assert copier["environment"]["DOCKER_HOST"] == ""
    sources = copier["environment"]["PUSHWORKER_SOURCES_DIR"]
    assert any(v.endswith(f":{sources}:ro") for v in copier["volumes"])
    ports = {
        services[name]["environment"]["PUSHWORKER_METRICS_PORT"] for name in ("worker", "copier")
    }
    assert len(ports) == 2  # both on the host's network


def test_redis_persists_and_postgres_keeps_its_data(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in command
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    postgres = config["services"]["postgres"]
    assert any(v.startswith("postgres-data:/var/lib/postgresql/data") for v in postgres["volumes"])
    for name in ("redis", "postgres"):
        assert config["services"][name]["healthcheck"]["test"][0] == "CMD"
    assert {"redis-data", "postgres-data"} <= set(config["volumes"])


def test_migrations_are_their_own_one_shot_command(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["migrate"]["command"] == ["pushctl", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("worker", "beat"):
        assert "upgrade" not in services[name]["command"]
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    # Nothing in the image runs them on start either.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "upgrade" not in "".join(
        line for line in dockerfile.splitlines() if line.startswith(("CMD", "ENTRYPOINT"))
    )


def test_the_worker_pushes_through_the_hosts_engine(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    assert worker["build"]["context"] == str(ROOT)
    assert worker["command"][:4] == ["celery", "-A", "tasks.app", "worker"]
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in worker["volumes"]
    assert worker["environment"]["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    # Not root: the image's user, in the group that owns the socket on this host.
    assert worker["group_add"] == ["999"]
    assert "user" not in worker and not worker.get("privileged")
    assert worker["environment"]["PUSHWORKER_METRICS_PORT"] == "9808"
    assert worker["environment"]["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    assert "/tmp" in worker["tmpfs"]
    for dependency in ("redis", "postgres"):
        assert worker["depends_on"][dependency] == {"condition": "service_healthy"}


def test_beat_keeps_its_schedule(config: dict[str, Any]) -> None:
    beat = config["services"]["beat"]
    assert beat["command"][:4] == ["celery", "-A", "tasks.app", "beat"]
    schedule = beat["command"][beat["command"].index("--schedule") + 1]
    assert any(v.startswith(f"beat-data:{Path(schedule).parent}") for v in beat["volumes"])


def test_every_pushworker_container_shares_one_configuration(config: dict[str, Any]) -> None:
    services = config["services"]
    environments = [services[name]["environment"] for name in PUSHWORKER_SERVICES]
    for key in ("PUSHWORKER_DATABASE_URL", "PUSHWORKER_BROKER_URL", "PUSHWORKER_SECRET_KEY"):
        assert len({env[key] for env in environments}) == 1, key
    env = environments[0]
    assert env["PUSHWORKER_DATABASE_URL"] == (
        "postgresql+psycopg://pushworker:change-me-postgres@127.0.0.1:15432/pushworker"
    )
    assert env["PUSHWORKER_BROKER_URL"] == "redis://:change-me-redis@127.0.0.1:16379/0"
    assert env["PUSHWORKER_SECRET_KEY"] == "a-key-for-the-test"
    assert env["PUSHWORKER_LOG_FORMAT"] == "json"
    images = {services[name]["image"] for name in PUSHWORKER_SERVICES}
    assert images == {"pushworker:local"}


def test_the_trial_registry_uses_htpasswd(config: dict[str, Any]) -> None:
    registry = config["services"]["registry"]
    assert registry["image"].startswith("registry:2")
    assert registry["environment"]["REGISTRY_AUTH"] == "htpasswd"
    assert registry["profiles"] == ["trial"]
    assert registry["depends_on"]["registry-htpasswd"] == {
        "condition": "service_completed_successfully"
    }
    assert registry["ports"] == ["127.0.0.1:5000:5000/tcp"]
    maker = config["services"]["registry-htpasswd"]
    assert "htpasswd -Bbc /auth/htpasswd" in " ".join(maker["entrypoint"])


def test_missing_secrets_are_named() -> None:
    result = compose("config", "--quiet")
    assert result.returncode != 0
    assert "set PUSHWORKER_SECRET_KEY in .env" in result.stderr


# --- .env.example ---------------------------------------------------------------------------------


def documented_settings() -> dict[str, str]:
    """``NAME -> the comment above it`` for each ``NAME=`` or ``#NAME=`` line of .env.example."""
    settings: dict[str, str] = {}
    comment: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=.*", line)
        if match:
            settings[match.group(1)] = " ".join(comment)
        elif line.startswith("#"):
            comment.append(line.lstrip("# "))
        else:
            comment = []
    return settings


def settings_read_by_the_code() -> set[str]:
    sources = [ROOT / "celeryconfig.py", *ROOT.glob("worker/**/*.py"), *ROOT.glob("tasks/*.py")]
    found: set[str] = set()
    for path in sources:
        found |= set(re.findall(r"PUSHWORKER_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return found


def settings_read_by_compose() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))


def test_env_example_documents_every_setting() -> None:
    documented = documented_settings()
    missing = (settings_read_by_the_code() | settings_read_by_compose()) - set(documented)
    assert not missing, f"document these in .env.example (a comment, then NAME=): {sorted(missing)}"
    undocumented = sorted(name for name, comment in documented.items() if not comment.strip())
    assert not undocumented, f"these lack a comment in .env.example: {undocumented}"


def test_env_example_names_nothing_that_is_not_read() -> None:
    read = settings_read_by_the_code() | settings_read_by_compose() | EXTERNAL_SETTINGS
    stale = sorted(set(documented_settings()) - read)
    assert not stale, f".env.example documents settings nothing reads: {stale}"


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_practice() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    base = next(line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base)
    stages = [line for line in lines if line.startswith("FROM ")]
    assert stages == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]
    runtime = lines[lines.index("FROM ${PYTHON_IMAGE}") :]
    users = [line for line in runtime if line.startswith("USER ")]
    assert users and "root" not in users[-1] and users[-1] != "USER 0"
    assert any(line.startswith("HEALTHCHECK ") for line in runtime)
    text = "\n".join(lines)
    assert "pip install --no-deps -r requirements.lock" in text
    assert "pip check" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert next(line for line in ignored if not line.startswith("#")) == "*"
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    sources = {source for group in copied for source in group.split()}
    assert sources <= allowed, f"COPY of files .dockerignore leaves out: {sources - allowed}"


def test_every_dependency_is_pinned_at_an_accepted_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pins[name]}, "
            f"outside pyproject.toml's {requirement.specifier}"
        )
