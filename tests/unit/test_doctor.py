"""``pushctl doctor``: each check's ok, warn and fail on a throwaway SQLite database, with a fake
broker (the real one: tests/e2e/test_monitoring.py)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy import update

from worker import doctor
from worker.cli import cli
from worker.core.queues import HEALTH_TASK, RECONCILE_TASK, SEAL_TASK
from worker.core.settings import get_settings
from worker.doctor import FAIL, OK, WARN, Finding
from worker.jobs import PushRequest, create_job
from worker.registries import RegistrySpec, create_registry
from worker.store import events, heartbeats, migrate
from worker.store.db import session_scope
from worker.store.migrate import upgrade
from worker.store.models import PushJob, Registry, utcnow
from worker.webhooks import add_subscription

PASSWORD = "hunter2-never-shown"  # a stored secret, looked for in every output
URL = "http://127.0.0.1:9/hook"  # allow_private: add_subscription resolves the name


class FakeBroker:
    def __init__(self, up: bool = True, consumers: dict[str, list[str]] | None = None) -> None:
        self.up = up
        self.consumers = consumers if consumers is not None else {}
        self.asked: list[float] = []

    def ping(self, timeout: float) -> None:
        self.asked.append(timeout)
        if not self.up:
            raise ConnectionRefusedError("refused")

    def active_queues(self, timeout: float) -> dict[str, list[str]]:
        if not self.up:
            raise ConnectionRefusedError("refused")
        return self.consumers


HEALTHY_BROKER = {"w1@h": ["pushworker"], "w2@h": ["pushworker", "pushworker.webhooks"]}


def by_name(findings: list[Finding]) -> dict[str, Finding]:
    return {f.name: f for f in findings}


def add_registry(registry_id: int = 5, name: str = "harbor") -> None:
    with session_scope() as session:
        spec = RegistrySpec(
            name=name, url=f"https://{name}.example.com", username="ci", secret=PASSWORD
        )
        create_registry(session, spec, registry_id=registry_id)


def health_event(registry_id: int, status: str, **payload: str) -> None:
    with session_scope() as session:
        events.append(
            session, stream=events.registry_stream(registry_id), type="registry.health",
            actor="worker:h:1", registry_id=registry_id, payload={"status": status, **payload},
        )  # fmt: skip


def beat_both(at: datetime | None = None) -> None:
    with session_scope() as session:
        heartbeats.beat(session, RECONCILE_TASK, "worker:h:1", at=at)
        heartbeats.beat(session, HEALTH_TASK, "worker:h:1", at=at)
        heartbeats.beat(session, SEAL_TASK, "worker:h:1", at=at)


def rotate_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()


# --- database and migrations ----------------------------------------------------------------


def test_missing_sqlite_file_fails_and_is_not_created(tmp_path: Path) -> None:
    settings = get_settings()
    found = by_name(doctor.check_database(settings, 1))
    assert found["database"].status == FAIL and "no such file" in found["database"].detail
    assert found["migrations"].status == WARN
    assert not (tmp_path / "pushworker.db").exists()


def test_migrated_database_is_ok(sqlite_url: str) -> None:
    found = by_name(doctor.check_database(get_settings(), 1))
    assert (found["database"].status, found["migrations"].status) == (OK, OK)
    assert found["migrations"].detail == f"at revision {migrate.head()}, the newest"


def test_database_without_tables_fails(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "pushworker.db").close()
    found = by_name(doctor.check_database(get_settings(), 1))
    assert found["database"].status == OK
    assert found["migrations"].status == FAIL
    assert found["migrations"].fix == "run `pushctl db upgrade`"


def test_older_revision_fails_and_unknown_revision_warns(tmp_path: Path) -> None:
    url = get_settings().database_url
    upgrade(url, "0007")
    found = by_name(doctor.check_database(get_settings(), 1))
    assert found["migrations"].status == FAIL and "at revision 0007" in found["migrations"].detail
    with sqlite3.connect(tmp_path / "pushworker.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    found = by_name(doctor.check_database(get_settings(), 1))
    assert found["migrations"].status == WARN and "9999" in found["migrations"].detail


def test_postgresql_that_does_not_answer_fails_with_the_password_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Port 1: nothing listens, the connection is refused at once.
    monkeypatch.setenv("PUSHWORKER_DATABASE_URL", "postgresql+psycopg://pw:sekrit@127.0.0.1:1/pw")
    get_settings.cache_clear()
    found = by_name(doctor.check_database(get_settings(), 1))
    assert found["database"].status == FAIL
    assert found["database"].detail.startswith("postgresql+psycopg://pw:***@127.0.0.1:1/pw: ")
    assert "sekrit" not in repr(found)


# --- broker and queues -------------------------------------------------------------------------


def test_broker_down_fails_and_queues_are_not_checked(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHWORKER_BROKER_URL", "redis://:sekrit@127.0.0.1:1/0")
    get_settings.cache_clear()
    found = by_name(doctor.run(broker=FakeBroker(up=False), timeout=0.5))
    assert found["broker"].status == FAIL
    assert "sekrit" not in found["broker"].detail and ":***@" in found["broker"].detail
    assert found["queue pushworker"].status == WARN
    assert found["queue pushworker"].detail == "not checked: the broker does not answer"


def test_queue_without_a_consumer_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_DOCKER_HOSTS", "builder-1")
    get_settings.cache_clear()
    queues = doctor.expected_queues(get_settings())
    assert queues == ["pushworker", "pushworker.builder-1"]
    optional = doctor.optional_queues(webhooks=True, copies=False)
    found = by_name(doctor.check_queues(queues, FakeBroker(consumers=HEALTHY_BROKER), 1, optional))
    assert found["queue pushworker"].status == OK
    assert found["queue pushworker"].detail == "consumed by 2 workers: w1@h, w2@h"
    assert found["queue pushworker.builder-1"].status == FAIL
    assert "PUSHWORKER_WORKER_HOST=builder-1" in (found["queue pushworker.builder-1"].fix or "")
    assert found["queue pushworker.webhooks"].status == OK


@pytest.mark.parametrize(("needed", "status"), [(True, FAIL), (False, OK), (None, WARN)])
def test_webhook_and_skopeo_queues_matter_only_when_something_needs_them(
    needed: bool | None, status: str
) -> None:
    broker = FakeBroker(consumers={"w1@h": ["pushworker"]})
    for webhooks, copies, queue in ((needed, False, "pushworker.webhooks"),
                                    (False, needed, "pushworker.skopeo")):  # fmt: skip
        optional = doctor.optional_queues(webhooks=webhooks, copies=copies)
        found = by_name(doctor.check_queues(["pushworker"], broker, 1, optional))
        assert found[f"queue {queue}"].status == status
        assert [f.status for f in found.values()].count(OK) == (3 if status == OK else 2)


def test_an_unfinished_copied_source_job_needs_the_skopeo_queue(sqlite_url: str) -> None:
    healthy_deployment()
    with session_scope() as session:
        job, _ = create_job(session, PushRequest("app:1", 5, "team/app", "1", "t"), actor="t")
        job_id = job.id
    broker = FakeBroker(consumers=HEALTHY_BROKER)
    assert by_name(doctor.run(broker=broker))["queue pushworker.skopeo"].status == OK
    with session_scope() as session:
        session.execute(update(PushJob).where(PushJob.id == job_id).values(source_kind="registry"))
    found = by_name(doctor.run(broker=broker))["queue pushworker.skopeo"]
    assert found.status == FAIL
    assert (
        found.fix
        == "start a worker consuming it: `celery -A tasks.app worker -Q pushworker.skopeo`"
    )


def test_workers_that_cannot_be_asked_fail_every_queue() -> None:
    class Flaky(FakeBroker):
        def active_queues(self, timeout: float) -> dict[str, list[str]]:
            raise TimeoutError

    optional = doctor.optional_queues(webhooks=False, copies=False)
    found = doctor.check_queues(["pushworker"], Flaky(), 1, optional)
    assert [(f.name, f.status) for f in found] == [
        ("queue pushworker", FAIL), ("queue pushworker.webhooks", FAIL),
        ("queue pushworker.skopeo", FAIL),
    ]  # fmt: skip
    assert "TimeoutError" in found[0].detail


# --- beat ----------------------------------------------------------------------------------------


def test_beat_never_recorded_fails(sqlite_url: str) -> None:
    with session_scope() as session:
        found = doctor.check_beat(session, get_settings(), utcnow())
    assert [(f.name, f.status) for f in found] == [
        ("beat reconcile", FAIL), ("beat check_registries", FAIL), ("beat seal_events", FAIL),
    ]  # fmt: skip
    assert found[0].detail == "no run recorded (scheduled every 60 s)"


@pytest.mark.parametrize(
    ("reconcile_age", "status", "word"),
    [(30, OK, "last run"), (200, WARN, "late"), (400, FAIL, "stopped")],
)
def test_beat_by_age_against_the_interval(
    sqlite_url: str, reconcile_age: float, status: str, word: str
) -> None:
    # Reconcile every 60 s: late after 2 x 60 + 60 = 180 s, stopped after 5 x 60 + 60 = 360 s.
    now = utcnow()
    with session_scope() as session:
        heartbeats.beat(
            session, RECONCILE_TASK, "worker:h:7", at=now - timedelta(seconds=reconcile_age)
        )
        heartbeats.beat(session, HEALTH_TASK, "worker:h:7", at=now - timedelta(seconds=30))
        heartbeats.beat(session, SEAL_TASK, "worker:h:7", at=now - timedelta(seconds=5))
    with session_scope() as session:
        found = by_name(doctor.check_beat(session, get_settings(), now))
    assert found["beat reconcile"].status == status
    assert found["beat reconcile"].detail.startswith(word)
    assert "worker:h:7" in found["beat reconcile"].detail
    assert found["beat check_registries"].status == OK


def test_a_run_overwrites_the_heartbeat(sqlite_url: str) -> None:
    earlier = utcnow() - timedelta(hours=1)
    beat_both(at=earlier)
    assert heartbeats.record(RECONCILE_TASK, "worker:h:2") is True
    with session_scope() as session:
        runs = heartbeats.last_runs(session)
    assert sorted(runs) == sorted([RECONCILE_TASK, HEALTH_TASK, SEAL_TASK])
    assert runs[RECONCILE_TASK].actor == "worker:h:2" and runs[RECONCILE_TASK].at > earlier
    assert runs[HEALTH_TASK].at == earlier


def test_beats_tasks_record_their_heartbeat_after_a_run(sqlite_url: str) -> None:
    from tasks.health import check_registries
    from tasks.maintenance import reconcile, seal_events

    # Called directly, a Celery task runs here, as a worker runs it (no registry to check).
    assert reconcile() == {"republished": [], "deferred": [], "waiting": 0}
    assert check_registries() == {}
    # Nothing recorded yet: no seal to take (the log is empty).
    assert seal_events() == {"id": None, "hash": None, "created": False, "lanes": 0}
    with session_scope() as session:
        runs = heartbeats.last_runs(session)
        assert sorted(runs) == sorted([RECONCILE_TASK, HEALTH_TASK, SEAL_TASK])
        assert all(run.actor.startswith("worker:") for run in runs.values())
        found = by_name(doctor.check_beat(session, get_settings(), utcnow()))
    names = ("beat reconcile", "beat check_registries", "beat seal_events")
    assert [found[n].status for n in names] == [OK, OK, OK]


def test_heartbeat_not_recorded_when_the_database_is_away(tmp_path: Path) -> None:
    # No tables at all: the run's work is done, only the heartbeat is missing (a warning line).
    assert heartbeats.record(RECONCILE_TASK, "worker:h:2") is False


# --- secrets -------------------------------------------------------------------------------------


def test_secrets_that_decrypt(sqlite_url: str) -> None:
    add_registry()
    with session_scope() as session:
        add_subscription(session, URL, ["job.failed"], allow_private=True, actor="t")
        found = by_name(doctor.check_secrets(session, get_settings()))
    assert found["secret key"].status == OK
    assert found["credentials"] == Finding("credentials", OK, "2 stored secret(s) decrypt")


def test_a_changed_key_names_each_owner_and_never_the_secret(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_registry(5, "harbor")
    add_registry(4, "gitlab")
    with session_scope() as session:
        add_subscription(session, URL, ["job.failed"], allow_private=True, actor="t")
        ciphertext = session.get(Registry, 5).credential_secret  # type: ignore[union-attr]
    rotate_key(monkeypatch)
    with session_scope() as session:
        found = by_name(doctor.check_secrets(session, get_settings()))
    credentials = found["credentials"]
    assert credentials.status == FAIL
    assert credentials.detail == (
        "registry 4 (gitlab): the stored secret does not decrypt with this key; "
        "registry 5 (harbor): the stored secret does not decrypt with this key; "
        "webhook 1: the stored secret does not decrypt with this key"
    )
    assert ciphertext and ciphertext not in repr(found) and PASSWORD not in repr(found)


def test_references_are_counted_not_read(sqlite_url: str) -> None:
    with session_scope() as session:
        spec = RegistrySpec(name="gl", url="https://gl.example.com", username="ci",
                            credential_ref="env:REGISTRY_CREDENTIAL_GL")  # fmt: skip
        create_registry(session, spec, registry_id=3)
        found = by_name(doctor.check_secrets(session, get_settings()))
    assert found["credentials"].status == OK
    assert "1 by reference" in found["credentials"].detail


def test_registry_without_a_credential_fails(sqlite_url: str) -> None:
    add_registry()
    with session_scope() as session:
        session.execute(update(Registry).values(credential_secret=None))
        found = by_name(doctor.check_secrets(session, get_settings()))
    assert found["credentials"].status == FAIL
    assert found["credentials"].detail == "registry 5 (harbor): no credential configured"


def test_missing_key_fails_when_secrets_need_it_and_warns_otherwise(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PUSHWORKER_SECRET_KEY")
    get_settings.cache_clear()
    with session_scope() as session:
        found = by_name(doctor.check_secrets(session, get_settings()))
    assert found["secret key"].status == WARN
    assert found["credentials"].status == OK
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()
    add_registry()
    monkeypatch.delenv("PUSHWORKER_SECRET_KEY")
    get_settings.cache_clear()
    with session_scope() as session:
        found = by_name(doctor.check_secrets(session, get_settings()))
    assert found["secret key"].status == FAIL
    assert found["secret key"].detail == "not set, and 1 stored secret(s) need it"
    assert found["credentials"].status == WARN


def test_a_key_that_is_not_fernet_fails(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_SECRET_KEY", "not-a-key")
    get_settings.cache_clear()
    with session_scope() as session:
        found = by_name(doctor.check_secrets(session, get_settings()))
    assert found["secret key"].status == FAIL
    assert "not-a-key" not in repr(found)


# --- registries ----------------------------------------------------------------------------------


def test_registry_health_by_its_last_recorded_check(sqlite_url: str) -> None:
    add_registry(5, "harbor")
    add_registry(4, "gitlab")
    add_registry(3, "quay")
    health_event(5, "healthy")
    health_event(4, "healthy")
    health_event(4, "credentials_failing", error_message="credentials: HTTP 401",
                 hint="set the right password: pushctl registry set-credential 4")  # fmt: skip
    with session_scope() as session:
        found = by_name(doctor.check_registries(session))
    assert found["registry 5"].status == OK
    assert found["registry 5"].detail.startswith("harbor, harbor.example.com: healthy since ")
    assert found["registry 4"].status == FAIL
    assert "credentials_failing" in found["registry 4"].detail
    assert found["registry 4"].detail.endswith(": credentials: HTTP 401")
    assert found["registry 4"].fix == "set the right password: pushctl registry set-credential 4"
    assert found["registry 3"].status == WARN
    assert found["registry 3"].detail == "quay, quay.example.com: no health check recorded yet"


def test_no_registry_warns(sqlite_url: str) -> None:
    with session_scope() as session:
        assert [f.status for f in doctor.check_registries(session)] == [WARN]


# --- everything, and the command ---------------------------------------------------------------


def healthy_deployment() -> None:
    add_registry()
    health_event(5, "healthy")
    beat_both()


def test_run_all_ok(sqlite_url: str) -> None:
    healthy_deployment()
    findings = doctor.run(
        broker=FakeBroker(consumers=HEALTHY_BROKER), timeout=0.5, flow_ping=lambda url, t: None
    )
    assert [f for f in findings if f.status != OK] == []
    assert [f.name for f in findings] == [
        "database", "migrations", "broker", "flow control", "queue pushworker",
        "queue pushworker.webhooks", "queue pushworker.skopeo", "beat reconcile",
        "beat check_registries", "beat seal_events", "secret key", "credentials", "registry 5",
    ]  # fmt: skip
    assert doctor.exit_code(findings) == 0


def test_dependent_checks_are_skipped_when_the_database_is_away(tmp_path: Path) -> None:
    found = by_name(doctor.run(broker=FakeBroker(consumers=HEALTHY_BROKER), timeout=0.5))
    assert found["database"].status == FAIL
    assert [found[n].status for n in ("beat", "credentials", "registries")] == [WARN] * 3
    # Unknown whether webhooks are used: a warning, not a failure of its own.
    assert found["queue pushworker.webhooks"].status == OK


def test_exit_code_is_the_worst_finding() -> None:
    ok, warn, fail = (Finding("x", s, "") for s in (OK, WARN, FAIL))
    assert [doctor.exit_code(f) for f in ([], [ok], [ok, warn], [warn, fail, ok])] == [0, 0, 1, 2]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["doctor", *args])
    return result.exit_code, result.output


def test_command_exit_codes_and_json(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    healthy_deployment()
    broker = FakeBroker(consumers=HEALTHY_BROKER)
    monkeypatch.setattr(doctor, "CeleryBroker", lambda url: broker)
    code, output = invoke("--json", "--timeout", "0.5")
    data = json.loads(output)
    assert (code, data["status"]) == (0, "ok")
    assert broker.asked == [0.5]
    assert {f["status"] for f in data["findings"]} == {"ok"}

    with session_scope() as session:
        heartbeats.beat(session, RECONCILE_TASK, "w", at=utcnow() - timedelta(seconds=200))
    code, output = invoke("--json")
    assert (code, json.loads(output)["status"]) == (1, "warn")

    broker.consumers = {}
    code, output = invoke()
    assert code == 2
    assert "✗ queue pushworker " in output
    assert "fix: start a worker consuming it: `celery -A tasks.app worker -Q pushworker`" in output
    assert "! beat reconcile" in output


def test_command_never_prints_a_secret(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    healthy_deployment()
    with session_scope() as session:
        ciphertext = session.get(Registry, 5).credential_secret  # type: ignore[union-attr]
    key = get_settings().secret_key
    rotate_key(monkeypatch)
    monkeypatch.setattr(doctor, "CeleryBroker", lambda url: FakeBroker(consumers=HEALTHY_BROKER))
    for args in ((), ("--json",)):
        code, output = invoke(*args)
        assert code == 2
        assert "registry 5 (harbor): the stored secret does not decrypt" in output
        for secret in (PASSWORD, ciphertext, key, get_settings().secret_key):
            assert secret and secret not in output


def test_bad_timeout_is_a_usage_error() -> None:
    code, output = invoke("--timeout", "nan")
    assert code == 2 and "--timeout" in output


# --- flow control --------------------------------------------------------------------------------


def test_flow_control_off_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_FLOW_CONTROL", "0")
    get_settings.cache_clear()
    found = doctor.check_flow_control(get_settings(), 0.5)
    assert (found.status, found.detail) == (
        OK, "off (PUSHWORKER_FLOW_CONTROL=0): registry limits are not enforced"
    )  # fmt: skip


def test_flow_control_redis_away_fails_and_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis of its own (RabbitMQ as broker), with a password, that nothing answers on."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PUSHWORKER_BROKER_URL", "amqp://u:brokerpw@127.0.0.1:1/v")
    monkeypatch.setenv("PUSHWORKER_FLOW_REDIS_URL", f"redis://:flowpw@127.0.0.1:{port}/3")
    get_settings.cache_clear()
    found = doctor.check_flow_control(get_settings(), 0.5)
    assert found.status == FAIL
    assert f"127.0.0.1:{port}/3: no answer within 0.5 s (ConnectionError)" in found.detail
    assert "flowpw" not in found.detail and found.fix and "PUSHWORKER_FLOW_REDIS_URL" in found.fix


def test_flow_control_on_the_brokers_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHWORKER_BROKER_URL", "redis://127.0.0.1:6379/4")
    monkeypatch.delenv("PUSHWORKER_FLOW_REDIS_URL", raising=False)
    get_settings.cache_clear()
    pinged: list[str] = []
    found = doctor.check_flow_control(get_settings(), 0.5, lambda url, t: pinged.append(url))
    assert pinged == ["redis://127.0.0.1:6379/4"]
    assert (found.status, found.detail) == (OK, "the broker's Redis: reachable (registry limits)")
