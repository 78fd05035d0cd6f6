"""Alert rules and dashboard: valid for promtool, and only name metrics the service exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from stream_trainer.operations.metrics import build_metrics
from stream_trainer.publishing.mlflow_export import MlflowMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm/stream-trainer/files/prometheus-rules.yaml"
RULE_TESTS = ROOT / "tests/rules/alerts-test.yaml"
DASHBOARD = ROOT / "helm/stream-trainer/files/grafana-dashboard.json"
RUNBOOK = ROOT / "docs/runbook.md"
VALUES = ROOT / "helm/stream-trainer/values.yaml"

# Series Prometheus itself creates for every scrape target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
EXPECTED_ALERTS = frozenset(
    {
        "StreamTrainerConsumerLagGrowing",
        "StreamTrainerNoRecordsLearnt",
        "StreamTrainerCheckpointStale",
        "StreamTrainerCheckpointFailures",
        "StreamTrainerDeadLetterRateHigh",
        "StreamTrainerPartitionHalted",
        "StreamTrainerSlotUnavailable",
        "StreamTrainerSlotFenced",
        "StreamTrainerDriftDetected",
        "StreamTrainerModelQualityLow",
        "StreamTrainerVersionsRejected",
        "StreamTrainerRegistryChampionUnavailable",
        "StreamTrainerMlflowExportBehind",
        "StreamTrainerNotReady",
    }
)
# Grafana variables, replaced by something PromQL parses.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "x",
    "$job": "x",
    "$instance": "x",
}
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "info": ("_info",),
}
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "le"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package `prometheus`)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(cmd: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=120, check=False)


def exported_names() -> set[str]:
    """Every series name a fresh ``build_metrics`` registry can expose."""
    registry = CollectorRegistry()
    build_metrics(registry)
    MlflowMetrics.build(registry)  # registered when registry.mlflow is on
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, labels, keywords or strings)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors / durations
    names = set(re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text))
    return {name for name in names if name.lower() not in _KEYWORDS}


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _walk_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _walk_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_exprs(item)


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard (panels, annotations), variables substituted."""
    return [substitute(expr) for expr in _walk_exprs(dashboard())]


def variable_queries() -> list[str]:
    """Metric selectors inside ``label_values(<selector>, label)`` template queries."""
    selectors = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert match, f"unexpected variable query {query!r}"
        selectors.append(substitute(match.group(1)))
    return selectors


# --- promtool -----------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS: 14 rules found" in result.stdout


def test_promtool_test_rules(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    # promtool has no offline "parse this query"; `check rules` parses every rule's PromQL.
    exprs = dashboard_exprs() + variable_queries()
    doc = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_promtool_check_rules_rejects_bad_promql(promtool: str, tmp_path: Path) -> None:
    # Guards the approach above: a broken expression must fail.
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "r:bad", "expr": "sum by (le (rate(x[5m]))"}
    ]}]}))  # fmt: skip
    assert run([promtool, "check", "rules", str(path)]).returncode != 0


def test_promtool_check_metrics_on_exposition(promtool: str) -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry, version="1.2.3")
    metrics.records_consumed.inc(10)
    metrics.records_learnt.inc(9)
    metrics.records_dead_lettered.labels(reason="malformed_json").inc()
    metrics.batch_size.observe(10)
    metrics.learn_duration.observe(0.0004)
    metrics.predict_duration.observe(0.0001)
    metrics.checkpoint_duration.observe(0.02)
    metrics.retrain_duration.observe(3.0)
    metrics.kafka_errors.labels(code="_TRANSPORT").inc()
    metrics.set_prequential({"accuracy": 0.9, "f1": 0.8}, "window")
    metrics.set_model(4, "river.linear_model.LogisticRegression", "per_record")
    metrics.state.state("running")
    metrics.consumer_lag.labels(topic="in", partition="0").set(3)
    result = run([promtool, "check", "metrics"], stdin=generate_latest(registry))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"", result.stdout.decode()


