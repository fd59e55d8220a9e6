"""Stand-ins behind the real Docker and registry seams, and a chain run in process as the Celery
tasks run it (each step in its step span): for the tracing unit tests and the in-process part of
``bench/tracing.py``. The seams' own code runs (``DockerEngine``, ``RegistryHTTP``); only
docker-py's client and the registry's HTTP answers are stood in for."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from tasks.push import step_span
from worker.core.credentials import Credential
from worker.engine.pipeline import StepRunner
from worker.engine.steps import STEP_NAMES
from worker.seams.registry_http import RegistryEndpoint, RegistryHTTP

HOST = "reg.example.com:10443"
PASSWORD = "pw-Kx81-never-in-a-span"
TOKEN = "bearer-Qz55-never-in-a-span"
SOURCE = "app:build"
DIGEST = "sha256:" + "d" * 64
IMAGE_ID = "sha256:" + "1" * 64


class StubDockerApi:
    """What docker-py's APIClient answers, for ``DockerEngine(api=...)``."""

    def __init__(self) -> None:
        self.tags: set[str] = {SOURCE}
        self._auth_configs: Any = None

    def inspect_image(self, reference: str) -> dict[str, Any]:
        return {"Id": IMAGE_ID, "RepoTags": sorted(self.tags), "RepoDigests": []}

    def tag(self, source: str, name: str, tag: str, force: bool = False) -> None:
        self.tags.add(f"{name}:{tag}")

    def login(self, **_kwargs: Any) -> dict[str, str]:
        return {"Status": "Login Succeeded"}

    def push(self, name: str, **_kwargs: Any) -> Iterator[dict[str, Any]]:
        yield {"id": "layer1", "status": "Pushing", "progressDetail": {"current": 4, "total": 9}}
        yield {"id": "layer1", "status": "Pushed"}
        yield {"aux": {"Tag": "v1", "Digest": DIGEST, "Size": 524}}


class StubRegistry(BaseAdapter):
    """A registry that asks for a Bearer token (from its realm, with Basic credentials) and
    serves the pushed tag at ``DIGEST``."""

    #: The password the registry takes.
    password = PASSWORD

    def send(  # type: ignore[override]  # the transport options do not matter here
        self, request: requests.PreparedRequest, **_kwargs: Any
    ) -> requests.Response:
        url = str(request.url)
        auth = str(request.headers.get("Authorization", ""))
        basic = "Basic " + base64.b64encode(f"u:{self.password}".encode()).decode()
        if "/token" in url:
            status, headers, body = (200, {}, json.dumps({"token": TOKEN})) if auth == basic else (
                401, {}, "")  # fmt: skip
        elif auth != f"Bearer {TOKEN}":
            challenge = f'Bearer realm="https://{HOST}/token",service="reg"'
            status, headers, body = 401, {"WWW-Authenticate": challenge}, ""
        else:
            status, headers, body = 200, {"Docker-Content-Digest": DIGEST}, ""
        response = requests.Response()
        response.status_code, response.url, response.request = status, url, request
        response.headers = CaseInsensitiveDict(headers)
        response._content = body.encode()
        return response

    def close(self) -> None:
        return None


def stub_http(endpoint: RegistryEndpoint, credential: Credential | None, timeout: float) -> Any:
    client = RegistryHTTP(endpoint, credential, timeout=timeout)
    client.http.mount("https://", StubRegistry())
    return client


@dataclasses.dataclass
class TracedChain:
    """Runs a job's chain in process as the Celery tasks would: each step in its step span."""

    runner: StepRunner | None = None

    def start_chain(self, job_id: str, registry_id: int) -> None:
        assert self.runner is not None
        for step in STEP_NAMES:
            with step_span(step, job_id, registry_id):
                outcome = self.runner.run(step, job_id, registry_id)
            if outcome.action == "stop":
                return
