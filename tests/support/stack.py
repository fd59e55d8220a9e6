"""The real stack for integration and end-to-end tests: started by ``scripts/stack up``.

A service that cannot be started fails the run with its name; nothing is skipped.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack"


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
            pytest.fail(f"scripts/stack {action} {name} failed:\n{result.stderr}")


def start_stack() -> Stack:
    result = subprocess.run([str(STACK), "up"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(
            f"the test stack could not be started (scripts/stack up):\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    return Stack(parse_exports(result.stdout))


def parse_exports(text: str) -> dict[str, str]:
    """The variables that ``scripts/stack up`` and ``scripts/stack env`` print as ``export``s."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            parsed = shlex.split(value)
            env[key] = parsed[0] if parsed else ""
    return env
