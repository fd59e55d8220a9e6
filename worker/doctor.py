"""``pushctl doctor``: ready-made checks of a deployment, each a finding with what to do.

Every check is a plain function returning ``Finding``s (name, ``ok``/``warn``/``fail``, detail,
fix); ``run`` calls them in order and the worst finding decides the exit code (0, 1, 2). A check
never raises: what it could not find out is a finding too. Checks that need the database are
skipped (``warn``, "not checked") when it does not answer or is not migrated, and so are the
queue checks when the broker does not answer: the cause is then the one ``fail``.

- **database**: reachable within the timeout (PostgreSQL's ``connect_timeout``; a SQLite file
  must exist: the doctor never creates one);
- **migrations**: the database is at the newest revision this code knows;
- **broker**: a connection within the timeout;
- **queue <name>**: at least one worker consumes it (Celery's ``inspect().active_queues()``):
  the default queue, each Docker host's queue, the webhook queue when a webhook subscription
  needs it, and the skopeo queue while a job copying a non-Docker source is unfinished;
- **beat <task>**: reconcile and registry health completed a run recently (their heartbeats,
  ``worker.store.heartbeats``): late after two intervals and a minute, failing after five;
- **secret key** and **credentials**: the key is set and valid, and decrypts every stored
  secret (registries' passwords, webhooks' signing secrets). A failure names the registry or
  webhook, never the ciphertext or the secret. References (``env:``/``file:``) are resolved by
  the worker in its own environment, so they are counted, not read, here;
- **registry <id>**: the status of its last recorded health check (``registry.health``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import NullPool, create_engine, select, text
from sqlalchemy.orm import Session

from worker.core.credentials import CredentialKind, decrypt_secret
from worker.core.errors import PushWorkerError, SecretKeyMissing
from worker.core.queues import DEFAULT_QUEUE, SKOPEO_QUEUE, WEBHOOK_QUEUE, queue_for
from worker.core.settings import Settings, get_settings, mask_url_password
from worker.metrics import BEAT_TASKS, beat_intervals
from worker.store import events, heartbeats, migrate, queries
from worker.store.db import read_scope
from worker.store.models import JobStatus, PushJob, Registry, WebhookSubscription, utcnow

OK, WARN, FAIL = "ok", "warn", "fail"
#: Exit code of ``pushctl doctor`` by its worst finding.
EXIT_CODES = {OK: 0, WARN: 1, FAIL: 2}
#: Seconds the broker connection and the workers' replies may take, by default.
DEFAULT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Finding:
    """One thing checked: ``status`` is ``ok``, ``warn`` or ``fail``; ``fix`` says what to do."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def worst(findings: Iterable[Finding]) -> str:
    return max((f.status for f in findings), key=EXIT_CODES.__getitem__, default=OK)


def exit_code(findings: Iterable[Finding]) -> int:
    return EXIT_CODES[worst(findings)]


class Broker(Protocol):
    """The broker as the doctor sees it (``CeleryBroker``; a fake in the unit tests)."""

    def ping(self, timeout: float) -> None:
        """Return once connected; raise on failure or after ``timeout`` seconds."""

    def active_queues(self, timeout: float) -> dict[str, list[str]]:
        """``{worker name: [queues it consumes]}`` of the workers that replied in time."""


