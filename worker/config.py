"""Settings, read from environment variables with documented defaults.

One frozen object, read once per process; ``pushctl config`` prints it with secrets masked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "pushworker"


def _default_database_url() -> str:
    return f"sqlite:///{DEFAULT_DATA_DIR / 'pushworker.db'}"


@dataclass(frozen=True)
class Settings:
    """Every knob of the worker, the producer API and the CLI."""

    #: SQLAlchemy URL of the event log and job store (``PUSHWORKER_DATABASE_URL``).
    database_url: str
    #: Celery broker (``PUSHWORKER_BROKER_URL``).
    broker_url: str
    #: Fernet key that encrypts stored registry secrets (``PUSHWORKER_SECRET_KEY``).
    secret_key: str | None
    #: Docker Engine address; None means docker-py's own DOCKER_HOST handling (``DOCKER_HOST``).
    docker_host: str | None
    #: ``json``, ``console`` or ``auto`` (console on a terminal) (``PUSHWORKER_LOG_FORMAT``).
    log_format: str
    #: Seconds a single registry HTTP request may take (``PUSHWORKER_HTTP_TIMEOUT``).
    http_timeout: float
    #: Seconds a push may take before the step is abandoned (``PUSHWORKER_PUSH_TIMEOUT``).
    push_timeout: float
    #: How many times a retryable step is tried before the job fails (``PUSHWORKER_MAX_ATTEMPTS``).
    max_attempts: int
    #: First retry delay in seconds; doubles each attempt (``PUSHWORKER_RETRY_BASE``).
    retry_base: float
    #: Upper bound of a retry delay (``PUSHWORKER_RETRY_MAX``), well under the visibility timeout.
    retry_max: float

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            database_url=env.get("PUSHWORKER_DATABASE_URL") or _default_database_url(),
            broker_url=env.get("PUSHWORKER_BROKER_URL") or "redis://127.0.0.1:6379/0",
            secret_key=env.get("PUSHWORKER_SECRET_KEY") or None,
            docker_host=env.get("DOCKER_HOST") or None,
            log_format=env.get("PUSHWORKER_LOG_FORMAT", "auto"),
            http_timeout=float(env.get("PUSHWORKER_HTTP_TIMEOUT", "10")),
            push_timeout=float(env.get("PUSHWORKER_PUSH_TIMEOUT", "1800")),
            max_attempts=int(env.get("PUSHWORKER_MAX_ATTEMPTS", "4")),
            retry_base=float(env.get("PUSHWORKER_RETRY_BASE", "2")),
            retry_max=float(env.get("PUSHWORKER_RETRY_MAX", "300")),
        )

    def masked(self) -> dict[str, str]:
        """The settings as text, with the secret key and URL passwords hidden."""
        shown: dict[str, str] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "secret_key":
                shown[field.name] = "(set)" if value else "(not set)"
            elif isinstance(value, str) and "://" in value:
                shown[field.name] = mask_url_password(value)
            else:
                shown[field.name] = "" if value is None else str(value)
        return shown


def mask_url_password(url: str) -> str:
    """``redis://:pw@host`` -> ``redis://:***@host``; URLs without a password are unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostpart}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env()
