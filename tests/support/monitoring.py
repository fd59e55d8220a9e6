"""The monitoring files of ``deploy/``: their PromQL expressions and the metric names they read.

Shared by the unit test (promtool, the files' shape, the runbook anchors) and the end-to-end test
(every name read is exported by a real worker).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pushworker.json"
OPERATIONS = ROOT / "docs" / "operations.md"
#: Series Prometheus makes itself for each scrape target, not exported by the worker.
PROMETHEUS_OWN = frozenset({"up"})
#: Grafana's macros, replaced by what they stand for when an expression is checked.
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
     "unless", "offset", "inf", "nan"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: Numbers and durations (``0.95``, ``1e3``, ``5m``): a duration's unit is not a name.
_NUMBER = re.compile(r"(?<![\w:])\d[\w.]*")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promtool() -> str:
    """The promtool binary, or a failure naming how to install it (nothing is skipped)."""
    found = shutil.which("promtool") or next(
        (str(p) for p in (Path("/usr/bin/promtool"),) if p.exists()), None
    )
    if found is None:
        raise AssertionError(
            "promtool is missing: scripts/bootstrap installs it as root on Debian "
            "(apt-get install prometheus)"
        )
    return found


def expand_macros(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions or
    aggregations (followed by a parenthesis), keywords, label names (in matchers or grouping
    clauses) or inside strings."""
    text = _STRING.sub('""', expand_macros(expr))
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    text = _NUMBER.sub("", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel.get("type") != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """``(panel title, expression)`` of every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def names_read() -> dict[str, set[str]]:
    """``{metric name: where it is read}`` over the alert rules and the dashboard."""
    where: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(str(rule["expr"])):
            where.setdefault(name, set()).add(f"alert {rule['alert']}")
    for title, expr in dashboard_expressions():
        for name in metric_names(expr):
            where.setdefault(name, set()).add(f"panel {title!r}")
    return where
