"""The ops files in deploy/: the Prometheus rules pass promtool's checks and their own tests (alerts.test.yml), the
dashboard's queries parse, and the dashboard and the rules ask only for metrics recharged exposes, so that renaming
a metric breaks this test instead of a graph or an alert in production.

promtool comes from `make test` (.venv/bin/promtool) or PATH; without it its tests are skipped, unless
RECHARGED_TEST_REQUIRE_PROMTOOL is set (CI), when they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from recharged.daemon.http import create_app
from recharged.daemon.metrics import Metrics
from recharged.status import Backlog

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "recharged.json"

PROMETHEUS_OWN = {"up"}  # what Prometheus itself records for each target it scrapes
SAMPLE_SUFFIXES = {  # the samples prometheus_client exposes for each type of family
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}
GRAFANA_VARIABLES = {"$instance": ".+", "$__rate_interval": "5m"}  # a value of each, for promtool to parse
PROMQL_KEYWORDS = set("and or unless by without on ignoring group_left group_right offset bool".split())


def exposed_sample_names() -> set[str]:
    """Every sample name the daemon's /metrics can show, from the registry a daemon builds."""
    metrics = Metrics()
    metrics.watch(lambda: Backlog(attention={}, outbox={}, oldest_pending_seconds=0))
    metrics.watch_webhooks(dict)
    metrics.watch_reservations(dict)
    return {family.name + suffix for family in metrics.registry.collect() for suffix in SAMPLE_SUFFIXES[family.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: not its functions, keywords, labels, strings or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers and ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana's variables
    names = set()
    for found in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", expr):
        if found.group() not in PROMQL_KEYWORDS and not expr[found.end() :].lstrip().startswith("("):
            names.add(found.group())
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


@pytest.fixture(scope="module")
def promtool() -> str:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("promtool", path=search)
    if found is None:
        if os.environ.get("RECHARGED_TEST_REQUIRE_PROMTOOL"):
            pytest.fail("RECHARGED_TEST_REQUIRE_PROMTOOL is set but promtool is neither in .venv/bin nor on PATH")
        pytest.skip("no promtool: `make .venv/bin/promtool` installs it, or put one on PATH")
    return found


def run_promtool(promtool: str, *args: str) -> None:
    done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the Prometheus rules --------------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules(promtool: str):
    run_promtool(promtool, "check", "rules", str(RULES))


def test_every_alert_fires_in_the_promtool_tests_and_they_pass(promtool: str):
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    seen_firing = {check["alertname"] for test in tests for check in test["alert_rule_test"] if check["exp_alerts"]}
    assert {rule["alert"] for rule in alert_rules()} <= seen_firing
    run_promtool(promtool, "test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_severity_a_wait_and_says_what_to_do():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert "for" in rule, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert "`recharged " in rule["annotations"]["description"], rule["alert"]


# --- the Grafana dashboard -------------------------------------------------------------------------------------


def test_dashboard_asks_for_its_prometheus_and_instance():
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["instance"]["type"] == "query"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
    for title, expr in dashboard_queries():
        assert 'instance=~"$instance"' in expr, title


def test_dashboard_queries_are_promql_that_promtool_parses(promtool: str, tmp_path: Path):
    # promtool checks expressions as rules: each query becomes a recording rule, Grafana's variables given values.
    rules = []
    for number, (_title, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


# --- both ask only for what recharged exposes ------------------------------------------------------------------


def test_metric_names_are_read_from_promql_without_functions_labels_or_keywords():
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route=~"/v1/.*", x="y z"}[$__rate_interval])))'
        " / on(instance) group_left b_total offset 1h > 1e3 and time() - c unless d{e='f'}"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def test_dashboard_and_alerts_use_only_metrics_recharged_exposes():
    exposed = exposed_sample_names() | PROMETHEUS_OWN
    queries = [(f"panel {title!r}", expr) for title, expr in dashboard_queries()]
    queries += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    queries += [
        (f"variable {variable['name']}", re.sub(r"label_values\((\w+),.*", r"\1", variable["definition"]))
        for variable in dashboard()["templating"]["list"]
        if variable["type"] == "query"
    ]
    unknown = []
    for where, expr in queries:
        used = metric_names(expr)
        assert used, f"{where} asks for no metric: {expr}"
        unknown += [f"{where}: {name}" for name in sorted(used - exposed)]
    assert not unknown, "not exposed by recharged/daemon/metrics.py:\n" + "\n".join(unknown)


# --- the API latency the dashboard graphs ----------------------------------------------------------------------


class RefusingBackend:
    """Just enough of a daemon for requests the API answers before it reads anything: no token, no such path."""

    db = None
    health = None

    def __init__(self) -> None:
        self.metrics = Metrics()

    def runtime(self) -> SimpleNamespace:
        return SimpleNamespace(api_tokens=("a token",))

    def alive(self) -> tuple[bool, str]:
        return True, "running"


def test_http_requests_are_timed_by_method_route_template_and_status():
    backend = RefusingBackend()
    client = TestClient(create_app(backend))  # type: ignore[arg-type]
    assert client.get("/livez").status_code == 200
    assert client.post("/v1/authorizations", json={}).status_code == 401
    assert client.get("/v1/accounts/acme").status_code == 401
    assert client.get("/v1/accounts/globex").status_code == 401
    assert client.get("/no/such/thing").status_code == 404

    def requests(method: str, route: str, status: str) -> float | None:
        labels = {"method": method, "route": route, "status": status}
        return backend.metrics.registry.get_sample_value("recharged_http_request_duration_seconds_count", labels)

    assert requests("GET", "/livez", "200") == 1
    assert requests("POST", "/v1/authorizations", "401") == 1
    assert requests("GET", "/v1/accounts/{account_id}", "401") == 2  # one series for every account
    assert requests("GET", "other", "404") == 1
