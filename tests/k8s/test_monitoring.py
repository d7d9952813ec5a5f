"""Alert rules and the Grafana dashboard: valid PromQL (promtool), unit-tested alerts, and only
metric names that loraloop, vLLM or kube-state-metrics really expose (or that are declared pending)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.k8s import contract
from tests.k8s.manifests import K8S, OVERLAYS, render

MONITORING = K8S / "monitoring"
RULES = MONITORING / "alerts.rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"


def promtool(*args: str, cwd: Path | None = None) -> None:
    # A failure, not a skip, when promtool is missing: .ci/run installs it (Debian package prometheus), so
    # a missing promtool is a broken setup, and these are the only checks of the rules' and queries' PromQL.
    exe = shutil.which("promtool")
    assert exe is not None, "promtool is not installed: apt-get install prometheus (as .ci/run does)"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what they stand for."""
    return (
        expr.replace("$__rate_interval", "5m")
        .replace('"$namespace"', '"loraloop"')
        .replace('"$alias"', '".*"')
        .replace("${datasource}", "prometheus")
    )


# --- metric names ----------------------------------------------------------------------------------


def series_names(registry: Any) -> set[str]:
    """The series names a prometheus_client registry exposes (families with or without children)."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "summary": ["_sum", "_count", ""],
    }
    return {family.name + s for family in registry.collect() for s in suffixes[family.type]}


def loraloop_metrics() -> set[str]:
    from feedback.metrics import StoreMetrics
    from serving.metrics import GatewayMetrics
    from serving.registry_metrics import RegistryCollector

    registry_and_cycle = CollectorRegistry()
    registry_and_cycle.register(RegistryCollector(Path("/nonexistent/registry.duckdb"), Path("/nonexistent")))
    names = series_names(GatewayMetrics().registry) | series_names(StoreMetrics().registry)
    names |= series_names(registry_and_cycle)
    assert "loraloop_requests_total" in names and "loraloop_event_queue_depth" in names
    return names


def vllm_source_metrics() -> set[str]:
    """`vllm:*` names declared in the installed vLLM's metrics code (without importing vLLM)."""
    spec = importlib.util.find_spec("vllm")
    # vLLM is a dependency of loraloop (the cpu/gpu extras): not finding it is a broken install, not a skip
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    root = Path(next(iter(spec.submodule_search_locations)))
    sources = sorted((root / "v1" / "metrics").glob("*.py"))
    assert sources, f"no vLLM metrics code in {root / 'v1' / 'metrics'}: has vLLM moved it?"
    return set(re.findall(r'"(vllm:[a-z0-9_:]+)"', "".join(p.read_text(errors="replace") for p in sources)))


METRIC = re.compile(r"\b((?:loraloop|kube)_[a-z0-9_]+|vllm:[a-z0-9_:]+|up)\b(?!\s*\()")


def used_metrics(exprs: list[str]) -> set[str]:
    found: set[str] = set()
    for expr in exprs:
        # label values and strings are not metric names
        found |= set(METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))
    return found


def strip_suffix(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_only_real_or_pending_metrics(source: str) -> None:
    exprs = [r["expr"] for r in rules()] if source == "rules" else dashboard_exprs()
    used = used_metrics(exprs)
    assert used, "no metric found: the pattern is broken"
    known = loraloop_metrics() | contract.PENDING_METRICS | contract.OTHER_METRICS
    vllm_names = {n for n in used if n.startswith("vllm:")}
    unknown = {n for n in used - vllm_names if n not in known}
    assert not unknown, f"{source} uses metrics nobody exposes: {sorted(unknown)}"
    assert {strip_suffix(n) for n in vllm_names} <= contract.VLLM_METRICS


def test_vllm_metric_names_exist_in_vllm() -> None:
    declared = vllm_source_metrics()
    assert declared >= contract.VLLM_METRICS, sorted(contract.VLLM_METRICS - declared)


def test_dashboard_and_alerts_cover_the_issue() -> None:
    used = used_metrics(dashboard_exprs())
    for name in (
        "loraloop_requests_total",
        "loraloop_request_duration_seconds_bucket",
        "loraloop_feedback_total",
        "loraloop_event_queue_depth",
        "loraloop_champion_version",
        "loraloop_canary_status",
        "loraloop_promotions_total",
        "loraloop_rollbacks_total",
        "loraloop_cycle_last_success_timestamp_seconds",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total",
    ):
        assert name in used, f"the dashboard does not show {name}"
    alerts = {r["alert"] for r in rules()}
    for alert in (
        "LoraloopAliasErrorRateHigh",
        "LoraloopAliasLatencyP95High",
        "LoraloopBackendDown",
        "LoraloopNoHealthyBackend",
        "LoraloopCycleStalled",
    ):
        assert alert in alerts
    (stalled,) = [r for r in rules() if r["alert"] == "LoraloopCycleStalled"]
    assert "26 * 3600" in stalled["expr"]
    for r in rules():
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"] and r["annotations"]["description"]


# --- promtool -------------------------------------------------------------------------------------


def test_rules_pass_promtool() -> None:
    promtool("check", "rules", str(RULES))


def test_alerts_unit_tests() -> None:
    promtool("test", "rules", "alerts.test.yaml", cwd=MONITORING)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    recorded = [{"record": f"dashboard:query_{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    promtool("check", "rules", str(path))


def test_prometheus_rule_carries_the_rules_file() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "copy alerts.rules.yaml's groups into prometheusrule.yaml"
    )


# --- the dashboard --------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in panels(d):
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var.startswith("__") or var in variables, f"{p['title']}: ${var} is not defined"
    assert DASHBOARD.stat().st_size < 200_000, "stay well under the 256 KiB of kubectl apply's annotation"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap(overlay: str) -> None:
    objs = render(f"overlays/{overlay}")
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "loraloop-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["grafana-dashboard.json"]) == dashboard()
