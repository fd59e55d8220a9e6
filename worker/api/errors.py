"""The one place errors become HTTP answers: a ``PushWorkerError``'s exit code (its family in
docs/operations.md) decides the status, and every error body is ``{code, message, hint}``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from worker.core.errors import PushWorkerError
from worker.core.text import printable

#: ``pushctl`` exit code -> HTTP status.
STATUS_BY_EXIT_CODE = {
    1: 500,  # internal_error, worker_lost
    2: 422,  # invalid input, message, reference, registry, fallback chain, docker host
    3: 404,  # not found (job, registry, token, source image)
    4: 422,  # credential_unavailable: the registry cannot be pushed to until it is configured
    5: 409,  # invalid_state: the job's state does not allow it
    6: 502,  # the registry refused
    7: 502,  # authentication failed
    8: 502,  # registry unreachable
    9: 502,  # Docker Engine
    10: 503,  # storage: the database
}


class ErrorBody(BaseModel):
    """Every error answer of the API."""

    code: str
    message: str
    hint: str | None = None


class ApiError(Exception):
    """An answer of the API itself (401, 403, 413, ...), not of a service."""

    def __init__(
        self, status: int, code: str, message: str, hint: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint
        self.headers = headers


def status_for(error: PushWorkerError) -> int:
    return STATUS_BY_EXIT_CODE.get(error.exit_code, 500)


def body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    """An error body, with control characters escaped (messages may quote what was sent)."""
    return {
        "code": code,
        "message": printable(message),
        "hint": printable(hint) if hint is not None else None,
    }


#: What every authenticated route may answer besides its success, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (401, "no token, or a token that is unknown, revoked or expired"),
        (403, "the token's role (or registries) does not allow this"),
        (404, "no such job, registry or route"),
        (409, "the job's state does not allow it"),
        (413, "the request body is too large"),
        (422, "the request is malformed or can never succeed as given"),
        (503, "the database or the broker does not answer"),
    )
}