class CeleryBroker:
    """The deployment's broker through a bare Celery app (same URL, Celery's default control
    exchange, as the workers), with every connection attempt bounded by the timeout."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _app(self, timeout: float) -> Any:
        from celery import Celery

        app = Celery("pushctl-doctor", broker=self.url, set_as_current=False)
        app.conf.broker_connection_timeout = timeout
        app.conf.broker_connection_retry = False
        app.conf.broker_connection_max_retries = 0
        return app

    def ping(self, timeout: float) -> None:
        app = self._app(timeout)
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)

    def active_queues(self, timeout: float) -> dict[str, list[str]]:
        app = self._app(timeout)
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            replies = app.control.inspect(timeout=timeout, connection=connection).active_queues()
        return {
            str(worker): [str(queue.get("name")) for queue in queues or []]
            for worker, queues in (replies or {}).items()
        }


# --- the database --------------------------------------------------------------------------------


def check_database(settings: Settings, timeout: float) -> list[Finding]:
    """``database`` (reachable) and ``migrations`` (at the newest revision)."""
    url = settings.database_url
    shown = mask_url_password(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:" and not Path(path).exists():
            return [
                Finding("database", FAIL, f"{shown}: no such file",
                        "check PUSHWORKER_DATABASE_URL, then run `pushctl db upgrade`"),
                _not_checked("migrations", "the database does not answer"),
            ]  # fmt: skip
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, math.ceil(timeout))
    elif url.startswith("sqlite"):
        connect_args["timeout"] = timeout
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            from alembic.runtime.migration import MigrationContext

            revision = MigrationContext.configure(connection).get_current_revision()
    except Exception as exc:  # any driver error: the database is not usable from here
        return [
            Finding("database", FAIL, f"{shown}: does not answer ({type(exc).__name__})",
                    "check PUSHWORKER_DATABASE_URL and that the database runs"),
            _not_checked("migrations", "the database does not answer"),
        ]  # fmt: skip
    finally:
        engine.dispose()
    head = migrate.head()
    found = [Finding("database", OK, f"{shown}: reachable")]
    if revision == head:
        found.append(Finding("migrations", OK, f"at revision {head}, the newest"))
    elif revision is None:
        found.append(
            Finding("migrations", FAIL, "no pushworker tables", "run `pushctl db upgrade`")
        )
    elif revision in _known_revisions():
        found.append(
            Finding("migrations", FAIL, f"at revision {revision}; this code needs {head}",
                    "run `pushctl db upgrade` (before starting workers of this version)")
        )  # fmt: skip
    else:
        found.append(
            Finding("migrations", WARN,
                    f"at revision {revision}, which this code does not know (newer code "
                    f"migrated it?); this code's newest is {head}",
                    "run the same version of pushworker everywhere")
        )  # fmt: skip
    return found


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrate.MIGRATIONS))
    return {revision.revision for revision in script.walk_revisions()}


def _not_checked(name: str, because: str) -> Finding:
    return Finding(name, WARN, f"not checked: {because}")


# --- the broker and the workers -------------------------------------------------------------------


def expected_queues(settings: Settings) -> list[str]:
    """Queues some worker must consume: the default one and each Docker host's."""
    return [DEFAULT_QUEUE, *(queue_for(host) for host in settings.docker_hosts)]


def check_broker(settings: Settings, broker: Broker, timeout: float) -> Finding:
    shown = mask_url_password(settings.broker_url)
    try:
        broker.ping(timeout)
    except Exception as exc:  # kombu raises many types; each means "not reachable"
        return Finding(
            "broker", FAIL, f"{shown}: no connection within {timeout:g} s ({type(exc).__name__})",
            "check PUSHWORKER_BROKER_URL and that the broker runs",
        )  # fmt: skip
    return Finding("broker", OK, f"{shown}: reachable")


