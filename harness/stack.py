"""The real local stack, started by ``scripts/stack up``: where its services listen.

A service that cannot be started raises ``StackError`` naming it; nothing is skipped.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "scripts" / "stack"


class StackError(RuntimeError):
    """The stack, or one of its services, could not be started or stopped."""


@dataclass(frozen=True)
class RegistryEndpoint:
    host: str  # 127.0.0.1:PORT
    user: str
    password: str
    ca_file: str | None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://{self.host}"


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]

    @property
    def redis_url(self) -> str:
        return self.env["PUSHWORKER_STACK_REDIS_URL"]

    @property
    def amqp_url(self) -> str:
        """The stack's RabbitMQ vhost, with its own user and password (``amqp://``); empty when
        the stack has no RabbitMQ."""
        url = self.env.get("PUSHWORKER_STACK_AMQP_URL", "")
        if not url:
            return ""
        password = Path(self.env["PUSHWORKER_STACK_AMQP_PASSWORD_FILE"]).read_text().strip()
        scheme, _, rest = url.partition("://")
        user, _, where = rest.partition("@")
        return f"{scheme}://{user}:{quote(password, safe='')}@{where}"

    @property
    def postgres_url(self) -> str:
        return self.env["PUSHWORKER_STACK_POSTGRES_URL"]

    @property
    def docker_host(self) -> str:
        return self.env["DOCKER_HOST"]

    @property
    def tls(self) -> RegistryEndpoint:
        return self._registry("TLS", ca=self.env["PUSHWORKER_STACK_TLS_CA"])

    @property
    def plain(self) -> RegistryEndpoint:
        return self._registry("PLAIN", ca=None)

    def _registry(self, prefix: str, ca: str | None) -> RegistryEndpoint:
        password = Path(self.env[f"PUSHWORKER_STACK_{prefix}_PASSWORD_FILE"]).read_text().strip()
        return RegistryEndpoint(
            host=self.env[f"PUSHWORKER_STACK_{prefix}_REGISTRY"],
            user=self.env[f"PUSHWORKER_STACK_{prefix}_USER"],
            password=password,
            ca_file=ca,
        )

    def service(self, action: str, name: str) -> None:
        """Stop or start one service (``down``/``up``), as an outage test needs."""
        result = subprocess.run(
            [str(STACK), action, name], capture_output=True, text=True, timeout=180
        )
        if result.returncode != 0:
            raise StackError(f"scripts/stack {action} {name} failed:\n{result.stderr}")


def start_stack() -> Stack:
    """``scripts/stack up`` (idempotent: services already running are reused)."""
    result = subprocess.run([str(STACK), "up"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise StackError(
            f"the stack could not be started (scripts/stack up):\n{result.stderr[-3000:]}"
        )
    return Stack(parse_exports(result.stdout))


def stack_env() -> dict[str, str]:
    """``scripts/stack env``: from the environment when it was eval'd, else by running it
    (which does not start anything)."""
    if os.environ.get("DOCKER_HOST") and os.environ.get("PUSHWORKER_STACK_TLS_REGISTRY"):
        return {k: v for k, v in os.environ.items() if k.startswith("PUSHWORKER_STACK_")} | {
            "DOCKER_HOST": os.environ["DOCKER_HOST"]
        }
    out = subprocess.run([str(STACK), "env"], capture_output=True, text=True, check=True).stdout
    env = parse_exports(out)
    if "DOCKER_HOST" not in env:
        raise StackError(
            'the stack is not up: run `scripts/stack up` (or eval "$(scripts/stack env)")'
        )
    return env


def parse_exports(text: str) -> dict[str, str]:
    """The variables that ``scripts/stack up`` and ``scripts/stack env`` print as ``export``s."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            parsed = shlex.split(value)
            env[key] = parsed[0] if parsed else ""
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
