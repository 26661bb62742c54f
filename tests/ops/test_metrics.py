"""The metric catalogue: what the processes export, what the dashboards, alert rules and the
table in docs/operations.md name, and that they agree (no panel or alert on a metric nobody
exports, no exported metric missing from that table, no row for a metric that does not exist)."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.ops.test_compose import promql_metric_names, registered_metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "ops" / "grafana" / "dashboards").glob("*.json"))
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
# The metric modules of the long-running processes (the stream worker imports ops.metrics, the
# LLM worker also llm_workers.metrics and llm_workers.dare.metrics, the fusion worker
# fusion.metrics).
METRIC_MODULES = ("ops.metrics", "ops.lag", "llm_workers.metrics", "llm_workers.dare.metrics",
                  "fusion.metrics")
DECLARATION = re.compile(r'(?:Counter|Gauge|Histogram|Summary|MetricFamily|TopicCounts)\(\s*"(liber_\w+)"')


@pytest.fixture(scope="module")
def exported() -> set[str]:
    for name in METRIC_MODULES:
        importlib.import_module(name)
    return registered_metric_names()


def declared_in_source() -> dict[str, str]:
    """liber_* metric names declared anywhere in the code -> the file declaring them."""
    found = {}
    for package in ("liber", "ops", "streams", "llm_workers", "models", "state"):
        for path in (ROOT / package).rglob("*.py"):
            for name in DECLARATION.findall(path.read_text(encoding="utf-8")):
                found[name] = str(path.relative_to(ROOT))
    return found


def families(exported: set[str]) -> set[str]:
    """Metric family names as docs/operations.md documents them (counters with _total, histograms
    without their _bucket/_sum/_count series)."""
    out = set()
    for name in exported:
        if not name.startswith("liber_") or name.endswith("_created"):
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        out.add(base if base + "_bucket" in exported else name)
    return out


def test_every_declared_metric_is_exported(exported):
    declared = declared_in_source()
    assert {"liber_consumer_lag_records", "liber_llm_cost_total", "liber_dare_drafts_total",
            "liber_records_out_total"} <= set(declared)
    missing = {name: path for name, path in declared.items()
               if name not in exported and name + "_total" not in exported
               and name + "_bucket" not in exported}
    assert not missing, f"declared but in no process's metric modules: {missing}"


def test_names_follow_prometheus_conventions(exported):
    for name in families(exported):
        assert re.fullmatch(r"liber_[a-z0-9_]+", name), name
    from prometheus_client import REGISTRY
    checked = 0
    for family in REGISTRY.collect():
        if not family.name.startswith("liber_"):
            continue
        checked += 1
        assert family.documentation.strip(), f"{family.name}: no help text"
        # `_total` only on counters (the client appends it), never on gauges or histograms
        assert not family.name.endswith("_total"), family.name
        if family.type != "counter":
            assert "_total" not in family.name, f"{family.name} is a {family.type}"
        for sample in family.samples:
            assert not {"user", "user_id", "key"} & set(sample.labels), \
                f"{family.name}: no user ids in labels"
    assert checked >= 50
    # label names as declared (labelled metrics have no samples until used)
    declared = {name: getattr(c, "_labelnames", ()) for c, names in
                REGISTRY._collector_to_names.items() for name in names if name.startswith("liber_")}
    assert declared["liber_dead_lettered_total"] == ("topic", "reason")
    for name, labels in declared.items():
        assert not {"user", "user_id", "key"} & set(labels), f"{name}: no user ids in labels"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_query_exported_metrics(path, exported):
    dashboard = json.loads(path.read_text())
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = names - exported
            assert not unknown, f"{path.name} / {panel['title']}: {sorted(unknown)} not exported"


def test_pipeline_dashboard_covers_the_operators_questions():
    dashboard = json.loads((ROOT / "ops/grafana/dashboards/liber-pipeline.json").read_text())
    used = {n for p in dashboard["panels"] for t in p["targets"] for n in promql_metric_names(t["expr"])}
    assert {"liber_consumer_lag_records", "liber_consumer_lag_seconds", "liber_events_in_total",
            "liber_records_out_total", "liber_llm_cost_total", "liber_dare_accepted_tokens_total",
            "liber_freshness_seconds_bucket", "liber_fusion_vectors_published_total"} <= used


def test_alert_rules_use_exported_metrics(exported):
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    alerts = {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}
    assert {"LiberConsumerLagGrowing", "LiberDeadLetterRate", "LiberLLMErrorRate",
            "LiberLLMBudgetExhausted", "LiberNoVectorsProduced"} <= set(alerts)
    for g in groups:
        for rule in g["rules"]:
            unknown = promql_metric_names(rule["expr"]) - exported - recorded - {"up"}
            assert not unknown, f"{rule.get('alert') or rule['record']}: {sorted(unknown)}"


def test_operations_doc_documents_exactly_the_exported_metrics(exported):
    table = (ROOT / "docs" / "operations.md").read_text()
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `liber_")]
    documented = {name for cell in rows for name in re.findall(r"`(liber_\w+)`", cell)}
    have = families(exported)
    assert not have - documented, f"exported but not in docs/operations.md's metric table: {sorted(have - documented)}"
    assert not documented - have, f"in docs/operations.md but not exported: {sorted(documented - have)}"