def ping_redis(url: str, timeout: float) -> None:
    """PING the Redis at ``url`` within ``timeout`` seconds; raises when it does not answer."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


def check_flow_control(
    settings: Settings, timeout: float, ping: Callable[[str, float], None] = ping_redis
) -> Finding:
    """``flow control``: off, or its Redis (where every worker's registry limits are kept)
    answers. A worker that cannot reach it refuses to push to a limited registry."""
    if not settings.flow_control:
        return Finding(
            "flow control", OK, "off (PUSHWORKER_FLOW_CONTROL=0): registry limits are not enforced"
        )
    url = settings.flow_redis_url
    if url is None:  # settings refuse to load in that case; said here should that change
        return Finding("flow control", FAIL, "no Redis for the registry limits",
                       "set PUSHWORKER_FLOW_REDIS_URL")  # fmt: skip
    shown = mask_url_password(url)
    where = "the broker's Redis" if url == settings.broker_url else shown
    try:
        ping(url, timeout)
    except Exception as exc:  # redis-py raises many types; each means "not reachable"
        return Finding(
            "flow control", FAIL,
            f"{where}: no answer within {timeout:g} s ({type(exc).__name__}); pushes to "
            "registries with limits wait until it answers",
            "check PUSHWORKER_FLOW_REDIS_URL (or the broker's URL) and that Redis runs",
        )  # fmt: skip
    return Finding("flow control", OK, f"{where}: reachable (registry limits)")


@dataclass(frozen=True)
class OptionalQueue:
    """A queue that needs a worker only while something uses it: ``needed`` says whether
    something does (None: unknown, the database was not read); ``user`` names what would."""

    name: str
    needed: bool | None
    user: str


def optional_queues(webhooks: bool | None, copies: bool | None) -> list[OptionalQueue]:
    return [
        OptionalQueue(WEBHOOK_QUEUE, webhooks, "webhook subscription"),
        OptionalQueue(SKOPEO_QUEUE, copies, "unfinished job copying a non-Docker source"),
    ]


def check_queues(
    queues: Sequence[str],
    broker: Broker,
    timeout: float,
    optional: Sequence[OptionalQueue] = (),
) -> list[Finding]:
    """One finding per queue: which workers consume it (a ``fail`` when none does, unless the
    queue is optional and nothing needs it)."""
    try:
        consumers = broker.active_queues(timeout)
    except Exception as exc:  # the broker went away between the two checks, or refused
        return [
            Finding(f"queue {q}", FAIL, f"the workers could not be asked ({type(exc).__name__})",
                    "check the broker")
            for q in [*queues, *(o.name for o in optional)]
        ]  # fmt: skip
    found = [_queue_finding(queue, consumers, timeout) for queue in queues]
    for queue in optional:
        finding = _queue_finding(queue.name, consumers, timeout)
        if finding.status == FAIL and queue.needed is False:
            finding = Finding(
                finding.name, OK, f"no worker consumes it, and no {queue.user} needs one"
            )
        elif finding.status == FAIL and queue.needed is None:
            finding = Finding(
                finding.name, WARN,
                f"no worker consumes it (whether a {queue.user} needs one is unknown: the "
                "database was not read)",
                f"start a worker with `-Q {queue.name}` if it is used",
            )  # fmt: skip
        found.append(finding)
    return found


def _queue_finding(queue: str, consumers: dict[str, list[str]], timeout: float) -> Finding:
    workers = sorted(worker for worker, names in consumers.items() if queue in names)
    if workers:
        plural = "s" if len(workers) > 1 else ""
        return Finding(
            f"queue {queue}", OK, f"consumed by {len(workers)} worker{plural}: "
            + ", ".join(workers),
        )  # fmt: skip
    answered = f"{len(consumers)} worker(s) answered within {timeout:g} s, none consumes it"
    return Finding(
        f"queue {queue}", FAIL, answered,
        f"start a worker consuming it: `celery -A tasks.app worker -Q {queue}`"
        + ("" if queue in (DEFAULT_QUEUE, WEBHOOK_QUEUE, SKOPEO_QUEUE) else
           f" (or PUSHWORKER_WORKER_HOST={queue.removeprefix(DEFAULT_QUEUE + '.')})"),
    )  # fmt: skip


# --- beat --------------------------------------------------------------------------------------


def check_beat(session: Session, settings: Settings, now: datetime) -> list[Finding]:
    """One finding per periodic task: when it last completed a run, against its interval."""
    runs = heartbeats.last_runs(session)
    intervals = beat_intervals(settings)
    found = []
    for task in BEAT_TASKS:
        every = intervals[task]
        name = f"beat {task.rsplit('.', 1)[-1]}"
        fix = (
            "run exactly one `celery -A tasks.app beat`, and a worker consuming "
            f"{DEFAULT_QUEUE} (where its tasks run); read the beat's and the worker's logs"
        )
        row = runs.get(task)
        if row is None:
            found.append(Finding(name, FAIL, f"no run recorded (scheduled every {every:g} s)", fix))
            continue
        age = max((now - row.at).total_seconds(), 0.0)
        detail = (
            f"last run {_ago(age)} ago, {row.at:%Y-%m-%d %H:%M:%SZ}, by {row.actor} "
            f"(every {every:g} s)"
        )
        if age <= 2 * every + 60:
            found.append(Finding(name, OK, detail))
        elif age <= 5 * every + 60:
            found.append(Finding(name, WARN, f"late: {detail}", fix))
        else:
            found.append(Finding(name, FAIL, f"stopped: {detail}", fix))
    return found


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- secrets -----------------------------------------------------------------------------------


def check_secrets(session: Session, settings: Settings) -> list[Finding]:
    """``secret key`` (set, a Fernet key) and ``credentials`` (every stored secret decrypts)."""
    registries = session.scalars(
        select(Registry).where(Registry.removed_at.is_(None)).order_by(Registry.id)
    ).all()
    webhooks = session.scalars(
        select(WebhookSubscription)
        .where(WebhookSubscription.removed_at.is_(None))
        .order_by(WebhookSubscription.id)
    ).all()
    stored: list[tuple[str, str]] = [
        (f"registry {r.id} ({r.name})", r.credential_secret)
        for r in registries
        if r.auth_required and r.credential_kind == CredentialKind.SECRET and r.credential_secret
    ]
    stored += [(f"webhook {w.id}", w.secret) for w in webhooks]
    references = sum(
        1
        for r in registries
        if r.auth_required and r.credential_kind in (CredentialKind.ENV, CredentialKind.FILE)
    )
    missing = [
        f"registry {r.id} ({r.name})"
        for r in registries
        if r.auth_required and not (r.username and (r.credential_secret or r.credential_ref))
    ]
    key = _check_key(settings, len(stored))
    if key.status == FAIL:
        return [key, _not_checked("credentials", "no usable secret key")]
    failures: list[str] = []
    for owner, token in stored:
        try:
            if not decrypt_secret(token, owner, key=settings.secret_key):
                failures.append(f"{owner}: the stored secret is empty")
        except PushWorkerError:
            # Only whose secret it is: never the ciphertext, nor the library's words about it.
            failures.append(f"{owner}: the stored secret does not decrypt with this key")
    failures += [f"{owner}: no credential configured" for owner in missing]
    counted = f"{len(stored)} stored secret(s)"
    by_reference = (
        f"; {references} by reference (env:/file:, read by the worker in its own environment, "
        "not here)"
        if references
        else ""
    )
    if failures:
        return [
            key,
            Finding(
                "credentials", FAIL, "; ".join(failures) + by_reference,
                "set them again: `pushctl registry set-credential ID` (a webhook: remove and add "
                "it again); if PUSHWORKER_SECRET_KEY changed, restore the key they were stored "
                "with",
            ),
        ]  # fmt: skip
    return [key, Finding("credentials", OK, f"{counted} decrypt{by_reference}")]


def _check_key(settings: Settings, stored: int) -> Finding:
    fix = "set PUSHWORKER_SECRET_KEY, the same everywhere (`pushctl config new-key` for a new one)"
    if not settings.secret_key:
        if stored:
            return Finding("secret key", FAIL, f"not set, and {stored} stored secret(s) need it",
                           fix)  # fmt: skip
        return Finding("secret key", WARN, "not set: no secret can be stored", fix)
    try:
        from cryptography.fernet import Fernet

        Fernet(settings.secret_key.encode())
    except ValueError:
        return Finding("secret key", FAIL, "PUSHWORKER_SECRET_KEY is not a Fernet key", fix)
    return Finding("secret key", OK, "set, a valid Fernet key")


# --- registries ----------------------------------------------------------------------------------


def check_registries(session: Session) -> list[Finding]:
    """One finding per registry: the status of its last recorded health check."""
    registries = session.scalars(
        select(Registry).where(Registry.removed_at.is_(None)).order_by(Registry.id)
    ).all()
    found = []
    for registry in registries:
        name = f"registry {registry.id}"
        rows = queries.select_events(
            session, stream=events.registry_stream(registry.id), types=["registry.health"],
            newest_first=True, limit=1,
        )  # fmt: skip
        where = f"{registry.name}, {registry.host}"
        if not rows:
            found.append(
                Finding(name, WARN, f"{where}: no health check recorded yet",
                        f"is beat running? `pushctl registry test {registry.id}` checks it now")
            )  # fmt: skip
            continue
        row = rows[0]
        payload = row.payload or {}
        status = str(payload.get("status"))
        since = f"since {row.time:%Y-%m-%d %H:%M:%SZ}"
        if status == "healthy":
            found.append(Finding(name, OK, f"{where}: healthy {since}"))
            continue
        message = str(payload.get("error_message") or payload.get("error_code") or "")
        found.append(
            Finding(
                name, FAIL, f"{where}: {status} {since}" + (f": {message}" if message else ""),
                str(payload.get("hint") or f"`pushctl registry test {registry.id}`"),
            )
        )  # fmt: skip
    if not registries:
        found.append(Finding("registries", WARN, "no registry configured",
                             "`pushctl registry add NAME URL ...`"))  # fmt: skip
    return found


def _webhooks_needed(session: Session) -> bool:
    return (
        session.scalar(
            select(WebhookSubscription.id).where(WebhookSubscription.removed_at.is_(None)).limit(1)
        )
        is not None
    )


def _copies_needed(session: Session) -> bool:
    unfinished = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
    return (
        session.scalar(
            select(PushJob.id)
            .where(PushJob.status.in_(unfinished), PushJob.source_kind != "docker")
            .limit(1)
        )
        is not None
    )


# --- all of them -------------------------------------------------------------------------------


def run(
    *,
    settings: Settings | None = None,
    broker: Broker | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    now: Callable[[], datetime] = utcnow,
    flow_ping: Callable[[str, float], None] = ping_redis,
) -> list[Finding]:
    """Every check, in order; never raises."""
    settings = settings or get_settings()
    broker = broker or CeleryBroker(settings.broker_url)
    found = check_database(settings, timeout)
    schema_ok = all(f.status == OK for f in found)
    webhooks_needed: bool | None = None
    copies_needed: bool | None = None
    later: list[Finding] = []
    if schema_ok:
        webhooks_needed = _guarded(_webhooks_needed, later, "webhook subscriptions")
        copies_needed = _guarded(_copies_needed, later, "copied sources")
        beat = _guarded(lambda s: check_beat(s, settings, now()), later, "beat")
        secrets = _guarded(lambda s: check_secrets(s, settings), later, "credentials")
        registries = _guarded(check_registries, later, "registries")
        later = [*(beat or []), *(secrets or []), *(registries or []), *later]
    else:
        because = "the database is not reachable or not migrated"
        later = [_not_checked(n, because) for n in ("beat", "credentials", "registries")]
    broker_found = check_broker(settings, broker, timeout)
    found.append(broker_found)
    found.append(check_flow_control(settings, timeout, flow_ping))
    queues = expected_queues(settings)
    if broker_found.status == OK:
        found += check_queues(
            queues, broker, timeout, optional_queues(webhooks_needed, copies_needed)
        )
    else:
        found += [_not_checked(f"queue {q}", "the broker does not answer") for q in queues]
    return [*found, *later]


def _guarded(check: Callable[[Session], Any], failures: list[Finding], name: str) -> Any:
    """``check(session)`` in a read-only session; a failure becomes a ``fail`` finding."""
    try:
        with read_scope() as session:
            return check(session)
    except SecretKeyMissing as exc:
        failures.append(Finding(name, FAIL, exc.message, exc.hint))
    except PushWorkerError as exc:
        failures.append(Finding(name, FAIL, f"could not check: {exc.message}", exc.hint))
    except Exception as exc:  # a doctor reports, it does not crash
        failures.append(Finding(name, FAIL, f"could not check ({type(exc).__name__})"))
    return None
