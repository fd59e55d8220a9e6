"""Redaction is structural: with known passwords in play, run jobs that succeed, fail on a wrong
password and fall back, then look for those passwords everywhere they could have leaked.

Scanned: every column of every table of the database, the worker's log file, every key and value
of the Redis broker database (message bodies decoded), and what ``pushctl`` prints. A password is
looked for as written, URL-encoded, JSON-escaped and base64-encoded (at any alignment, so it is
also found inside an encoded auth header or a Celery message body).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, cast
from urllib.parse import quote

import redis
from sqlalchemy import MetaData, Table, create_engine, inspect, select

from tests.e2e.conftest import ALTERNATIVE_ID, E2E, HARBOR_ID, password_of, wait_for_job
from worker.producer import enqueue_push

PUSHCTL = str(Path(sys.executable).with_name("pushctl"))  # .venv/bin/pushctl


def _base64_cores(secret: bytes) -> list[str]:
    """The part of base64(prefix + secret + suffix) that depends on the secret only, for each of
    the three alignments the secret can have inside a longer encoded string."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode()
        start, end = -(-offset * 4 // 3), (offset + len(secret)) * 4 // 3
        core = encoded[start:end]
        cores += [core, core.replace("+", "-").replace("/", "_")]
    return cores


def variants(secret: str) -> set[str]:
    return {
        secret,
        quote(secret, safe=""),
        json.dumps(secret)[1:-1],
        *_base64_cores(secret.encode()),
    }


def leaks(where: str, texts: Iterable[str], secrets: dict[str, str]) -> list[str]:
    found = []
    for content in texts:
        for name, secret in secrets.items():
            for form in variants(secret):
                if form in content:
                    found.append(f"{name} in {where}: ...{_around(content, form)}...")
    return found


def _around(content: str, form: str) -> str:
    at = content.index(form)
    return content[max(0, at - 60) : at + len(form) + 20].replace("\n", " ")


# --- the places to scan ---------------------------------------------------------------------------


def database_rows(url: str) -> Iterator[str]:
    """Every row of every table, all columns, as text."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            for name in inspect(conn).get_table_names():
                table = Table(name, MetaData(), autoload_with=conn)
                for row in conn.execute(select(table)):
                    yield f"{name}: " + " | ".join(str(value) for value in row)
    finally:
        engine.dispose()


class BrokerReader(Protocol):
    """The reads made of the broker's database, as a synchronous client without
    ``decode_responses`` answers them (redis-py types every command as sync or async)."""

    def scan_iter(self, *, count: int) -> Iterator[bytes]: ...
    def type(self, name: bytes) -> bytes: ...
    def get(self, name: bytes) -> bytes | None: ...
    def lrange(self, name: bytes, start: int, end: int) -> list[bytes]: ...
    def hgetall(self, name: bytes) -> dict[bytes, bytes]: ...
    def smembers(self, name: bytes) -> set[bytes]: ...
    def zrange(
        self, name: bytes, start: int, end: int, *, withscores: bool
    ) -> list[tuple[bytes, float]]: ...


def broker_reader(url: str) -> BrokerReader:
    return cast(BrokerReader, redis.Redis.from_url(url, decode_responses=False))


def redis_values(url: str) -> Iterator[str]:
    """Every key and value of the broker's database, by type; message bodies decoded."""
    client = broker_reader(url)
    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode(errors="replace")
        kind = client.type(raw_key).decode()
        values: list[bytes] = [raw_key]
        if kind == "string":
            values.append(client.get(raw_key) or b"")
        elif kind == "list":
            values += client.lrange(raw_key, 0, -1)
        elif kind == "hash":
            for field, value in client.hgetall(raw_key).items():
                values += [field, value]
        elif kind == "set":
            values += list(client.smembers(raw_key))
        elif kind == "zset":
            values += [member for member, _ in client.zrange(raw_key, 0, -1, withscores=True)]
        for value in values:
            decoded = value.decode(errors="replace")
            yield f"{key} ({kind}): {decoded}"
            yield from _message_bodies(key, decoded)


def _message_bodies(key: str, value: str) -> Iterator[str]:
    """A kombu message keeps its body base64-encoded inside JSON: decode it too."""
    try:
        message = json.loads(value)
    except ValueError:
        return
    if isinstance(message, list) and message:  # the "unacked" hash holds [message, ...]
        message = message[0]
    if isinstance(message, dict) and isinstance(message.get("body"), str):
        try:
            body = base64.b64decode(message["body"]).decode(errors="replace")
        except ValueError:
            body = message["body"]
        yield f"{key} body: {body}"


def pushctl(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [PUSHCTL, *args], capture_output=True, text=True, timeout=180, env=env, check=False
    )
    return f"$ pushctl {' '.join(args)} (exit {result.returncode})\n{result.stdout}{result.stderr}"


# --- the test -------------------------------------------------------------------------------------


def test_no_password_appears_anywhere(e2e: E2E, image: str) -> None:
    harbor, gitlab = e2e.stack.tls, e2e.stack.plain
    wrong_harbor = f"wrong-harbor-{uuid.uuid4().hex}"
    wrong_gitlab = f"wrong-gitlab-{uuid.uuid4().hex}"
    secrets = {
        "the harbor password": harbor.password,
        "the gitlab password": gitlab.password,
        "the wrong harbor password": wrong_harbor,
        "the wrong gitlab password": wrong_gitlab,
    }
    env = {**os.environ, **e2e.env, "PUSHWORKER_OPERATOR": "e2e-secret-scan"}
    outputs: list[str] = []
    repository = f"scan/app-{uuid.uuid4().hex[:8]}"

    def push(fallback: list[int] | None = None, tag: str = "1") -> str:
        return enqueue_push(
            source_image=image, registry_id=HARBOR_ID, repository=repository, tag=tag,
            requested_by="secret-scan", fallback=fallback,
        )  # fmt: skip

    succeeded = wait_for_job(push(tag="ok"))
    assert succeeded.status == "succeeded", succeeded.error_message
    with password_of(HARBOR_ID, wrong_harbor):
        failed = wait_for_job(push(tag="fail"))
        fell_back = wait_for_job(push(fallback=[ALTERNATIVE_ID], tag="fallback"))
        outputs.append(pushctl(env, "registry", "test", str(HARBOR_ID), "--json"))
        outputs.append(pushctl(env, "registry", "test", str(HARBOR_ID)))
    assert (failed.status, failed.error_code) == ("failed", "authentication_failed")
    assert (fell_back.status, fell_back.effective_registry_id) == ("succeeded", ALTERNATIVE_ID)
    with password_of(ALTERNATIVE_ID, wrong_gitlab), password_of(HARBOR_ID, wrong_harbor):
        exhausted = wait_for_job(push(fallback=[ALTERNATIVE_ID], tag="exhausted"))
    assert exhausted.error_code == "fallback_exhausted"

    jobs = [succeeded.id, failed.id, fell_back.id, exhausted.id]
    outputs += [
        pushctl(env, "jobs", "list", "--json"),
        pushctl(env, "jobs", "list"),
        *(pushctl(env, "jobs", "show", job_id) for job_id in jobs),
        *(pushctl(env, "jobs", "show", job_id, "--json") for job_id in jobs),
        pushctl(env, "events", "--json", "--limit", "100000"),
        pushctl(env, "events", "--limit", "100000"),
        pushctl(env, "events", "export", "--format", "csv"),
        pushctl(env, "events", "export", "--format", "jsonl"),
        pushctl(env, "events", "verify", "--json"),
        pushctl(env, "registry", "list", "--json"),
        pushctl(env, "registry", "list"),
        *(pushctl(env, "registry", "show", str(i)) for i in (HARBOR_ID, ALTERNATIVE_ID)),
        *(pushctl(env, "registry", "show", str(i), "--json") for i in (HARBOR_ID, ALTERNATIVE_ID)),
    ]
    assert all("(exit 0)" in output for output in outputs[2:]), "\n".join(outputs)

    rows = list(database_rows(e2e.env["PUSHWORKER_DATABASE_URL"]))
    assert any(row.startswith("events:") and failed.id in row for row in rows)
    assert any(row.startswith("registries:") for row in rows)
    log = e2e.worker_log.read_text(errors="replace")
    assert failed.id in log  # the worker did log these jobs
    broker = list(redis_values(e2e.broker_url))
    assert broker, "the broker database is empty: nothing was scanned"

    found = [
        *leaks("the database", rows, secrets),
        *leaks("the worker log", [log], secrets),
        *leaks("Redis", broker, secrets),
        *leaks("pushctl output", outputs, secrets),
    ]
    assert found == [], "\n".join(found)


def test_the_scan_finds_a_password_in_any_of_its_forms() -> None:
    """The scan itself is tested: a password inside an auth header, a Celery body, a URL."""
    secret = "s3cr3t/pass+word=?"
    auth = base64.b64encode(f"pushuser:{secret}".encode()).decode()
    body = base64.b64encode(json.dumps([[1], {"password": secret}]).encode()).decode()
    carriers = [
        f"Authorization: Basic {auth}",
        json.dumps({"body": body, "properties": {"body_encoding": "base64"}}),
        f"https://user:{quote(secret, safe='')}@host/v2/",
        json.dumps({"detail": f'said "{secret}"'}),
    ]
    for carrier in carriers:
        texts = [carrier, *_message_bodies("k", carrier)]
        assert leaks("x", texts, {"p": secret}), carrier
    assert leaks("x", ["nothing to see"], {"p": secret}) == []
