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
RABBITMQ_OVERRIDE = ROOT / "deploy" / "compose.rabbitmq.yml"
#: Read by something other than pushworker's code: Compose itself, docker-py, prometheus_client.
EXTERNAL_SETTINGS = {"COMPOSE_PROFILES", "COMPOSE_FILE", "DOCKER_HOST", "PROMETHEUS_MULTIPROC_DIR"}


def compose(
    *args: str,
    env: dict[str, str] | None = None,
    files: tuple[Path, ...] = (COMPOSE_FILE,),
    env_file: Path = ENV_EXAMPLE,
) -> subprocess.CompletedProcess[str]:
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
    chosen = [arg for path in files for arg in ("-f", str(path))]
    return subprocess.run(
        [binary, "--project-directory", str(ROOT), *chosen, "--env-file", str(env_file), *args],
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
        "registry-htpasswd", "registry", "rabbitmq",
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


def test_rabbitmq_is_a_profile_that_outlasts_the_longest_push(config: dict[str, Any]) -> None:
    """The `rabbitmq` service (profile rabbitmq) keeps its data under a fixed node name, is
    checked with rabbitmq-diagnostics, and lets a consumer hold a message longer than a push
    may run with its hard time limit: a shorter consumer_timeout closes the channel mid-push."""
    rabbitmq = config["services"]["rabbitmq"]
    assert rabbitmq["profiles"] == ["rabbitmq"]
    assert rabbitmq["hostname"] == "rabbitmq"
    assert "rabbitmq-data:/var/lib/rabbitmq:rw" in rabbitmq["volumes"]
    assert rabbitmq["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert rabbitmq["ports"] == ["127.0.0.1:16672:5672/tcp"]
    environment = rabbitmq["environment"]
    assert environment["RABBITMQ_DEFAULT_VHOST"] == "pushworker"
    args = environment["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].split()
    consumer_timeout_ms = int(args[args.index("consumer_timeout") + 1])
    push_timeout = float(config["services"]["worker"]["environment"]["PUSHWORKER_PUSH_TIMEOUT"])
    assert consumer_timeout_ms > (push_timeout + 60) * 1000


def rabbitmq_env_file(tmp_path: Path) -> Path:
    """.env.example with RabbitMQ chosen as its comments say: COMPOSE_FILE uncommented, the
    profile added, a secret key."""
    text = ENV_EXAMPLE.read_text()
    assert "\n#COMPOSE_FILE=docker-compose.yml:deploy/compose.rabbitmq.yml\n" in text
    text = text.replace("\n#COMPOSE_FILE=", "\nCOMPOSE_FILE=")
    text = text.replace("\nCOMPOSE_PROFILES=trial\n", "\nCOMPOSE_PROFILES=trial,rabbitmq\n")
    text = text.replace("\nPUSHWORKER_SECRET_KEY=\n", "\nPUSHWORKER_SECRET_KEY=a-key\n")
    path = tmp_path / "rabbitmq.env"
    path.write_text(text)
    return path


def test_rabbitmq_as_the_broker_is_chosen_in_the_env_file(tmp_path: Path) -> None:
    """With .env.example's COMPOSE_FILE line, every pushworker service publishes to and consumes
    from the `rabbitmq` service, with its user, password, vhost and port, and waits for it; flow
    control keeps the compose file's Redis, in a database of its own."""
    result = compose("config", files=(), env_file=rabbitmq_env_file(tmp_path))
    assert result.returncode == 0, result.stderr
    services = yaml_to_data(result.stdout)["services"]
    rabbitmq = services["rabbitmq"]["environment"]
    port = services["rabbitmq"]["ports"][0].split(":")[1]
    expected = (
        f"amqp://{rabbitmq['RABBITMQ_DEFAULT_USER']}:{rabbitmq['RABBITMQ_DEFAULT_PASS']}"
        f"@127.0.0.1:{port}/{rabbitmq['RABBITMQ_DEFAULT_VHOST']}"
    )
    assert rabbitmq["RABBITMQ_DEFAULT_PASS"] == "change-me-rabbitmq"
    for name in PUSHWORKER_SERVICES:
        environment = services[name]["environment"]
        assert environment["PUSHWORKER_BROKER_URL"] == expected, name
        assert environment["PUSHWORKER_FLOW_REDIS_URL"] == (
            "redis://:change-me-redis@127.0.0.1:16379/1"
        ), name
        if name != "migrate":  # migrations need the database only
            assert services[name]["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}


def test_rabbitmq_as_the_broker_needs_its_password() -> None:
    result = compose(
        "config", "--quiet", env={"PUSHWORKER_SECRET_KEY": "a-key"},
        files=(COMPOSE_FILE, RABBITMQ_OVERRIDE),
    )  # fmt: skip
    assert result.returncode == 0  # .env.example sets one
    blank = compose(
        "config", "--quiet", env={"PUSHWORKER_SECRET_KEY": "a-key", "RABBITMQ_PASSWORD": ""},
        files=(COMPOSE_FILE, RABBITMQ_OVERRIDE),
    )  # fmt: skip
    assert blank.returncode != 0
    assert "set RABBITMQ_PASSWORD in .env" in blank.stderr


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
    assert re.search(r"pip install --no-deps -r \S*requirements\.lock", text)
    assert "pip check" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert next(line for line in ignored if not line.startswith("#")) == "*"
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    sources = {source for group in copied for source in group.split()}
    assert sources <= allowed, f"COPY of files .dockerignore leaves out: {sources - allowed}"


def test_the_dockerfile_builds_on_the_official_image_and_on_a_debian_base() -> None:
    """The base image contract (docs/deploy.md, "The base image"): only `python3` is called
    (Debian has no `python`); skopeo is installed only where the base lacks it, so a base that
    holds it needs no package index; no `# syntax=` line (BuildKit would fetch that frontend from
    Docker Hub); wheels come from wheelhouse/ when the context has it; and a code change
    rebuilds one layer of the runtime stage (the copy of the virtualenv comes last)."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    instructions = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    )).splitlines()  # fmt: skip
    runs = [line for line in instructions if line.startswith("RUN ")]
    assert not [run for run in runs if re.search(r"(?<![\w/.-])python(?![\w.-])", run)]
    installs = [run for run in runs if "apt-get install" in run]
    assert installs and all(run.startswith("RUN command -v skopeo ") for run in installs)
    assert "COPY requirements.lock wheelhouse* /wheelhouse/" in instructions
    assert [line for line in instructions if line.strip()][-1] == (
        "COPY --from=build /opt/pushworker /opt/pushworker"
    )


def test_the_offline_build_names_no_package_host() -> None:
    """Where packages come from is the machine's configuration, read when the images are built
    (scripts/compose-image): no mirror, index or URL is written in the build's files."""
    files = [ROOT / "Dockerfile", ROOT / "scripts" / "compose-image"]
    files += [path for path in (ROOT / "deploy" / "debian").rglob("*") if path.is_file()]
    for path in files:
        text = path.read_text()
        url = re.search(r"\b(https?|ftp)://[\w.-]+", text)
        assert url is None, f"{path.relative_to(ROOT)} names {url.group(0)}"
        for host in (
            "debian.org",
            "pypi.org",
            "pythonhosted.org",
            "registry-1.docker",
            "hub.docker",
        ):
            assert host not in text, f"{path.relative_to(ROOT)} names {host!r}"


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
