"""Registry health: the connection test of ``pushctl registry test``, run on a schedule.

Celery beat runs ``pushworker.health.check_registries`` (``PUSHWORKER_HEALTH_EVERY`` seconds).
Each registry gets one of three statuses:

- ``healthy``: dns, tcp, tls, v2 and credentials all passed;
- ``credentials_failing``: the registry answers, but its credential is missing, unreadable or
  refused (the incident's empty password, seen here before a push fails);
- ``unhealthy``: any other failure (name, connection, certificate, API).

A ``registry.health`` event is appended to the registry's stream only when its status differs
from the one of its last ``registry.health`` event, and once per change even when several
checks race (the stream's sequence numbers serialise them). A change to ``unhealthy`` or
``credentials_failing`` is also one error log line; a recovery is an info line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from worker import metrics
from worker.core.errors import AuthenticationError, CredentialError, EventConflict, PushWorkerError
from worker.core.logs import get_logger
from worker.probe import ConnectionReport, check_registry
from worker.registries import list_registries
from worker.store import events, queries
from worker.store.db import session_scope
from worker.store.models import Registry

log = get_logger("pushworker.health")

HEALTHY, UNHEALTHY, CREDENTIALS_FAILING = "healthy", "unhealthy", "credentials_failing"
EVENT = "registry.health"
#: Registries checked at once: the checks wait on the network, not on the CPU.
PARALLEL_CHECKS = 8


@dataclass(frozen=True)
class Health:
    """One registry's check: its status, the status recorded before, and whether it changed."""

    registry_id: int
    status: str
    previous: str | None
    changed: bool
    report: ConnectionReport
    seconds: float


def _codes(*roots: type[PushWorkerError]) -> frozenset[str]:
    codes: set[str] = set()
    pending: list[type[PushWorkerError]] = list(roots)
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return frozenset(codes)


def status_of(report: ConnectionReport) -> str:
    """``healthy``, ``credentials_failing`` or ``unhealthy``, from the failure's error code.

    The code, not the name of the failed check: a registry that goes away between its v2 and
    credentials checks fails the credentials check with ``registry_unavailable``, and that is
    an outage, not a credential problem.
    """
    failure = report.failure
    if failure is None and report.ok:
        return HEALTHY
    if failure is not None and failure.error_code in _codes(CredentialError, AuthenticationError):
        return CREDENTIALS_FAILING
    return UNHEALTHY


def last_status(registry_id: int) -> str | None:
    """The status of the registry's last ``registry.health`` event (None: never recorded)."""
    with session_scope() as session:
        rows = queries.select_events(
            session, stream=events.registry_stream(registry_id), types=[EVENT],
            newest_first=True, limit=1,
        )  # fmt: skip
        return str(rows[0].payload.get("status")) if rows else None


def check_registries(
    *,
    actor: str,
    timeout: float = 10,
    check: Callable[[Registry, float], ConnectionReport] | None = None,
) -> list[Health]:
    """Check every registry that is not removed; record and log each change of status."""
    with session_scope() as session:
        registries = list_registries(session)
    probe = check or _check
    with ThreadPoolExecutor(max_workers=PARALLEL_CHECKS, thread_name_prefix="health") as pool:
        timed = list(pool.map(lambda r: _timed(probe, r, timeout), registries))
    results = [_record(registry, report, seconds, actor) for registry, (report, seconds)
               in zip(registries, timed, strict=True)]  # fmt: skip
    _summarize(results)
    return results


def _check(registry: Registry, timeout: float) -> ConnectionReport:
    return check_registry(registry, timeout=timeout)


def _timed(
    probe: Callable[[Registry, float], ConnectionReport], registry: Registry, timeout: float
) -> tuple[ConnectionReport, float]:
    start = time.perf_counter()
    with structlog.contextvars.bound_contextvars(registry_id=registry.id):
        report = probe(registry, timeout)
    return report, time.perf_counter() - start


def _record(registry: Registry, report: ConnectionReport, seconds: float, actor: str) -> Health:
    status = status_of(report)
    with structlog.contextvars.bound_contextvars(registry_id=registry.id):
        metrics.observe_health(registry.id, status, seconds)
        for attempt in range(5):
            try:
                previous, changed = _append_if_changed(registry, report, status, actor)
                break
            except EventConflict:
                # Another check appended to this stream first: read its status, decide again.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        health = Health(registry.id, status, previous, changed, report, seconds)
        if changed:
            _log_change(registry, health)  # after the commit: only the check that recorded it
    return health


def _append_if_changed(
    registry: Registry, report: ConnectionReport, status: str, actor: str
) -> tuple[str | None, bool]:
    with session_scope() as session:
        rows = queries.select_events(
            session, stream=events.registry_stream(registry.id), types=[EVENT],
            newest_first=True, limit=1,
        )  # fmt: skip
        previous = str(rows[0].payload.get("status")) if rows else None
        if previous == status:
            return previous, False
        payload: dict[str, object] = {
            "status": status, "ok": report.ok, "registry_name": registry.name,
            "registry_host": registry.host,
            "checks": [check.to_dict() for check in report.checks],
        }  # fmt: skip
        if previous is not None:
            payload["previous_status"] = previous
        failure = report.failure
        if failure is not None:
            payload["error_code"] = failure.error_code or PushWorkerError.code
            payload["error_message"] = f"{failure.name}: {failure.detail}"
            if failure.fix:
                payload["hint"] = failure.fix
        events.append(
            session, stream=events.registry_stream(registry.id), type=EVENT, actor=actor,
            registry_id=registry.id, payload=payload,
        )  # fmt: skip
        return previous, True


def _log_change(registry: Registry, health: Health) -> None:
    fields = {
        "registry_name": registry.name, "registry_host": registry.host,
        "status": health.status, "previous_status": health.previous,
    }  # fmt: skip
    failure = health.report.failure
    if health.status == HEALTHY:
        log.info("registry.recovered" if health.previous else "registry.healthy", **fields)
        return
    assert failure is not None, "an unhealthy report names its failed check"
    what = "credentials are failing" if health.status == CREDENTIALS_FAILING else "is unhealthy"
    log.error(
        f"registry.{health.status}",
        message=f"registry {registry.id} ({registry.name}, {registry.host}) {what}: "
        f"{failure.name} check failed: {failure.detail}",
        check=failure.name, error_code=failure.error_code, hint=failure.fix, **fields,
    )  # fmt: skip


def _summarize(results: Iterable[Health]) -> None:
    counts: dict[str, int] = {HEALTHY: 0, UNHEALTHY: 0, CREDENTIALS_FAILING: 0}
    changed = 0
    for health in results:
        counts[health.status] += 1
        changed += health.changed
    log.info("health.checked", changed=changed, **counts)
