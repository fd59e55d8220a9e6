"""``pushctl webhooks``: subscribe a URL to events, list and remove subscriptions, show each
delivery and its attempts, deliver one again.

The signing secret is printed once, by ``add``, and never again (docs/webhooks.md).
"""

from __future__ import annotations

from typing import Any

import click

from worker.cli.common import _JSON, ID, LIMIT, _echo_json, _key_values, _out, _table, cli
from worker.store import events
from worker.store.db import read_scope, session_scope
from worker.webhooks import (
    DeliveryStatus,
    add_subscription,
    delivery_fields,
    list_deliveries,
    list_subscriptions,
    redeliver,
    remove_subscription,
    subscription_fields,
)


@cli.group()
def webhooks() -> None:
    """Webhooks: signed deliveries of events to the platform.

    \b
    Example:
      pushctl webhooks add https://platform.example.com/hooks/push \\
          --events job.succeeded,job.failed --registry 5
    """


def _types(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


@webhooks.command("add")
@click.argument("url")
@click.option(
    "--events",
    "event_types",
    required=True,
    metavar="TYPES",
    help="Comma-separated event types, e.g. job.succeeded,job.failed.",
)
@click.option("--registry", "registry_id", type=ID, help="Only events of this registry.")
@click.option("--only-failures", is_flag=True, help="Only events whose outcome is failed.")
@click.option(
    "--allow-private",
    is_flag=True,
    help="Allow a URL resolving to a loopback, private or link-local address.",
)
@_JSON
def webhooks_add(
    url: str, event_types: str, registry_id: int | None, only_failures: bool,
    allow_private: bool, as_json: bool,
) -> None:  # fmt: skip
    """Subscribe URL to events; prints the signing secret once.

    \b
    Example:
      pushctl webhooks add https://platform.example.com/hooks/push --events job.failed
    """
    with session_scope() as session:
        subscription, secret = add_subscription(
            session, url, _types(event_types), registry_id=registry_id,
            only_failures=only_failures, allow_private=allow_private,
            actor=events.operator_actor(),
        )  # fmt: skip
        shown = subscription_fields(subscription)
    if as_json:
        _echo_json({**shown, "secret": secret})
        return
    console = _out()
    console.print(_key_values(shown))
    click.echo(f"secret: {secret}")
    click.echo(
        "Keep the secret now: it is shown this once. The receiver verifies every delivery with "
        "it (docs/webhooks.md).",
        err=True,
    )


@webhooks.command("list")
@click.option("--all", "include_removed", is_flag=True, help="Include removed subscriptions.")
@_JSON
def webhooks_list(include_removed: bool, as_json: bool) -> None:
    """List subscriptions (never their secrets).

    \b
    Example:
      pushctl webhooks list
    """
    with read_scope() as session:
        rows = [
            subscription_fields(s)
            for s in list_subscriptions(session, include_removed=include_removed)
        ]
    if as_json:
        _echo_json(rows)
        return
    columns = ["id", "url", "events", "registry", "only failures", "private ok", "cursor"]
    _out().print(_table(columns, (_subscription_row(r) for r in rows)))


def _subscription_row(row: dict[str, Any]) -> list[object]:
    return [
        row["id"], row["url"], ",".join(row["event_types"]), row["registry_id"],
        "yes" if row["only_failures"] else "no", "yes" if row["allow_private"] else "no",
        row["cursor"],
    ]  # fmt: skip


@webhooks.command("remove")
@click.argument("subscription_id", metavar="ID", type=ID)
def webhooks_remove(subscription_id: int) -> None:
    """Stop a subscription: nothing more is delivered to it; its deliveries stay readable.

    \b
    Example:
      pushctl webhooks remove 2
    """
    with session_scope() as session:
        remove_subscription(session, subscription_id, actor=events.operator_actor())
    click.echo(f"webhook {subscription_id} removed")


@webhooks.command("deliveries")
@click.option("--status", type=click.Choice([s.value for s in DeliveryStatus]))
@click.option("--webhook", "subscription_id", type=ID, help="Only this subscription's.")
@click.option("--limit", type=LIMIT, default=100, show_default=True)
@click.option("--attempts", "with_attempts", is_flag=True, help="Show every attempt.")
@_JSON
def webhooks_deliveries(
    status: str | None, subscription_id: int | None, limit: int, with_attempts: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Deliveries, newest first, with their last answer (--attempts: every attempt).

    \b
    Example:
      pushctl webhooks deliveries --status dead
    """
    with read_scope() as session:
        rows = [
            delivery_fields(session, d)
            for d in list_deliveries(
                session, status=status, subscription_id=subscription_id, limit=limit
            )
        ]
    if as_json:
        _echo_json(rows)
        return
    columns = ["id", "webhook", "event", "type", "job", "status", "attempts", "last code",
               "last ms", "last error", "next attempt"]  # fmt: skip
    _out().print(_table(columns, (_delivery_row(r) for r in rows)))
    if with_attempts:
        tries = [(r["id"], t) for r in rows for t in r["tries"]]
        columns = ["delivery", "attempt", "started", "code", "ms", "error", "worker"]
        _out().print(_table(columns, (_attempt_row(d, t) for d, t in tries), title="attempts"))


def _delivery_row(row: dict[str, Any]) -> list[object]:
    return [
        row["id"], row["webhook_id"], row["event_id"], row["event_type"], row["job_id"],
        row["status"], row["attempts"], row["last_status_code"], row["last_latency_ms"],
        row["last_error"], row["next_attempt_at"],
    ]  # fmt: skip


def _attempt_row(delivery_id: int, attempt: dict[str, Any]) -> list[object]:
    return [
        delivery_id, attempt["attempt"], attempt["started_at"], attempt["status_code"],
        attempt["latency_ms"], attempt["error"] or _unfinished(attempt),
        attempt["worker"],
    ]  # fmt: skip


def _unfinished(attempt: dict[str, Any]) -> str | None:
    return "(no answer recorded)" if attempt["status_code"] is None else None


@webhooks.command("redeliver")
@click.argument("delivery_id", metavar="ID", type=ID)
def webhooks_redeliver(delivery_id: int) -> None:
    """Deliver again (a dead or delivered delivery), with the same webhook-id.

    \b
    Example:
      pushctl webhooks redeliver 17
    """
    with session_scope() as session:
        delivery = redeliver(session, delivery_id, actor=events.operator_actor())
        message_id = delivery.message_id
    click.echo(f"delivery {delivery_id} is pending again (webhook-id {message_id})")
