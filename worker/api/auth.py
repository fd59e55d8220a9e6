"""Who is calling, and what their role allows.

``Authorization: Bearer pwk_...``; no token or an unreadable header is 401 ``unauthenticated``, a
token that is unknown, revoked or expired is 401 ``invalid_token`` (the same answer for each,
so a caller learns nothing about which), a role that does not allow the route is 403
``forbidden`` naming the role and what it may do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.api.errors import ApiError
from worker.tokens import Principal, verify_token

#: What each role may do. admin may do everything.
PERMISSIONS: dict[str, frozenset[str]] = {
    "producer": frozenset({"push", "read_jobs", "read_registries"}),
    "operator": frozenset(
        {"read_jobs", "operate_jobs", "read_events", "read_registries", "test_registries"}
    ),
    "auditor": frozenset({"read_jobs", "read_events", "read_registries"}),
}
ACTIONS = {
    "push": "create pushes",
    "read_jobs": "read jobs",
    "operate_jobs": "retry or cancel jobs",
    "read_events": "read the event log",
    "read_registries": "list registries",
    "test_registries": "test registries",
    "manage_registries": "edit registries or replace their credentials",
}

_BEARER = HTTPBearer(auto_error=False, description="An API token: `pushctl tokens create`.")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pushworker"'}


def allowed(role: str, action: str) -> bool:
    return role == "admin" or action in PERMISSIONS.get(role, frozenset())


async def principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401, "unauthenticated", "this route needs an API token",
            hint="send the header Authorization: Bearer <token> (pushctl tokens create)",
            headers=_CHALLENGE,
        )  # fmt: skip
    found = await run_in_threadpool(verify_token, credentials.credentials)
    if found is None:
        raise ApiError(
            401, "invalid_token", "the token is unknown, revoked or expired",
            hint="ask an administrator for a new token (pushctl tokens create)",
            headers={**_CHALLENGE, "WWW-Authenticate": _CHALLENGE["WWW-Authenticate"]
                     + ', error="invalid_token"'},
        )  # fmt: skip
    return found


def require(action: str) -> Callable[..., object]:
    """A dependency: the caller's principal, if its role allows ``action``; else 403."""

    async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not allowed(who.role, action):
            may = ", ".join(ACTIONS[a] for a in sorted(PERMISSIONS.get(who.role, ())))
            raise ApiError(
                403, "forbidden",
                f"token {who.name!r} has the role {who.role}, which may not {ACTIONS[action]}",
                hint=f"a {who.role} token may {may or 'do nothing here'}; use a token of a role "
                "that may",
            )  # fmt: skip
        return who

    return check
