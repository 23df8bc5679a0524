"""config/grafana-dashboard.json, checked for what Grafana and its readers rely on.

No maintained linter of Grafana dashboards installs from PyPI and runs offline (Grafana's
dashboard-linter and gcx are Go programs outside the registries this project uses; the
grafana-foundation-sdk's `Dashboard.from_json` accepts any JSON without a complaint; @grafana/schema
is TypeScript types for npm). So these are the checks: the layout (unique panel ids, grid positions
inside the 24 columns and not overlapping, rows), every query on the dashboard's data source with
unique refIds, every template variable defined, every panel titled and described (as gcx's
panel-title-description rule asks), units that fit the query (per second only for rates), and every
query parsing as PromQL (promtool, offline). tests/test_prometheus_e2e.py runs each query against
a Prometheus that scrapes two daemons.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicatord.local.prometheus import grafana_expr, grafana_variables

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD: dict[str, Any] = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
PANELS = [p for p in DASHBOARD["panels"]] + [c for p in DASHBOARD["panels"] for c in p.get("panels", [])]
QUERY_PANELS = [p for p in PANELS if p["type"] != "row"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables (https://grafana.com/docs/grafana/latest/dashboards/variables/add-template-variables/).
BUILTIN = {"__interval", "__interval_ms", "__rate_interval", "__range", "__range_s", "__range_ms"}
CORE_PANEL_TYPES = {"stat", "timeseries", "state-timeline", "status-history", "gauge", "bargauge", "table", "text",
                    "heatmap", "histogram", "piechart", "barchart", "logs"}
PER_SECOND_UNITS = {"ops", "rps", "reqps", "wps", "iops", "cps", "Bps", "bps", "pps"}
GRID_COLUMNS = 24


def test_the_dashboard_has_what_grafana_needs_to_import_it() -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in DASHBOARD, key
    assert isinstance(DASHBOARD["schemaVersion"], int) and DASHBOARD["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", DASHBOARD["uid"]), "uid: 1 to 40 letters, digits, - or _"
    assert "id" not in DASHBOARD or DASHBOARD["id"] is None, "an id is the instance's own: leave it out"


def test_panel_ids_are_unique_positive_integers() -> None:
    ids = [p.get("id") for p in PANELS]
    assert all(isinstance(i, int) and i > 0 for i in ids), ids
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"panel ids used twice: {duplicates}"


def test_grid_positions_fit_the_grid_and_do_not_overlap() -> None:
    boxes = []
    for panel in DASHBOARD["panels"]:  # nested panels of a collapsed row are laid out when it opens
        grid = panel["gridPos"]
        assert all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")), (panel["title"], grid)
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] >= 1 and grid["h"] >= 1, (panel["title"], grid)
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, f"{panel['title']} is wider than the grid: {grid}"
        boxes.append((panel["title"], grid))
    for (a, ga), (b, gb) in itertools.combinations(boxes, 2):
        apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                 or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
        assert apart, f"{a!r} {ga} overlaps {b!r} {gb}"


def test_rows_span_the_grid_and_hold_no_queries() -> None:
    rows = [p for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert rows
    for row in rows:
        assert row["gridPos"]["w"] == GRID_COLUMNS and row["gridPos"]["h"] == 1, row["title"]
        assert "targets" not in row, row["title"]
        assert row.get("collapsed") or not row.get("panels"), f"{row['title']}: an open row lists no panels"


def test_every_panel_is_a_core_type_with_a_title_and_a_description() -> None:
    for panel in QUERY_PANELS:
        assert panel["type"] in CORE_PANEL_TYPES, (panel["title"], panel["type"])
        assert panel.get("title", "").strip(), panel
        assert panel.get("description", "").strip(), f"{panel['title']}: no description (what it shows, what to do)"


def test_every_query_is_on_the_dashboards_prometheus_with_a_unique_ref_id() -> None:
    for panel in QUERY_PANELS:
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']}: no query"
        ref_ids = [t.get("refId") for t in targets]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), (panel["title"], ref_ids)
        for target in targets:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, (panel["title"], target["refId"])
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), (panel["title"], target["refId"])


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in DASHBOARD["templating"]["list"]}


def test_template_variables_are_defined_once_and_query_the_dashboards_prometheus() -> None:
    names = [v["name"] for v in DASHBOARD["templating"]["list"]]
    assert len(set(names)) == len(names), names
    defined = variables()
    assert defined["datasource"]["type"] == "datasource" and defined["datasource"]["query"] == "prometheus"
    for variable in defined.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
            assert variable["query"]["query"] == variable["definition"], variable["name"]
            assert re.fullmatch(r"label_values\(.+,\s*\w+\)", variable["definition"]), variable["name"]
            used = grafana_variables(variable["definition"])
            earlier = names[:names.index(variable["name"])]
            assert used <= set(earlier), f"{variable['name']} uses variables defined after it: {used}"


def test_every_variable_a_query_uses_is_defined() -> None:
    defined = set(variables()) | BUILTIN
    for panel in QUERY_PANELS:
        for target in panel["targets"]:
            unknown = grafana_variables(target["expr"]) - defined
            assert not unknown, f"{panel['title']} {target['refId']}: undefined {sorted(unknown)}"


def per_second(expr: str) -> bool:
    """The query's values are per second: a rate, not a quantile of one or an increase."""
    return bool(re.search(r"\b(?:i?rate)\(", expr)) and "histogram_quantile" not in expr and "increase(" not in expr


def test_units_fit_the_queries() -> None:
    for panel in QUERY_PANELS:
        if panel["type"] not in ("timeseries", "stat", "gauge", "bargauge"):
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{panel['title']}: no unit"
        rates = [per_second(t["expr"]) for t in panel["targets"]]
        if unit in PER_SECOND_UNITS:
            assert all(rates), f"{panel['title']}: unit {unit} (per second) on a query that is not a rate"
        else:
            assert not all(rates), f"{panel['title']}: rates shown as {unit}, not per second"


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """Each query with its variables given values, as recording rules promtool checks offline."""
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).exists():
        pytest.skip("promtool is not installed (scripts/bootstrap.sh installs it)")
    values = {**dict.fromkeys(variables(), ".*"), "__interval": "15s", "__interval_ms": "15000",
              "__rate_interval": "1m", "__range": "3h", "__range_s": "10800", "__range_ms": "10800000"}
    rules = [{"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": grafana_expr(target["expr"], values)}
             for panel in QUERY_PANELS for target in panel["targets"]]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
