"""The alert rules and the dashboard of ``deploy/``: promtool checks the rules and runs their
unit tests (``alerts_test.yml``: each alert fires on its synthetic series and stays quiet on the
others), checks every dashboard query as PromQL, and the files carry what an operator needs.
That every metric they read is really exported is tests/e2e/test_monitoring.py's part."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.monitoring import (
    ALERTS,
    ALERTS_TEST,
    OPERATIONS,
    PROMETHEUS_OWN,
    alert_rules,
    dashboard,
    dashboard_expressions,
    dashboard_panels,
    expand_macros,
    metric_names,
    names_read,
    promtool,
)
from worker.metrics import BEAT_TASKS


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_stays_quiet() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts no test makes fire"
    # Prometheus' own `up` is the one alert without a quiet case of its own: its firing case
    # has a pushworker target that is up and another job's target that is down, both quiet.
    assert names - quiet - {"PushworkerMetricsDown"} == set(), "alerts no test keeps quiet"


def test_every_alert_says_how_bad_what_and_where_the_runbook_is() -> None:
    anchors = _anchors(OPERATIONS)
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Pushworker[A-Z][A-Za-z]+", name), name
        assert re.fullmatch(r"\d+m", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"{name}: no heading {name} in docs/operations.md"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no command for one expression: each query becomes a recording rule, which
    # `check rules` parses.
    expressions = dashboard_expressions()
    rules = {
        "groups": [{
            "name": "dashboard",
            "rules": [{"record": f"dashboard:query_{i}", "expr": expand_macros(expr)}
                      for i, (_title, expr) in enumerate(expressions)],
        }]
    }  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_dashboard_shape() -> None:
    data = dashboard()
    assert data["uid"] == "pushworker"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), (panel["title"], target["expr"])


def test_dashboard_shows_what_the_alerts_watch() -> None:
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    alerted = set().union(*(metric_names(str(rule["expr"])) for rule in alert_rules()))
    assert alerted - shown == set()


def test_every_name_read_is_the_projects_or_prometheus_own() -> None:
    for name, where in names_read().items():
        assert name.startswith("pushworker_") or name in PROMETHEUS_OWN, (name, where)


def test_beat_tasks_named_in_the_alert_tests_are_the_real_ones() -> None:
    tasks = set(re.findall(r'task="([^"]+)"', ALERTS_TEST.read_text()))
    assert tasks == set(BEAT_TASKS)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("sum by (error_code) (increase(pushworker_job_failures_total[15m])) >= 3",
         {"pushworker_job_failures_total"}),
        ('max by (registry) (pushworker_registry_status{status="unhealthy"}) == 1',
         {"pushworker_registry_status"}),
        ("time() - max by (task) (a_b) > 3 * max by (task) (c_d) + 120", {"a_b", "c_d"}),
        ("sum(x) by (le) unless on (registry) y offset 5m", {"x", "y"}),
        ('up{job=~"pushworker.*"} == 0', {"up"}),
        ("histogram_quantile(0.95, sum by (le, step) (rate(h_bucket[$__rate_interval])))",
         {"h_bucket"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ],
)  # fmt: skip
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _anchors(markdown: Path) -> set[str]:
    """GitHub's anchors of the headings: lower case, spaces to hyphens, punctuation dropped."""
    anchors = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors
