"""RabbitMQ for the stack and the tests: a private ``rabbitmq-server`` node, and a vhost with a user
of its own on any node.

Standard library only: ``scripts/stack`` imports it too. A private node has its own node name,
AMQP port, distribution port, data, logs, config and Erlang cookie (its ``HOME``), so it can be
killed and restarted without touching the machine's shared broker, and the machine's
``/etc/rabbitmq`` files (which name the shared node and its port) do not apply to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Debian's ``rabbitmq-server`` package: the programs themselves, not the /usr/sbin wrappers that
#: switch to the ``rabbitmq`` user and its home (a private node must keep its own).
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: The wrapper that reaches the machine's own node with the ``rabbitmq`` user's cookie.
SYSTEM_CTL = "/usr/sbin/rabbitmqctl"
PACKAGE = "rabbitmq-server"
INSTALL_HINT = f"install Debian's {PACKAGE} package (apt-get install {PACKAGE}), as root"
#: The protocol header a client opens with; a broker answers it with Connection.Start.
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class RabbitError(RuntimeError):
    """A node did not start, or rabbitmqctl refused; the message says what to do."""


def amqp_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True if an AMQP 0-9-1 broker (not just any listener) answers on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_AMQP_HEADER)
            # A method frame (type 1) on channel 0: Connection.Start.
            return sock.recv(7)[:3] == b"\x01\x00\x00"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class RabbitNode:
    """A ``rabbitmq-server`` of our own under ``base``, on ``port`` (AMQP) and ``dist_port``."""

    base: Path
    name: str
    port: int
    dist_port: int

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    def env(self) -> dict[str, str]:
        base = self.base
        return {
            **os.environ,
            # The Erlang cookie is created in HOME (0400, ours); rabbitmqctl reads the same one.
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            # An empty env file: /etc/rabbitmq/rabbitmq-env.conf names the shared node.
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def prepare(self) -> None:
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o700)
        # Loopback only, no plugins (the shared node's management port would clash).
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        """``rabbitmq-server`` in the foreground, as a child in a session of its own (so that
        ``kill`` takes the shell, the Erlang VM and its helpers together)."""
        if not os.access(SERVER, os.X_OK):
            raise RabbitError(f"{SERVER} is missing: {INSTALL_HINT}")
        self.prepare()
        with open(log, "ab") as out:
            return subprocess.Popen(
                [SERVER], env=self.env(), cwd=self.base, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, alive: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise RabbitError(f"rabbitmq-server {self.nodename} exited while starting")
            if amqp_answers(self.port):
                return
            time.sleep(0.3)
        raise RabbitError(f"rabbitmq-server {self.nodename} did not answer within {timeout:.0f} s")

    def ctl(self) -> list[str]:
        return [CTL, "-n", self.nodename]


def rabbitmqctl(
    ctl: list[str], *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> str:
    """Run rabbitmqctl; its output, or RabbitError with its words."""
    run = subprocess.run(
        [*ctl, "-q", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )  # fmt: skip
    if run.returncode:
        raise RabbitError(f"rabbitmqctl {args[0]} failed: {(run.stderr or run.stdout).strip()}")
    return run.stdout


def provision(
    ctl: list[str], vhost: str, user: str, password: str, env: dict[str, str] | None = None
) -> None:
    """A vhost, and a user allowed everything in it and nothing elsewhere. The password goes
    through rabbitmqctl's stdin, never its command line (which ``ps`` shows)."""
    if vhost not in rabbitmqctl(ctl, "list_vhosts", "name", env=env).split():
        rabbitmqctl(ctl, "add_vhost", vhost, env=env)
    users = [line.split("\t")[0] for line in rabbitmqctl(ctl, "list_users", env=env).splitlines()]
    if user in users:
        rabbitmqctl(ctl, "change_password", user, env=env, stdin=password)
    else:
        rabbitmqctl(ctl, "add_user", user, env=env, stdin=password)
    rabbitmqctl(ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*", env=env)
