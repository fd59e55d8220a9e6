"""Console sessions: a server-side table keyed by a random id; the cookie holds only that id.

The API token a person signs in with is verified once and never kept: the session holds the
principal it spoke for, a CSRF token (checked on every form) and when it expires. Sessions live
in the API process's memory, so restarting the API signs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.store.models import utcnow
from worker.tokens import Principal

COOKIE = "pushworker_console"
#: How long a session lasts from sign-in, whatever is done with it.
LIFETIME = timedelta(hours=8)


@dataclass(frozen=True)
class Session:
    id: str
    principal: Principal
    csrf: str
    expires_at: datetime

    @property
    def actor(self) -> str:
        return f"console:{self.principal.name}"

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())


class SessionStore:
    def __init__(self, lifetime: timedelta = LIFETIME) -> None:
        self.lifetime = lifetime
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, principal: Principal) -> Session:
        session = Session(
            secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32),
            utcnow() + self.lifetime,
        )  # fmt: skip
        with self._lock:
            now = utcnow()
            for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
                del self._sessions[key]
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= utcnow():
                del self._sessions[session_id]
                return None
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)
