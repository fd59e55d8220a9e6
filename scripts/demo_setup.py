"""Set-up steps of scripts/demo: the demo registry record, a fresh image, a ready worker.

Idempotent: the registry record is created once (reading its password from a file in
PUSHWORKER_CREDENTIALS_DIR, which scripts/demo fills, so no secret key is needed) and updated on
later runs.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import docker

from harness.images import build_scratch_image
from worker.core.logs import configure_logging
from worker.core.settings import get_settings
from worker.registries import RegistrySpec, create_registry, list_registries, update_registry
from worker.store.db import session_scope

DEMO_REGISTRY = "demo-harbor"


def ensure_registry() -> int:
    host = os.environ["PUSHWORKER_STACK_TLS_REGISTRY"]
    spec = RegistrySpec(
        name=DEMO_REGISTRY,
        url=f"https://{host}",
        kind="harbor",
        username=os.environ["PUSHWORKER_STACK_TLS_USER"],
        credential_ref="file:demo-harbor",  # in PUSHWORKER_CREDENTIALS_DIR
        ca_cert=Path(os.environ["PUSHWORKER_STACK_TLS_CA"]).read_text(),
    )
    with session_scope() as session:
        existing = [r for r in list_registries(session) if r.name == DEMO_REGISTRY]
        registry = (
            update_registry(session, existing[0].id, spec)
            if existing
            else create_registry(session, spec)
        )
        return registry.id


def build_image() -> str:
    api = docker.APIClient(base_url=os.environ["DOCKER_HOST"])
    reference = f"pushworker-demo/hello:{uuid.uuid4().hex[:8]}"
    build_scratch_image(api, reference, 1024 * 1024)
    return reference


def wait_for_worker(timeout: float = 60) -> None:
    from tasks.app import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.control.ping(timeout=1.0):
            return
    sys.exit("demo: the worker did not answer within 60 s; see its log")


if __name__ == "__main__":
    configure_logging(get_settings().log_format)  # log lines to stderr; stdout carries results
    action = sys.argv[1]
    if action == "registry":
        print(ensure_registry())
    elif action == "image":
        print(build_image())
    elif action == "wait-worker":
        wait_for_worker()
