"""API tokens: shown once, stored as an argon2 hash, looked up by id, refused when revoked or
expired, and every change is an event naming the token, never holding it."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from worker.core.errors import NotFound, ValidationError
from worker.store.db import session_scope
from worker.store.models import ApiToken, Event, utcnow
from worker.tokens import (
    PREFIX,
    create_token,
    list_tokens,
    revoke_token,
    verify_token,
)


def test_a_token_is_shown_once_and_only_its_hash_is_kept(sqlite_url: str) -> None:
    token, info = create_token("ci", "producer", actor="operator:alice", registry_ids=[5, 7])
    assert token.startswith(f"{PREFIX}{info.id}_")
    with session_scope() as session:
        row = session.scalars(select(ApiToken)).one()
        stored = row.token_hash
        logged = [(e.type, e.actor, e.payload) for e in session.scalars(select(Event))]
    assert stored.startswith("$argon2id$") and token not in stored
    assert logged == [
        ("token.created", "operator:alice",
         {"name": "ci", "role": "producer", "registry_ids": [5, 7]}),
    ]  # fmt: skip
    assert token not in json.dumps([info.to_dict() for info in list_tokens()])
    who = verify_token(token)
    assert who is not None
    assert (who.name, who.role, who.registry_ids, who.actor) == (
        "ci", "producer", (5, 7), "token:ci",
    )  # fmt: skip
    assert who.may_use_registry(5) and not who.may_use_registry(4)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # one character of the secret
        lambda t: t.replace(PREFIX, "pwx_"),  # the prefix
        lambda t: PREFIX + "99_" + t.split("_", 2)[2],  # another id
        lambda t: "",
        lambda t: t + "\x00",
        lambda t: "x" * 10_000,
    ],
)
def test_a_wrong_token_is_refused(sqlite_url: str, mangle: object) -> None:
    token, _ = create_token("ci", "admin", actor="operator:alice")
    assert callable(mangle)
    assert verify_token(mangle(token)) is None
    assert verify_token(token) is not None
    # Once the right token was verified (and remembered by its SHA-256), a wrong one still fails.
    assert verify_token(mangle(token)) is None
    assert verify_token(token) is not None


def test_revoked_and_expired_tokens_are_refused(sqlite_url: str) -> None:
    token, _ = create_token("old", "operator", actor="operator:alice")
    later, _ = create_token(
        "later", "auditor", actor="operator:alice", expires_at=utcnow() + timedelta(days=1)
    )
    assert verify_token(token) is not None and verify_token(later) is not None
    info = revoke_token("old", actor="operator:bob", reason="left the team")
    assert info.state == "revoked" and verify_token(token) is None
    with session_scope() as session:
        session.execute(update(ApiToken).where(ApiToken.name == "later").values(
            expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip
        revoked = session.scalars(select(Event).where(Event.type == "token.revoked")).one()
    assert verify_token(later) is None
    assert {i.name: i.state for i in list_tokens()} == {"old": "revoked", "later": "expired"}
    assert (revoked.actor, revoked.payload) == (
        "operator:bob", {"name": "old", "role": "operator", "reason": "left the team"},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "role", "registries", "expected"),
    [
        ("bad name", "admin", None, "token name"),
        ("esc\x1b[2J", "admin", None, "control character"),
        ("ok", "root", None, "role must be one of"),
        ("ok", "admin", [5], "only producer tokens"),
        ("ok", "producer", [], "names no registry"),
        ("ok", "producer", [0], "registry"),
    ],
)
def test_bad_tokens_are_refused(
    sqlite_url: str, name: str, role: str, registries: list[int] | None, expected: str
) -> None:
    with pytest.raises(ValidationError, match=expected):
        create_token(name, role, actor="operator:alice", registry_ids=registries)


def test_names_are_unique_and_revoking_an_unknown_one_says_so(sqlite_url: str) -> None:
    create_token("ci", "producer", actor="operator:alice")
    with pytest.raises(ValidationError, match="exists already"):
        create_token("ci", "admin", actor="operator:alice")
    with pytest.raises(NotFound, match="no token named"):
        revoke_token("nope", actor="operator:alice")


def test_pushctl_tokens_prints_the_token_once(sqlite_url: str) -> None:
    from click.testing import CliRunner

    from worker.cli import cli

    runner = CliRunner()
    made = runner.invoke(
        cli,
        ["tokens", "create", "ci", "--role", "producer", "--registry", "5,7", "--expires", "90d"],
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.splitlines()[0]
    assert token.startswith(PREFIX) and verify_token(token) is not None
    listed = runner.invoke(cli, ["tokens", "list", "--json"])
    assert listed.exit_code == 0 and token not in listed.output
    shown = json.loads(listed.stdout)
    assert [(t["name"], t["role"], t["registry_ids"], t["state"]) for t in shown] == [
        ("ci", "producer", [5, 7], "active")
    ]
    assert token not in runner.invoke(cli, ["tokens", "list"]).output
    assert runner.invoke(cli, ["tokens", "revoke", "ci", "--reason", "rotated"]).exit_code == 0
    assert verify_token(token) is None
    assert runner.invoke(cli, ["tokens", "revoke", "nope"]).exit_code == 3
    for bad in (["--expires", "2027-01-01"], ["--expires", "0"], ["--role", "root"]):
        options = {"--role": "admin", **dict(zip(bad[::2], bad[1::2], strict=True))}
        args = ["tokens", "create", "x", *[i for pair in options.items() for i in pair]]
        assert runner.invoke(cli, args).exit_code == 2, bad