# --- names ---------------------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'sum without (reason) (rate(a_total{reason="x", job=~"$job"}[5m])) / on (instance) '
        "b > 0.5 and histogram_quantile(0.9, sum by (le) (rate(c_bucket[5m]))) unless "
        'd{s="paused"} == 1 or time() - e offset 5m'
    )
    assert metric_names(expr) == {"a_total", "b", "c_bucket", "d", "e"}


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_names() | PROMETHEUS_SERIES
    for rule in rules():
        unknown = metric_names(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']}: unknown metrics {sorted(unknown)}"


def test_dashboard_uses_exported_metrics() -> None:
    exported = exported_names() | PROMETHEUS_SERIES
    exprs = dashboard_exprs() + variable_queries()
    assert len(exprs) > 20
    for expr in exprs:
        unknown = metric_names(expr) - exported
        assert not unknown, f"{expr}: unknown metrics {sorted(unknown)}"


def test_exported_names_include_every_family() -> None:
    names = exported_names()
    assert "stream_trainer_records_learnt_total" in names
    assert "stream_trainer_learn_duration_seconds_bucket" in names
    assert "stream_trainer_consumer_lag_records" in names  # labelled, no sample yet
    assert "stream_trainer_model_info" in names
    assert "process_resident_memory_bytes" in names
    assert not any(name.endswith("_created") for name in names)


# --- structure -----------------------------------------------------------------------------


def test_every_alert_is_present_labelled_and_annotated() -> None:
    by_name = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert set(by_name) == EXPECTED_ALERTS
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", RUNBOOK.read_text("utf-8"), re.MULTILINE)
    return {github_anchor(heading) for heading in headings}


def test_github_anchor() -> None:
    assert github_anchor("StreamTrainerNotReady") == "streamtrainernotready"
    assert github_anchor("What to do: `control resume`") == "what-to-do-control-resume"


def test_every_alert_links_a_runbook_section() -> None:
    base = yaml.safe_load(VALUES.read_text("utf-8"))["metrics"]["prometheusRule"]["runbookBaseUrl"]
    assert base.endswith("/docs/runbook.md")
    anchors = runbook_anchors()
    for rule in rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == base, f"{rule['alert']}: {url} does not start with the chart's default"
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: anchor {anchor!r}"
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/runbook.md"
    for link in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text("utf-8")):
        assert link in anchors, f"docs/runbook.md links #{link}, which is no heading"


def test_runbook_halted_partition_says_resume_not_restart() -> None:
    (rule,) = (r for r in rules() if r.get("alert") == "StreamTrainerPartitionHalted")
    description = " ".join(rule["annotations"]["description"].split())
    assert "stream-trainer control resume" in description
    assert "global scope: a restart does not clear a halt" in description
    section = RUNBOOK.read_text("utf-8").split("## StreamTrainerPartitionHalted", 1)[1]
    section = " ".join(section.split("\n## ", 1)[0].split())
    assert "stream-trainer control resume" in section
    assert "In global scope a restart does not clear it" in section
    assert "restart the member that owns the partition" in section


def test_every_alert_has_firing_and_quiet_promtool_cases() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "stream-trainer"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # every query goes through the datasource variable
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = {panel["title"] for panel in board["panels"]}
    for wanted in (
        "Throughput",
        "Consumer lag by partition",
        "Learn latency",
        "Prequential quality (window)",
        "Drift events",
        "Checkpoint age",
        "Checkpoint duration",
        "Checkpoint size and failures",
        "Dead letters by reason",
        "Memory",
        "CPU",
    ):
        assert wanted in titles
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    annotations = [a.get("expr", "") for a in board["annotations"]["list"]]
    assert any(a.startswith("changes(stream_trainer_model_version{") for a in annotations)
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.99, sum by (le) (rate(stream_trainer_learn_duration" in exprs
