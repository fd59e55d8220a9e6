"""A credential reference outside the namespace sends nothing anywhere, on the real stack.

A capture server on 127.0.0.1 plays a hostile registry: it asks every client for Basic credentials
and records every Authorization header it receives. Registry records pointing at it name the
worker's own settings or files outside the credentials directory; they are inserted directly into
the database, as records saved before the confinement (or with other settings) would be. Both
``pushctl registry test`` and the worker's push refuse them with the credential error, and the
capture server receives no credential. A control proves it does record one when a credential is
allowed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.images import daemon_pushes
from tests.e2e.conftest import E2E, wait_for_job
from worker.core.errors import CredentialError
from worker.producer import enqueue_push
from worker.registries import RegistrySpec, create_registry
from worker.store.db import session_scope
from worker.store.models import Registry

PUSHCTL = str(Path(sys.executable).with_name("pushctl"))  # .venv/bin/pushctl
OUTSIDE_FILE = Path("/etc/hostname")


@dataclass
class Capture:
    """What the capture server saw: every request line and header block, as text."""

    requests: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self) -> str:
        with self.lock:
            return "\n".join(self.requests)


def _handler(capture: Capture) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            with capture.lock:
                capture.requests.append(f"{self.requestline}\n{self.headers}")
                if self.headers.get("Authorization"):
                    capture.authorizations.append(self.headers["Authorization"])
            # Every request is asked for Basic credentials: a client holding any sends them.
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="capture"')
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.send_header("Content-Type", "application/json")
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass  # the capture keeps what matters; stderr stays quiet

    return Handler


@pytest.fixture
def capture() -> Iterator[tuple[Capture, str]]:
    """The capture server and its address (``127.0.0.1:PORT``)."""
    seen = Capture()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(seen))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def credentials_dir(tmp_path: Path) -> Path:
    """A credentials directory whose one entry is a link pointing out of it."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "link_out").symlink_to(OUTSIDE_FILE)
    return directory


def insert_record(host: str, kind: str, target: str) -> int:
    """A registry row as stored before references were confined: no check runs."""
    with session_scope() as session:
        registry = Registry(
            name=f"capture-{uuid.uuid4().hex[:8]}", url=f"http://{host}", host=host,
            kind="generic", insecure=True, auth_required=True, username="capture",
            credential_kind=kind, credential_ref=target, fallback_chain=[],
        )  # fmt: skip
        session.add(registry)
        session.flush()
        return registry.id


def pushctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PUSHCTL, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def cli_env(e2e: E2E, credentials_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **e2e.env, "PUSHWORKER_CREDENTIALS_DIR": str(credentials_dir), **extra}


def push_to(registry_id: int, image: str) -> str:
    return enqueue_push(
        source_image=image, registry_id=registry_id, repository="capture/app", tag="v1",
        requested_by="e2e-credential-refs",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "target", "refusal"),
    [
        ("env", "PUSHWORKER_SECRET_KEY", "own configuration"),
        ("env", "DOCKER_HOST", "own configuration"),
        ("file", str(OUTSIDE_FILE), "outside the credentials directory"),
        ("file", f"/run/secrets/../..{OUTSIDE_FILE}", "outside the credentials directory"),
        ("file", "{credentials_dir}/link_out", "outside the credentials directory"),
    ],
)
def test_a_reference_outside_the_namespace_sends_no_credential(
    e2e: E2E,
    image: str,
    capture: tuple[Capture, str],
    credentials_dir: Path,
    kind: str,
    target: str,
    refusal: str,
) -> None:
    """``registry test`` and a push job both fail with the credential error naming why; the
    capture server was reached (by the /v2/ check) but received no Authorization header and
    nothing of the secret key or the outside file."""
    seen, host = capture
    target = target.format(credentials_dir=credentials_dir)
    registry_id = insert_record(host, kind, target)
    env = cli_env(e2e, credentials_dir)

    tested = pushctl(env, "registry", "test", str(registry_id), "--json")
    assert tested.returncode == CredentialError.exit_code, tested.stdout + tested.stderr
    checks = {check["name"]: check for check in json.loads(tested.stdout)["checks"]}
    assert checks["v2"]["ok"], checks  # the capture server was reached
    assert not checks["credentials"]["ok"] and refusal in checks["credentials"]["detail"]
    assert checks["credentials"]["error_code"] == CredentialError.code

    with daemon_pushes(e2e.api) as pushes:
        job = wait_for_job(push_to(registry_id, image))
    assert (job.status, job.error_code, job.current_step) == (
        "failed",
        CredentialError.code,
        "resolve_credentials",
    )
    assert refusal in (job.error_message or "")
    assert pushes.references == []

    assert seen.requests, "the registry test reached the capture server"
    assert seen.authorizations == []
    text = seen.seen() + tested.stdout + tested.stderr + (job.error_message or "")
    for secret in (e2e.env["PUSHWORKER_SECRET_KEY"], OUTSIDE_FILE.read_text().strip()):
        assert secret not in text


def test_control_the_capture_server_records_a_credential_that_is_allowed(
    e2e: E2E, image: str, capture: tuple[Capture, str], credentials_dir: Path
) -> None:
    """Without this the test above could pass with a deaf capture server: an allowed reference
    (``registry test``) and a stored secret (the worker's push) do reach it as Basic credentials."""
    seen, host = capture
    allowed = f"allowed-{uuid.uuid4().hex}"
    registry_id = insert_record(host, "env", "REGISTRY_CREDENTIAL_CAPTURE")
    env = cli_env(e2e, credentials_dir, REGISTRY_CREDENTIAL_CAPTURE=allowed)
    tested = pushctl(env, "registry", "test", str(registry_id), "--json")
    assert tested.returncode != 0  # the capture server refuses every credential
    expected = "Basic " + base64.b64encode(f"capture:{allowed}".encode()).decode()
    assert expected in seen.authorizations

    stored = f"stored-{uuid.uuid4().hex}"
    with session_scope() as session:
        secret_id = create_registry(
            session,
            RegistrySpec(name=f"capture-{uuid.uuid4().hex[:8]}", url=f"http://{host}",
                         insecure=True, username="capture", secret=stored),
        ).id  # fmt: skip
    job = wait_for_job(push_to(secret_id, image))
    assert job.status == "failed" and job.current_step != "resolve_credentials"
    expected = "Basic " + base64.b64encode(f"capture:{stored}".encode()).decode()
    assert expected in seen.authorizations
