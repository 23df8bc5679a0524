"""The test-scale rule file is generated from the shipped one (replicatord/local/prometheus.py):
only durations change, each by its factor; Grafana variables are substituted; the alert watch
tells the alerts a fault explains from those it does not."""

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

from replicatord.local.prometheus import (
    AlertWatch,
    Prometheus,
    PrometheusError,
    dashboard_targets,
    format_duration,
    grafana_expr,
    grafana_variables,
    parse_duration,
    prometheus_binary,
    running_prometheus,
    scale_expr,
    scale_rules,
    scrape_config,
    write_test_rules,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
WINDOW = re.compile(r"\[(\d+(?:ms|[ywdhms]))+\]")
OFFSET = re.compile(r"offset ((?:\d+(?:ms|[ywdhms]))+)")


def shipped() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return document


def rules_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("2d", 172800),
                                               ("1w", 604800), ("10s", 10), ("1m500ms", 60.5)])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m5", "5 m", "1.5m", "-5m"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(300, "5m"), (7200, "2h"), (2.5, "2500ms"), (0, "0s"), (90, "90s"),
                                               (86400, "1d"), (1209600, "2w"), (0.001, "1ms")])
def test_durations_format_in_the_largest_unit_that_divides_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_windows_subqueries_and_offsets_scale_and_strings_do_not() -> None:
    assert scale_expr('rate(x{a="b"}[5m])', 1 / 30) == 'rate(x{a="b"}[10s])'
    assert scale_expr("max_over_time(rate(x[5m])[1h:1m])", 1 / 60) == "max_over_time(rate(x[5s])[1m:1s])"
    assert scale_expr("max_over_time(x[1h:])", 1 / 60) == "max_over_time(x[1m:])"
    assert scale_expr("x offset 1h", 1 / 60) == "x offset 1m"
    assert scale_expr('x{le="[5m]", path=~".*offset 5m"}[10m]', 1 / 60) == 'x{le="[5m]", path=~".*offset 5m"}[10s]'
    assert scale_expr("increase(x[1m])", 1 / 60, floor_s=4) == "increase(x[4s])"
    assert scale_expr("x > 24 * 3600", 1 / 60) == "x > 24 * 3600"  # thresholds are not durations


def test_the_generated_rules_differ_from_the_shipped_ones_only_in_their_durations() -> None:
    source = shipped()
    before = json.dumps(source, sort_keys=True)
    scaled = scale_rules(source, for_scale=1 / 60, range_scale=1 / 30, min_for_s=1, min_range_s=4)
    assert json.dumps(source, sort_keys=True) == before, "the source document was changed"
    originals, generated = rules_of(source), rules_of(scaled)
    assert [r["alert"] for r in generated] == [r["alert"] for r in originals]
    windows = 0
    for original, rule in zip(originals, generated, strict=True):
        assert {k: v for k, v in rule.items() if k not in ("for", "expr")} == \
               {k: v for k, v in original.items() if k not in ("for", "expr")}
        if "for" in original:
            assert parse_duration(rule["for"]) == max(1, parse_duration(original["for"]) / 60), rule["alert"]
        else:
            assert "for" not in rule
        before_windows = [parse_duration(m.group(0)[1:-1]) for m in WINDOW.finditer(original["expr"])]
        after_windows = [parse_duration(m.group(0)[1:-1]) for m in WINDOW.finditer(rule["expr"])]
        assert after_windows == [max(4, w / 30) for w in before_windows], rule["alert"]
        windows += len(before_windows)
        before_offsets = [parse_duration(m.group(1)) for m in OFFSET.finditer(original["expr"])]
        after_offsets = [parse_duration(m.group(1)) for m in OFFSET.finditer(rule["expr"])]
        assert after_offsets == [o / 30 for o in before_offsets], rule["alert"]
        assert OFFSET.sub("offset O", WINDOW.sub("[W]", rule["expr"])) == \
               OFFSET.sub("offset O", WINDOW.sub("[W]", original["expr"])), rule["alert"]
    assert windows >= 5  # the shipped rules do look back: the test would catch a regex that finds nothing


def test_promtool_accepts_the_generated_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).exists():
        pytest.skip("promtool is not installed (scripts/bootstrap.sh installs it)")
    rules = write_test_rules(RULES, tmp_path / "rules.yaml", 1 / 60, 1 / 30, 1, 4)
    assert rules.read_text().startswith("# Generated from prometheus-alerts.yaml")
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_variables_in_every_form_are_substituted() -> None:
    values = {"pair": ".*", "region": "cn-north-1", "__rate_interval": "4s"}
    expr = 'rate(x{pair=~"$pair", region="${region}", r="[[region]]", f="${pair:regex}"}[$__rate_interval])'
    assert grafana_variables(expr) == {"pair", "region", "__rate_interval"}
    assert grafana_expr(expr, values) == 'rate(x{pair=~".*", region="cn-north-1", r="cn-north-1", f=".*"}[4s])'
    assert grafana_expr('label_replace(x, "a", "$1", "b", "(.*)")', {}) == 'label_replace(x, "a", "$1", "b", "(.*)")'
    with pytest.raises(KeyError, match=r"\$instance"):
        grafana_expr('x{instance=~"$instance"}', values)


def test_every_target_of_the_dashboard_is_found_rows_included() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    count = sum(len(p.get("targets", [])) for p in dashboard["panels"])
    assert len(dashboard_targets(dashboard)) == count > 20
    nested = {"panels": [{"type": "row", "title": "r", "panels": [{"title": "p", "targets": [
        {"refId": "A", "expr": "up"}]}]}]}
    assert dashboard_targets(nested) == [("p", "A", "up")]


def test_the_scrape_config_labels_each_region_and_evaluates_as_often_as_it_scrapes() -> None:
    config = scrape_config({"cn-north-1": ["127.0.0.1:1"], "ap-southeast-1": ["127.0.0.1:2"]}, [Path("/r.yaml")], 1)
    assert config["global"] == {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    job = config["scrape_configs"][0]
    assert job["job_name"] == "replicatord"  # the rules select job="replicatord"
    assert job["static_configs"][1] == {"targets": ["127.0.0.1:2"], "labels": {"region": "ap-southeast-1"}}


def alert(name: str, state: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, **labels}, "state": state}


def test_the_watch_records_episodes_and_what_no_fault_explains() -> None:
    watch = AlertWatch(Prometheus("http://127.0.0.1:9", Path("/dev/null")))
    watch.observe([alert("Startup", "pending")], 0.0)  # before arming: not judged
    watch.arm()
    now = watch.armed_at or 0.0
    allowance = watch.allow("PeerUnreachable", region="cn-north-1")
    watch.observe([alert("PeerUnreachable", "pending", region="cn-north-1", peer="x")], now + 1)
    watch.observe([alert("PeerUnreachable", "firing", region="cn-north-1", peer="x"),
                   alert("Down", "pending", region="cn-north-1")], now + 2)
    assert watch.first_firing_at("PeerUnreachable", now, peer="x") == now + 2
    assert watch.is_active("PeerUnreachable") and watch.resolved_at("PeerUnreachable") is None
    assert len(watch.violations) == 1 and watch.violations[0].startswith("Down")
    allowance.fixed()
    watch.observe([alert("PeerUnreachable", "firing", region="cn-north-1", peer="x")], now + 3)
    assert allowance.closed_at is None  # still active after the fix: allowed until it resolves
    watch.observe([], now + 4)
    assert watch.resolved_at("PeerUnreachable") == now + 4 and allowance.closed_at == now + 4
    watch.observe([alert("PeerUnreachable", "pending", region="cn-north-1", peer="x")], now + 5)
    assert len(watch.violations) == 2, "once resolved after its fix, the same alert again is unexplained"
    assert watch.first_firing_at("PeerUnreachable", now + 3) is None


def test_a_grace_keeps_an_allowance_open_for_what_a_fault_leaves_behind() -> None:
    watch = AlertWatch(Prometheus("http://127.0.0.1:9", Path("/dev/null")))
    watch.arm()
    now = watch.armed_at or 0.0
    late = watch.allow("Lag", grace_s=10, region="sg")
    late.fixed_at = now
    watch.observe([], now + 1)
    assert late.closed_at is None
    watch.observe([alert("Lag", "pending", region="sg")], now + 5)  # records the fault held, arriving late
    watch.observe([], now + 12)
    assert late.closed_at == now + 12 and not watch.violations


def test_a_prometheus_on_loopback_loads_the_generated_rules_and_stops(tmp_path: Path) -> None:
    try:
        binary = prometheus_binary()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    rules = write_test_rules(RULES, tmp_path / "rules.yaml", 1 / 60, 1 / 30, 1, 4)
    with running_prometheus(tmp_path / "prometheus", {"cn-north-1": []}, [rules], 1.0, binary) as prometheus:
        assert prometheus.url.startswith("http://127.0.0.1:")
        loaded = prometheus.rules()
        assert sorted({r["name"] for r in loaded}) == sorted({r["alert"] for r in rules_of(shipped())})
        assert len(loaded) == len(rules_of(shipped()))
        assert prometheus.query("vector(1)")[0]["value"][1] == "1"
        with pytest.raises(PrometheusError, match="bad_data"):
            prometheus.query("sum(")
    assert not prometheus.ready(), "prometheus still answers after the block"
