"""One short line of text about an event, for people: ``pushctl``'s timelines and ``push --wait``,
and the console's. Pure functions of the event's type and payload."""

from __future__ import annotations

from typing import Any


def human_bytes(count: object) -> str:
    if not isinstance(count, int | float):
        return "?"
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def summarize(event_type: str, payload: dict[str, Any]) -> str:
    """One short line about an event's payload, for timelines and ``push --wait``."""
    if event_type == "step.progress":
        done, total = (
            human_bytes(payload.get("bytes_pushed")),
            human_bytes(payload.get("bytes_total")),
        )
        return (
            f"{done} / {total}, layers {payload.get('layers_done')}/{payload.get('layers_total')}"
        )
    if event_type == "fallback.applied":
        moved = f"registry {payload.get('from_registry_id')} -> {payload.get('to_registry_id')}"
        return f"{moved}: {payload.get('reason', '')}"
    if event_type == "registry.tested":
        return summarize_test(payload)
    parts: list[str] = []
    if payload.get("error_message"):
        parts.append(f"{payload.get('error_code', 'error')}: {payload['error_message']}")
    if payload.get("hint"):
        parts.append(f"hint: {payload['hint']}")
    if payload.get("will_retry"):
        parts.append(f"retry in {payload.get('retry_in')} s")
    for key in ("reason", "reference", "digest", "credential_source", "username"):
        if payload.get(key):
            parts.append(f"{key}: {payload[key]}")
    if payload.get("previous_status"):
        parts.append(f"was {payload['previous_status']}")
    return "; ".join(parts)


def summarize_test(payload: dict[str, Any]) -> str:
    if payload.get("ok"):
        return "all checks passed"
    checks = payload.get("checks") or []
    failed = next((c for c in checks if not c.get("ok") and not c.get("skipped")), None)
    return f"failed at {failed.get('name')}: {failed.get('detail')}" if failed else "failed"
