"""The alert rules and the dashboard: promtool checks and unit-tests the rules, and every
expression uses only metric and label names the daemon exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from replicatord.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
# Labels Prometheus adds to every scraped series (job, instance) and the target label the rules
# assume (region); `le` of histogram buckets.
TARGET_LABELS = {"job", "instance", "region"}


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed: scripts/bootstrap.sh installs Debian's prometheus package")
        pytest.skip("promtool is not installed (scripts/bootstrap.sh installs it)")
    return found


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules() -> None:
    result = subprocess.run([promtool(), "test", "rules", "replicatord_test.yaml"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT / "tests" / "alerts")
    assert result.returncode == 0, result.stdout + result.stderr


def exported() -> dict[str, set[str]]:
    """Every series name the daemon exports, with its label names."""
    metrics = Metrics()
    names: dict[str, set[str]] = {"up": set()}
    for value in vars(metrics).values():
        if not isinstance(value, Counter | Gauge | Histogram):
            continue
        labels = set(value._labelnames)  # noqa: SLF001 - the declared label names
        base = value._name  # noqa: SLF001
        if isinstance(value, Counter):
            names[f"{base}_total"] = labels
        elif isinstance(value, Histogram):
            for suffix in ("_bucket", "_sum", "_count"):
                names[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            names[base] = labels
    for family in metrics.registry.collect():  # the process and platform collectors
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def expressions() -> list[tuple[str, str]]:
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"rule {rule['alert']}", rule["expr"]))
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") == "query":
            out.append((f"variable {variable['name']}", variable["definition"]))
    return out


METRIC = re.compile(r"\b(replicatord_[a-z0-9_]+|process_[a-z_]+|python_info|up)\b")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[w for w, _ in expressions()])
def test_expressions_use_only_exported_names(where: str, expr: str) -> None:
    names = exported()
    used = set(METRIC.findall(expr))
    assert used, f"{where}: no replicatord metric in {expr!r}"
    unknown = used - set(names)
    assert not unknown, f"{where}: not exported: {sorted(unknown)}"
    allowed = set().union(*(names[m] for m in used)) | TARGET_LABELS
    labels = set(MATCHER.findall(expr))
    for group in GROUPING.findall(expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    labels |= set(re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expr))
    assert labels <= allowed, f"{where}: labels not on {sorted(used)}: {sorted(labels - allowed)}"
