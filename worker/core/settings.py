"""Settings, read from environment variables with documented defaults.

One frozen object, read once per process; ``pushctl config`` prints it with secrets masked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "pushworker"


#: Where a credential reference may point unless the deployment says otherwise: environment
#: variables with this prefix, and files in Docker's (and compose's) secrets directory.
DEFAULT_CREDENTIAL_ENV_PREFIX = "REGISTRY_CREDENTIAL_"
DEFAULT_CREDENTIALS_DIR = "/run/secrets"

#: Every environment variable ``Settings.from_env`` reads. A credential reference may never name
#: one of them (worker/core/credential_refs.py); a unit test proves the list is complete.
SETTINGS_ENV_NAMES = (
    "PUSHWORKER_DATABASE_URL",
    "PUSHWORKER_BROKER_URL",
    "PUSHWORKER_SECRET_KEY",
    "DOCKER_HOST",
    "PUSHWORKER_LOG_FORMAT",
    "PUSHWORKER_HTTP_TIMEOUT",
    "PUSHWORKER_PUSH_TIMEOUT",
    "PUSHWORKER_MAX_ATTEMPTS",
    "PUSHWORKER_RETRY_BASE",
    "PUSHWORKER_RETRY_MAX",
    "PUSHWORKER_CREDENTIAL_ENV_PREFIX",
    "PUSHWORKER_CREDENTIALS_DIR",
)


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
    #: Prefix every ``env:NAME`` credential reference must start with; the worker's own
    #: settings are never readable whatever it is (``PUSHWORKER_CREDENTIAL_ENV_PREFIX``).
    credential_env_prefix: str = DEFAULT_CREDENTIAL_ENV_PREFIX
    #: Absolute directory every ``file:PATH`` credential reference must resolve into, after
    #: symlinks and ``..``; a relative PATH is taken inside it (``PUSHWORKER_CREDENTIALS_DIR``).
    credentials_dir: str = DEFAULT_CREDENTIALS_DIR

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
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
            credential_env_prefix=env.get("PUSHWORKER_CREDENTIAL_ENV_PREFIX")
            or DEFAULT_CREDENTIAL_ENV_PREFIX,
            credentials_dir=env.get("PUSHWORKER_CREDENTIALS_DIR") or DEFAULT_CREDENTIALS_DIR,
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
