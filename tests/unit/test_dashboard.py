"""configs/grafana-dashboard.json: valid Grafana dashboard JSON whose every query
names only metrics that `l4lb start` exports (derived from the collector itself,
so the dashboard cannot drift from metrics.py)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_metrics_render import family_names  # a sibling: pytest puts tests/unit on the path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DASHBOARD = CONFIGS / "grafana-dashboard.json"
METRIC = re.compile(r"\bl4lb_[a-zA-Z0-9_]+")
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
                "$instance": ".*", "$vip": ".*"}


@pytest.fixture(scope="module")
def dash():
    return json.loads(DASHBOARD.read_text())


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows hold their panels


def queries(dash):
    """(where, PromQL) for every panel target and every query variable."""
    for p in all_panels(dash):
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable {v['name']}", q


def test_dashboard_schema(dash):
    for key in ("title", "uid", "panels", "schemaVersion", "templating", "time"):
        assert key in dash, key
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dash["uid"])
    ids = []
    for p in all_panels(dash):
        for key in ("id", "type", "title", "gridPos"):
            assert key in p, (key, p.get("title"))
        g = p["gridPos"]
        assert set(g) >= {"h", "w", "x", "y"} and g["x"] + g["w"] <= 24, p["title"]
        ids.append(p["id"])
        if p["type"] != "row":
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["refId"] and t["expr"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_panels_do_not_overlap(dash):
    taken = {}
    for p in all_panels(dash):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = p["title"]


def test_datasource_is_a_template_variable(dash):
    ds = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus" and ds[0]["name"] == "datasource"
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


def test_every_query_names_only_exported_metrics(dash):
    exported = family_names()
    seen = set()
    for where, expr in queries(dash):
        names = set(METRIC.findall(expr))
        assert names, f"{where}: no l4lb metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported (expr {expr!r})"
        seen |= names
    # the panels: per-VIP and per-real rates, health, VRRP state, sync lag
    for want in ("l4lb_vip_packets_total", "l4lb_vip_bytes_total", "l4lb_real_packets_total",
                 "l4lb_real_bytes_total", "l4lb_real_up", "l4lb_vrrp_state",
                 "l4lb_sync_lag_seconds"):
        assert want in seen, want


def test_counters_are_only_used_through_rate_or_increase(dash):
    counters = {n for n in family_names() if n.endswith("_total")}
    for where, expr in queries(dash):
        if expr.startswith("label_values("):
            continue
        for m in METRIC.finditer(expr):
            if m.group(0) in counters:
                before = expr[:m.start()]
                assert re.search(r"(rate|increase)\($", before), f"{where}: raw counter in {expr}"


def test_queries_parse_as_promql(dash, tmp_path):
    rules = []
    for i, (_where, expr) in enumerate(queries(dash)):
        if expr.startswith("label_values("):  # Grafana's, not PromQL: check its selector
            expr = re.fullmatch(r"label_values\((.*), *\w+\)", expr).group(1)
        for var, val in GRAFANA_VARS.items():
            expr = expr.replace(var, val)
        rules.append({"record": f"l4lb:dashboard_query_{i}", "expr": expr})
    f = tmp_path / "rules.yml"
    f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrape_example_is_valid():
    r = subprocess.run(["promtool", "check", "config", str(CONFIGS / "prometheus.yml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
