"""Settings, read from environment variables with documented defaults.

One frozen object, read once per process; ``pushctl config`` prints it with secrets masked. This
is the only module that reads the worker's configuration from the environment: everything else
asks ``get_settings()``, so a default or a bound is written once and a bad value is refused here,
as a ``ValidationError`` that names the variable. (``worker.core.credential_refs`` reads the
variable a credential reference names: that is a credential, not a setting.)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from worker.core.brokers import broker_kind
from worker.core.errors import ValidationError

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "pushworker"


#: Where a credential reference may point unless the deployment says otherwise: environment
#: variables with this prefix, and files in Docker's (and compose's) secrets directory.
DEFAULT_CREDENTIAL_ENV_PREFIX = "REGISTRY_CREDENTIAL_"
DEFAULT_CREDENTIALS_DIR = "/run/secrets"
#: Debian's skopeo (package ``skopeo``), which scripts/bootstrap installs.
DEFAULT_SKOPEO = "/usr/bin/skopeo"

#: Variables other modules name in their messages (or, for prometheus_client's, set).
DOCKER_HOSTS_ENV = "PUSHWORKER_DOCKER_HOSTS"
WORKER_HOST_ENV = "PUSHWORKER_WORKER_HOST"
METRICS_PORT_ENV = "PUSHWORKER_METRICS_PORT"
#: prometheus_client's own variable: it reads it itself, so worker.metrics sets it when unset.
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLOW_REDIS_URL_ENV = "PUSHWORKER_FLOW_REDIS_URL"

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
    "PUSHWORKER_SOURCES_DIR",
    "PUSHWORKER_SKOPEO",
    "PUSHWORKER_RECONCILE_EVERY",
    "PUSHWORKER_SEAL_EVERY",
    "PUSHWORKER_RECONCILE_GRACE",
    "PUSHWORKER_HEALTH_EVERY",
    "PUSHWORKER_WORKER_MAX_MEMORY",
    DOCKER_HOSTS_ENV,
    WORKER_HOST_ENV,
    METRICS_PORT_ENV,
    "PUSHWORKER_METRICS_ADDR",
    METRICS_DIR_ENV,
    "PUSHWORKER_OPERATOR",
    # flow control
    "PUSHWORKER_FLOW_DEADLINE",
    "PUSHWORKER_FLOW_LEASE",
    "PUSHWORKER_FLOW_POLL",
    "PUSHWORKER_FLOW_UNCAPPED_CEILING",
    "PUSHWORKER_FLOW_CONTROL",
    FLOW_REDIS_URL_ENV,
    # the HTTP API
    "PUSHWORKER_API_HOST",
    "PUSHWORKER_API_PORT",
    "PUSHWORKER_API_MAX_BODY",
    # webhooks
    "PUSHWORKER_WEBHOOK_TIMEOUT",
    "PUSHWORKER_WEBHOOK_EVERY",
    "PUSHWORKER_WEBHOOK_RETRY_BASE",
    "PUSHWORKER_WEBHOOK_RETRY_MAX",
    "PUSHWORKER_WEBHOOK_RETRY_FOR",
)

#: A Docker host name: it becomes part of a queue name (``pushworker.<name>``).
DOCKER_HOST_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: Every interface: the metrics are scraped from other machines.
DEFAULT_METRICS_ADDR = "0.0.0.0"  # noqa: S104


#: Redis on this machine, database 0; RabbitMQ is ``amqp://USER:PASSWORD@HOST:5672/VHOST``.
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


def _default_database_url() -> str:
    return f"sqlite:///{DEFAULT_DATA_DIR / 'pushworker.db'}"


@dataclass(frozen=True)
class Settings:
    """Every knob of the worker, the producer API and the CLI."""

    #: SQLAlchemy URL of the event log and job store (``PUSHWORKER_DATABASE_URL``).
    database_url: str
    #: Celery broker, Redis (``redis://``) or RabbitMQ (``amqp://``) (``PUSHWORKER_BROKER_URL``).
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
    #: Absolute directory every ``oci-layout:PATH`` and ``docker-archive:PATH`` source must
    #: resolve into, after symlinks and ``..``; a relative PATH is taken inside it. None (unset):
    #: file sources are refused, so a job can never read an arbitrary path of the worker's host
    #: (``PUSHWORKER_SOURCES_DIR``).
    sources_dir: str | None = None
    #: The skopeo binary that copies non-Docker sources (``PUSHWORKER_SKOPEO``); an absolute
    #: path, so that no PATH lookup decides which program receives the credentials.
    skopeo: str = DEFAULT_SKOPEO
    #: Seconds between Celery beat's reconcile runs (``PUSHWORKER_RECONCILE_EVERY``).
    reconcile_every: float = 60.0
    #: Seconds between seals of the event log's chains (``PUSHWORKER_SEAL_EVERY``): how long
    #: the newest events of a chain may go without a seal naming them (docs/event-log.md).
    seal_every: float = 10.0
    #: Seconds a queued or stalled job may go unstarted before reconcile republishes it
    #: (``PUSHWORKER_RECONCILE_GRACE``).
    reconcile_grace: float = 60.0
    #: Seconds between Celery beat's registry health checks (``PUSHWORKER_HEALTH_EVERY``).
    health_every: float = 300.0
    #: MiB of resident memory after which a worker's pool process is replaced, once its task
    #: ends (Celery's ``worker_max_memory_per_child``); 0: never (``PUSHWORKER_WORKER_MAX_MEMORY``).
    #: A safety net: a pool process settles at 150-210 MiB (docs/benchmarks.md, the bursts).
    worker_max_memory: int = 512
    #: The named Docker Engines jobs may ask for, in the order given, without repeats; the same
    #: list for producers and workers (``PUSHWORKER_DOCKER_HOSTS``, comma-separated).
    docker_hosts: tuple[str, ...] = ()
    #: The Docker host this worker pushes from (``PUSHWORKER_WORKER_HOST``). Checked against
    #: ``docker_hosts`` when the worker starts (tasks.app), which refuses to start with a logged
    #: error: producers and pushctl have no use for it and must not fail on it.
    worker_host: str | None = None
    #: Port of the worker's Prometheus endpoint; None: no metrics (``PUSHWORKER_METRICS_PORT``).
    metrics_port: int | None = None
    #: Address the endpoint listens on (``PUSHWORKER_METRICS_ADDR``).
    metrics_addr: str = DEFAULT_METRICS_ADDR
    #: prometheus_client's multiprocess directory; None: a fresh temporary one
    #: (``PROMETHEUS_MULTIPROC_DIR``).
    metrics_dir: str | None = None
    #: Who operator commands are recorded as; None: the login name (``PUSHWORKER_OPERATOR``).
    operator: str | None = None
    # --- flow control ---
    #: Seconds a job may wait for a capped or throttling registry before it fails with
    #: ``throttled_past_deadline``, when the job names no deadline (``PUSHWORKER_FLOW_DEADLINE``).
    flow_deadline: float = 3600.0
    #: Seconds a registry slot is leased for; the holder renews it every third of that while it
    #: pushes, so a dead worker's slot frees within this time (``PUSHWORKER_FLOW_LEASE``).
    flow_lease: float = 30.0
    #: Seconds a step that found no free slot waits before it asks again, re-queued, not
    #: sleeping in the pool (``PUSHWORKER_FLOW_POLL``).
    flow_poll: float = 1.0
    #: Concurrency a throttled registry with no configured cap climbs back to before it is
    #: uncapped again (``PUSHWORKER_FLOW_UNCAPPED_CEILING``).
    flow_uncapped_ceiling: int = 32
    #: 1 (default): registry limits are enforced through Redis (``flow_redis_url``); 0: no
    #: slots, rate or adaptive limit, a 429 is retried like any outage
    #: (``PUSHWORKER_FLOW_CONTROL``).
    flow_control: bool = True
    #: The Redis that holds flow control's slots, rates and limits (``PUSHWORKER_FLOW_REDIS_URL``);
    #: unset: the broker's, when the broker is Redis. With RabbitMQ as broker and flow control on
    #: it must be set, or every process refuses to start: one worker without the limits would
    #: push past them for all the others.
    flow_redis_url: str | None = None
    # --- the HTTP API ---
    #: Address ``pushctl api serve`` listens on (``PUSHWORKER_API_HOST``).
    api_host: str = "127.0.0.1"
    #: Its port (``PUSHWORKER_API_PORT``).
    api_port: int = 8080
    #: The largest request body the API reads, in bytes (``PUSHWORKER_API_MAX_BODY``).
    api_max_body: int = 65536
    # --- webhooks ---
    #: Seconds one webhook delivery attempt may take, whole (``PUSHWORKER_WEBHOOK_TIMEOUT``).
    webhook_timeout: float = 10.0
    #: Seconds between Celery beat's webhook runs (``PUSHWORKER_WEBHOOK_EVERY``).
    webhook_every: float = 2.0
    #: First delay before a failed delivery is tried again; doubles each attempt
    #: (``PUSHWORKER_WEBHOOK_RETRY_BASE``).
    webhook_retry_base: float = 10.0
    #: Longest delay between two attempts of a delivery (``PUSHWORKER_WEBHOOK_RETRY_MAX``).
    webhook_retry_max: float = 3600.0
    #: Seconds a delivery is retried for, from its first attempt, before it is marked dead
    #: (``PUSHWORKER_WEBHOOK_RETRY_FOR``).
    webhook_retry_for: float = 86400.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            database_url=env.get("PUSHWORKER_DATABASE_URL") or _default_database_url(),
            broker_url=_broker_url(env),
            secret_key=env.get("PUSHWORKER_SECRET_KEY") or None,
            docker_host=env.get("DOCKER_HOST") or None,
            log_format=env.get("PUSHWORKER_LOG_FORMAT", "auto"),
            http_timeout=_seconds(env, "PUSHWORKER_HTTP_TIMEOUT", 10, positive=True),
            push_timeout=_seconds(env, "PUSHWORKER_PUSH_TIMEOUT", 1800, positive=True),
            max_attempts=_integer(env, "PUSHWORKER_MAX_ATTEMPTS", 4, low=1),
            retry_base=_seconds(env, "PUSHWORKER_RETRY_BASE", 2),
            retry_max=_seconds(env, "PUSHWORKER_RETRY_MAX", 300),
            credential_env_prefix=env.get("PUSHWORKER_CREDENTIAL_ENV_PREFIX")
            or DEFAULT_CREDENTIAL_ENV_PREFIX,
            credentials_dir=env.get("PUSHWORKER_CREDENTIALS_DIR") or DEFAULT_CREDENTIALS_DIR,
            sources_dir=_text(env, "PUSHWORKER_SOURCES_DIR"),
            skopeo=_absolute(env, "PUSHWORKER_SKOPEO", DEFAULT_SKOPEO),
            reconcile_every=_seconds(env, "PUSHWORKER_RECONCILE_EVERY", 60, positive=True),
            seal_every=_seconds(env, "PUSHWORKER_SEAL_EVERY", 10, positive=True),
            reconcile_grace=_seconds(env, "PUSHWORKER_RECONCILE_GRACE", 60),
            health_every=_seconds(env, "PUSHWORKER_HEALTH_EVERY", 300, positive=True),
            worker_max_memory=_integer(env, "PUSHWORKER_WORKER_MAX_MEMORY", 512, low=0),
            docker_hosts=_docker_hosts(env),
            worker_host=_text(env, WORKER_HOST_ENV),
            metrics_port=_port(env, METRICS_PORT_ENV),
            metrics_addr=_text(env, "PUSHWORKER_METRICS_ADDR") or DEFAULT_METRICS_ADDR,
            metrics_dir=_text(env, METRICS_DIR_ENV),
            operator=env.get("PUSHWORKER_OPERATOR") or None,
            flow_deadline=_seconds(env, "PUSHWORKER_FLOW_DEADLINE", 3600, positive=True),
            flow_lease=_seconds(env, "PUSHWORKER_FLOW_LEASE", 30, positive=True),
            flow_poll=_seconds(env, "PUSHWORKER_FLOW_POLL", 1, positive=True),
            flow_uncapped_ceiling=_integer(
                env, "PUSHWORKER_FLOW_UNCAPPED_CEILING", 32, low=1, high=100000
            ),
            flow_control=_flow_control(env),
            flow_redis_url=_flow_redis_url(env),
            api_host=_text(env, "PUSHWORKER_API_HOST") or "127.0.0.1",
            api_port=_integer(env, "PUSHWORKER_API_PORT", 8080, low=1, high=65535),
            api_max_body=_integer(env, "PUSHWORKER_API_MAX_BODY", 65536, low=1024, high=2**26),
            webhook_timeout=_seconds(env, "PUSHWORKER_WEBHOOK_TIMEOUT", 10, positive=True),
            webhook_every=_seconds(env, "PUSHWORKER_WEBHOOK_EVERY", 2, positive=True),
            webhook_retry_base=_seconds(env, "PUSHWORKER_WEBHOOK_RETRY_BASE", 10, positive=True),
            webhook_retry_max=_seconds(env, "PUSHWORKER_WEBHOOK_RETRY_MAX", 3600, positive=True),
            webhook_retry_for=_seconds(env, "PUSHWORKER_WEBHOOK_RETRY_FOR", 86400),
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
            elif isinstance(value, tuple):
                shown[field.name] = ",".join(value)  # as the variable is written
            else:
                shown[field.name] = "" if value is None else str(value)
        return shown


# --- parsing: an empty variable means its default, as compose writes `NAME: ${NAME:-}` --------


def _text(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def _seconds(env: Mapping[str, str], name: str, default: float, *, positive: bool = False) -> float:
    """A finite number of seconds, > 0 (``positive``) or >= 0."""
    raw = env.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    # `not ... >` also refuses nan; a timedelta or a beat interval cannot hold infinity.
    if not math.isfinite(value) or not (value > 0 if positive else value >= 0):
        bound = "> 0" if positive else ">= 0"
        raise ValidationError(f"{name} must be a number of seconds {bound}, not {raw!r}")
    return value


def _integer(
    env: Mapping[str, str], name: str, default: int, *, low: int, high: int | None = None
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValidationError(f"{name} must be a whole number {bounds}, not {raw!r}")
    return value


def _absolute(env: Mapping[str, str], name: str, default: str) -> str:
    """An absolute path without NUL (a relative one would depend on each process's PATH or
    working directory)."""
    value = _text(env, name) or default
    if "\0" in value or not os.path.isabs(value):
        raise ValidationError(f"{name} must be an absolute path, not {value!r}")
    return value


def _port(env: Mapping[str, str], name: str) -> int | None:
    # Unset means "serve nothing", so there is no default port to fall back on.
    return _integer(env, name, 0, low=1, high=65535) if _text(env, name) else None


def _broker_url(env: Mapping[str, str]) -> str:
    return env.get("PUSHWORKER_BROKER_URL") or DEFAULT_BROKER_URL


def _flow_control(env: Mapping[str, str]) -> bool:
    return _integer(env, "PUSHWORKER_FLOW_CONTROL", 1, low=0, high=1) == 1


def _flow_redis_url(env: Mapping[str, str]) -> str | None:
    """``PUSHWORKER_FLOW_REDIS_URL``, else the broker's URL when the broker is Redis."""
    url = _text(env, FLOW_REDIS_URL_ENV)
    if url is not None:
        if broker_kind(url) != "redis":
            raise ValidationError(
                f"{FLOW_REDIS_URL_ENV} must be a redis://, rediss:// or unix:// URL, not "
                f"{mask_url_password(url)!r}"
            )
        return url
    broker = _broker_url(env)
    if broker_kind(broker) == "redis":
        return broker
    if _flow_control(env):
        raise ValidationError(
            f"{FLOW_REDIS_URL_ENV} must be set: flow control (PUSHWORKER_FLOW_CONTROL=1, the "
            f"default) keeps registry limits in Redis, and the broker "
            f"{mask_url_password(broker)!r} is not Redis. Set it to redis://HOST:PORT/DB, or set "
            "PUSHWORKER_FLOW_CONTROL=0 to push without registry limits"
        )
    return None


def _docker_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    """``PUSHWORKER_DOCKER_HOSTS``: names in the order given, repeats and empty items dropped."""
    names = [name.strip() for name in env.get(DOCKER_HOSTS_ENV, "").split(",")]
    for name in names:
        # A name no job can ask for (check_docker_host refuses its spelling) is a typo to fix.
        if name and not DOCKER_HOST_NAME.fullmatch(name):
            raise ValidationError(
                f"{DOCKER_HOSTS_ENV} holds {name!r}, which is not a Docker host name: use 1 to 63 "
                "of a-z, 0-9, '.', '-' and '_', starting with a letter or digit"
            )
    return tuple(dict.fromkeys(name for name in names if name))


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
