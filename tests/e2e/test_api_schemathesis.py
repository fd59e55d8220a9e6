"""Schemathesis against the API's own ``/openapi.json``, served by a real uvicorn process on the
real stack, with a token of each role and with none: no answer is a 5xx, and every answer
(status code, content type, headers, body) is one the document describes.

The number of generated cases is bounded (``MAX_EXAMPLES`` per operation, each sent once per
caller), so the run
takes a couple of minutes; the count is printed at the end and reported in docs/reliability.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.test_api import ApiServer, api_server
from worker.api import create_app

#: Generated cases per operation (each is sent with every caller's token).
MAX_EXAMPLES = 100
CALLERS = ("producer", "operator", "auditor", "admin", "no token")
CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
COUNTS: Counter[str] = Counter()

__all__ = ["api_server"]


#: The document the app serves, built in this process (schemathesis' lazy loading from a fixture
#: does not work with this pytest); ``test_the_document_is_the_served_one`` proves they are one.
DOCUMENT = create_app().openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    total = sum(COUNTS.values())
    statuses = ", ".join(f"{status}: {count}" for status, count in sorted(COUNTS.items()))
    cases = total // len(CALLERS)
    print(f"\nschemathesis: {cases} generated cases, {total} requests ({statuses})")


def test_the_document_is_the_served_one(api_server: ApiServer) -> None:
    assert httpx.get(f"{api_server.url}/openapi.json", timeout=30).json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_api_keeps_to_its_document(case: Any, api_server: ApiServer) -> None:
    """Each generated case is sent once per caller: a token of each role, and no token."""
    for caller in CALLERS:
        token = api_server.tokens.get(caller)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = case.call_and_validate(base_url=api_server.url, headers=headers, checks=CHECKS)
        COUNTS[str(response.status_code)] += 1
