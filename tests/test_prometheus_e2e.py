"""A real Prometheus (Debian's server, on loopback) scrapes two daemons with the shipped alert rules,
their `for:` and windows scaled down by code (replicatord/local/prometheus.py), while this test makes
faults, each the real cause of the alerts it waits for through Prometheus's HTTP API:

- a garbled record on Singapore's Kinesis stream, the first of the daemon's life: RecordsRefused
  and DeadLetters;
- Singapore's table stream re-enabled as KEYS_ONLY: StreamUnusable (and a pause, a key rotation,
  a stale write and a TTL delete, for the dashboard's series);
- the border slowed (1.5 s each way, inside the call deadline): ReplicationLagHigh into Singapore,
  and PeerUnreachable stays quiet, the peer answers;
- Singapore's endpoints black-holed, to both daemons: for Beijing PeerUnreachable, then
  PeerDiverted (records wait in the outbox); Singapore's daemon still serves /metrics but cannot
  reach its lease table: NoLeasesHeld for each of its pipelines;
- Singapore's daemon killed: ReplicatordDown and ReplicatordAbsent; restarted (a new instance, as
  systemd's restart is: host-pid), it takes the dead one's leases over.

Each fault is then removed and its alerts must resolve. An alert that no fault of the test explains
fails it, whenever it appears. Every query of config/grafana-dashboard.json is then run through the
API: it must parse and return series.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import pytest

from replicatord.config import load_topology
from replicatord.local.aws_state import TEST_BEHAVIOUR
from replicatord.local.prometheus import (
    AlertWatch,
    Prometheus,
    dashboard_targets,
    format_duration,
    grafana_expr,
    running_prometheus,
    write_test_rules,
)
from replicatord.local.wan import WanLink, running_link
from replicatord.local.world import (
    OPERATOR_KEY_PAIR,
    REGIONS,
    DaemonProcess,
    acting_as,
    metric_sum,
    peer_writer_key_pair,
    stream_of,
    topology_document,
    wait_for,
    write_topology,
)
from replicatord.ops.pause import set_paused
from replicatord.ops.provision import RegionProvisioner
from tests.conftest import LocalRegions, quick_tuning
from tests.test_aws_e2e import Writer
from tests.test_e2e import TABLES

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"

INTERVAL_S = 1.0  # scrape and rule evaluation
FOR_SCALE = 1 / 60  # for: 2m -> 2s, 5m -> 5s, 10m -> 10s
# Windows: [5m] -> 10s. The thresholds stay absolute (lag over 5 s), so a window must hold several
# of the batches it measures; no window shorter than 4 scrapes (rate() needs two samples).
RANGE_SCALE = 1 / 30
MIN_RANGE_S = 4 * INTERVAL_S
AWS_TIMEOUT_S = 6.0
BORDER_DELAY_MS = 1500.0  # each way: a PutRecords across it takes over 3 s, well inside AWS_TIMEOUT_S
TUNING = quick_tuning(aws_timeout_s=AWS_TIMEOUT_S, outbox_after_s=2, peer_credentials_refresh_s=1)
# Late records (what the outbox ships, what a stalled applier reads once back) are lag: it may fire
# after the fault is gone, for about a window and a `for:`.
LATE_GRACE_S = 300 * RANGE_SCALE + 300 * FOR_SCALE + 5  # the lag rule's [5m] and its for: 5m, scaled
# Dashboard queries with no series in this run, and why (the query must still parse, and must
# return nothing: a query that starts returning series is taken off this list).
NO_SERIES_HERE = {
    "replicatord_checkpoint_trimmed_total": "records lost to a stream's retention: nothing is lost here "
                                            "(ReplicatordDataTrimmed stays quiet); tests/test_aws_e2e.py trims",
}


@pytest.fixture
def behaviour() -> dict[str, Any]:
    """AWS's limits as in every end-to-end test, without the random faults: every alert here must
    be explained by a fault this test makes."""
    return {**TEST_BEHAVIOUR, "kinesis_put_throttle_rate": 0.0, "throttle_rate": 0.0, "error_rate": 0.0,
            "error_after_rate": 0.0}


def put(regions: LocalRegions, region: str, pk: str, ts: float, **extra: Any) -> None:
    regions.client("dynamodb", region).put_item(TableName=TABLES[region], Item={
        "PK": {"S": pk}, "last_update_timestamp": {"N": f"{ts:.3f}"}, "last_updater_region": {"S": region},
        **extra})


def start_daemon(regions: LocalRegions, tmp_path: Path, region: str, through: Mapping[str, WanLink]) -> DaemonProcess:
    """`region`'s daemon, reaching the regions in `through` by their WAN links."""
    endpoints = {**regions.endpoints, **{r: f"http://127.0.0.1:{link.port}" for r, link in through.items()}}
    config = write_topology(tmp_path / f"{region}.yaml", topology_document(endpoints, tuning=TUNING))
    daemon = DaemonProcess(config, region, tmp_path).start()
    regions.daemons.append(daemon)
    return daemon


class Faults:
    """Times each fault's alerts: fault to firing, fix to resolved."""

    def __init__(self, watch: AlertWatch) -> None:
        self.watch = watch
        self.figures: list[tuple[str, str, float]] = []  # (alert, what, seconds)

    def wait(self, condition: Callable[[], bool], deadline_s: float, what: str) -> None:
        """wait_for, and if it times out, what Prometheus had active and what nothing explained."""
        try:
            wait_for(condition, deadline_s, what, interval_s=0.1)
        except TimeoutError as exc:
            active = [f"{e.name} {e.labels} {'firing' if e.firing_at else 'pending'}" for e in self.watch.active()]
            raise AssertionError(f"{exc}\nactive: {active}\nunexplained: {self.watch.violations}") from None

    def fired(self, name: str, since: float, deadline_s: float, **labels: str) -> float:
        self.wait(lambda: self.watch.first_firing_at(name, since, **labels) is not None, deadline_s,
                  f"{name} {labels} to fire")
        seconds = (self.watch.first_firing_at(name, since, **labels) or 0.0) - since
        self.figures.append((name, "fired", seconds))
        print(f"{name} {labels} fired {seconds:.1f}s after its fault", flush=True)
        return seconds

    def resolved(self, name: str, since: float, deadline_s: float, **labels: str) -> float:
        self.wait(lambda: not self.watch.is_active(name, **labels), deadline_s, f"{name} {labels} to resolve")
        seconds = (self.watch.resolved_at(name, **labels) or time.monotonic()) - since
        self.figures.append((name, "resolved", seconds))
        print(f"{name} {labels} resolved {seconds:.1f}s after its fix", flush=True)
        return seconds


def test_prometheus_fires_the_alerts_of_real_faults_resolves_them_and_runs_every_dashboard_query(
        regions: LocalRegions, tmp_path: Path) -> None:
    config = regions.provision(tuning=TUNING)
    sg_port = int(regions.endpoints[SG].rsplit(":", 1)[1])
    with running_link("127.0.0.1", sg_port) as border, running_link("127.0.0.1", sg_port) as sg_home:
        cn = start_daemon(regions, tmp_path, CN, {SG: border})  # Beijing reaches Singapore across the border
        sg = start_daemon(regions, tmp_path, SG, {SG: sg_home})  # Singapore's daemon reaches its own region
        cn.wait_ready(60)
        sg.wait_ready(60)
        rules = write_test_rules(RULES, tmp_path / "rules.yaml", FOR_SCALE, RANGE_SCALE, 1.0, MIN_RANGE_S)
        targets = {CN: [f"127.0.0.1:{cn.port}"], SG: [f"127.0.0.1:{sg.port}"]}
        with running_prometheus(tmp_path / "prometheus", targets, [rules], INTERVAL_S) as prometheus, \
                AlertWatch(prometheus) as watch:
            began = time.monotonic()
            wait_for(lambda: all(t["health"] == "up" for t in prometheus.targets()) and len(prometheus.targets()) == 2,
                     30, "Prometheus to scrape both daemons")
            wait_for(lambda: not watch.active(), 30, "no alert before any fault")
            watch.arm()
            faults = Faults(watch)
            dashboard = DashboardQueries(prometheus, began)
            writer = Writer(regions, CN, "steady", per_s=5)  # Beijing's application, all along
            try:
                _refusals_key_rotation_and_data_events(regions, config, prometheus, watch, faults)
                _paused_direction_and_unusable_stream(regions, config, prometheus, watch, faults)
                _slow_border(border, watch, faults)
                _singapore_silent(border, sg_home, watch, faults)
                dashboard.run()
                _killed_and_restarted(regions, sg, watch, faults)
                checked = dashboard.check(30)
            finally:
                writer.stop()
            faults.wait(lambda: not watch.active(), 60, "every alert to resolve once the faults are gone")
            quiet = sorted({r["name"] for r in prometheus.rules()} - {e.name for e in watch.episodes})
            took_s = time.monotonic() - began
    assert not watch.violations, "alerts that no fault explains:\n" + "\n".join(watch.violations)
    lines = [f"  {name} {what} after {seconds:.1f}s" for name, what, seconds in faults.figures]
    print(f"\nPrometheus (scrape {INTERVAL_S:g}s, for x{FOR_SCALE:.4g}, windows x{RANGE_SCALE:.4g}), "
          f"{took_s:.0f}s from the first scrape:\n" + "\n".join(lines) +
          f"\n  never active: {', '.join(quiet)}\n  dashboard: {checked}")


def _refusals_key_rotation_and_data_events(regions: LocalRegions, config: Path, prometheus: Prometheus,
                                           watch: AlertWatch, faults: Faults) -> None:
    """Garbled records on Singapore's stream: refused and dead-lettered. A rotated peer key pair
    (the dashboard's key refreshes). A stale write and a TTL delete (repairs, stale applies, TTL
    deletes on the dashboard).

    The garbled record is the first of the daemon's life: its counters' series are born at 1 with
    it, which increase() alone does not see as a rise; the rules' second half (a series not there a
    window ago) does."""
    refusals = [watch.allow(name, region=SG, reason="bad_record")
                for name in ("ReplicatordRecordsRefused", "ReplicatordDeadLetters")]
    # Two errors in a 10 s window are 0.2 a second: the applier's refusals are errors.
    refusals.append(watch.allow("ReplicatordErrorRateHigh", grace_s=LATE_GRACE_S, region=SG, pipeline="applier"))
    # Refused by the peer until the daemon reads the new key pair (within peer_credentials_refresh_s);
    # what waited meanwhile arrives late.
    for name in ("ReplicatordPeerUnreachable", "ReplicatordPeerDiverted"):
        watch.allow(name, grace_s=10, region=CN, peer=SG).fixed()
    watch.allow("ReplicatordReplicationLagHigh", grace_s=LATE_GRACE_S, region=SG).fixed()
    now = time.time()
    kinesis = regions.client("kinesis", SG)
    sent = time.monotonic()
    kinesis.put_record(StreamName=stream_of(SG), Data=b"not a replication record", PartitionKey="garbled")
    RegionProvisioner(load_topology(config), CN, lambda _line: None).store_peer_credentials(
        SG, "AKIDROTATEDPROM", "rotated-dummy-secret")
    regions.control(SG).revoke(peer_writer_key_pair(SG)[0])
    put(regions, CN, "stale", now)
    put(regions, CN, "stale", now - 100)  # older than what it overwrites: repaired, and stale in Singapore
    put(regions, CN, "expiring", now, expires_at={"N": str(int(now) - 60)})
    assert regions.control(CN).ttl_sweep(TABLES[CN], "expires_at") == 1
    faults.fired("ReplicatordRecordsRefused", sent, 30, region=SG, reason="bad_record")
    faults.fired("ReplicatordDeadLetters", sent, 30, region=SG, reason="bad_record")
    for allowance in refusals:
        allowance.fixed()  # one record: the window forgets it


def _paused_direction_and_unusable_stream(regions: LocalRegions, config: Path, prometheus: Prometheus,
                                          watch: AlertWatch, faults: Faults) -> None:
    """Singapore's table stream is re-enabled with the wrong view type, then put right:
    StreamUnusable. Meanwhile an operator pauses forwarding from Beijing to Singapore for a moment
    (records wait in the outbox), then resumes it."""
    expected = [watch.allow("ReplicatordStreamUnusable", region=SG),
                # A new stream: its shards have no holder until the daemon takes their leases.
                watch.allow("ReplicatordNoLeasesHeld", grace_s=LATE_GRACE_S, region=SG, pipeline="forwarder"),
                watch.allow("ReplicatordPeerDiverted", grace_s=5, region=CN, peer=SG),  # paused: not for long
                watch.allow("ReplicatordPausedLong", region=CN)]  # pending only: paused for seconds, not its for:
    ddb = regions.client("dynamodb", SG)
    ddb.update_table(TableName=TABLES[SG], StreamSpecification={"StreamEnabled": False})
    ddb.update_table(TableName=TABLES[SG], StreamSpecification={"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"})
    wrong = time.monotonic()
    direction = f"{CN}:{SG}"
    operator(set_paused(load_topology(config), "user", direction, True, {}))
    faults.wait(lambda: bool(prometheus.query(f'replicatord_paused{{region="{CN}", direction="{direction}"}} == 1')),
                30, "Prometheus to see the pause")
    operator(set_paused(load_topology(config), "user", direction, False, {}))
    faults.fired("ReplicatordStreamUnusable", wrong, 30, region=SG)
    ddb.update_table(TableName=TABLES[SG], StreamSpecification={"StreamEnabled": False})
    ddb.update_table(TableName=TABLES[SG], StreamSpecification={"StreamEnabled": True,
                                                                 "StreamViewType": "NEW_AND_OLD_IMAGES"})
    for allowance in expected:
        allowance.fixed()
    faults.resolved("ReplicatordStreamUnusable", time.monotonic(), 30, region=SG)


def operator(work: Coroutine[Any, Any, str]) -> None:
    """An operator command's work (`replicatord pause`...), with the operator's key pair."""
    with acting_as(OPERATOR_KEY_PAIR):
        asyncio.run(work)


def _slow_border(border: WanLink, watch: AlertWatch, faults: Faults) -> None:
    """Every chunk across the border held 1.5 s each way: the peer answers, late."""
    faults.wait(lambda: not any(watch.is_active(name) for name in (
        "ReplicatordPeerUnreachable", "ReplicatordPeerDiverted", "ReplicatordReplicationLagHigh")),
                30, "what the key rotation left to end")
    lag = watch.allow("ReplicatordReplicationLagHigh", region=SG)
    border.delay_ms = BORDER_DELAY_MS
    slowed = time.monotonic()
    faults.fired("ReplicatordReplicationLagHigh", slowed, 60, region=SG)
    border.delay_ms = 0.0
    lag.fixed()
    faults.resolved("ReplicatordReplicationLagHigh", time.monotonic(), 60, region=SG)


def _singapore_silent(border: WanLink, sg_home: WanLink, watch: AlertWatch, faults: Faults) -> None:
    """Singapore's AWS endpoints accept connections and answer nothing, to both daemons (a black
    hole): for Beijing the peer is unreachable and its records wait in the outbox; Singapore's
    daemon runs and serves /metrics but cannot renew its leases (its lease table is silent too),
    stops its shards, and no one holds them."""
    expected = [watch.allow("ReplicatordPeerUnreachable", region=CN, peer=SG),
                watch.allow("ReplicatordPeerDiverted", region=CN, peer=SG),
                watch.allow("ReplicatordNoLeasesHeld", region=SG),
                # Each call into the silence ends at its deadline, an error: sustained, if it lasts.
                watch.allow("ReplicatordErrorRateHigh", grace_s=LATE_GRACE_S, region=CN),
                watch.allow("ReplicatordErrorRateHigh", grace_s=LATE_GRACE_S, region=SG),
                # What waited (in Beijing's outbox, on Singapore's stream) arrives late.
                watch.allow("ReplicatordReplicationLagHigh", grace_s=LATE_GRACE_S, region=SG)]
    border.set_blackhole(True)
    sg_home.set_blackhole(True)
    silent = time.monotonic()
    faults.fired("ReplicatordPeerUnreachable", silent, 60, region=CN, peer=SG)
    for pipeline in ("forwarder", "applier"):
        faults.fired("ReplicatordNoLeasesHeld", silent, 60, region=SG, pipeline=pipeline)
    faults.fired("ReplicatordPeerDiverted", silent, 60, region=CN, peer=SG)
    border.set_blackhole(False)
    sg_home.set_blackhole(False)
    fixed = time.monotonic()
    for allowance in expected:
        allowance.fixed()
    faults.resolved("ReplicatordPeerUnreachable", fixed, 60, region=CN, peer=SG)
    faults.resolved("ReplicatordPeerDiverted", fixed, 60, region=CN, peer=SG)
    faults.resolved("ReplicatordNoLeasesHeld", fixed, 60, region=SG)


def _killed_and_restarted(regions: LocalRegions, sg: DaemonProcess, watch: AlertWatch,
                          faults: Faults) -> DaemonProcess:
    """Singapore's only daemon dies; it is started again (a new instance id, as host-pid is) on the
    same address, and takes the dead one's leases over once they expire (failover_s)."""
    expected = [watch.allow("ReplicatordDown", region=SG),
                watch.allow("ReplicatordAbsent", region=SG),
                # Until the failover time has passed no one holds Singapore's leases: true, and
                # shorter than NoLeasesHeld's `for:` at full scale (10 s against 5 min), not here.
                watch.allow("ReplicatordNoLeasesHeld", grace_s=LATE_GRACE_S, region=SG),
                watch.allow("ReplicatordReplicationLagHigh", grace_s=LATE_GRACE_S, region=SG)]
    sg.kill()
    killed = time.monotonic()
    faults.fired("ReplicatordDown", killed, 30, region=SG)
    faults.fired("ReplicatordAbsent", killed, 30, region=SG)
    restarted = DaemonProcess(sg.config, SG, regions.workdir, instance_id=f"{SG}-restarted")
    restarted.port = sg.port  # the address Prometheus scrapes
    regions.daemons.append(restarted.start())
    started = time.monotonic()
    for allowance in expected:
        allowance.fixed()
    faults.resolved("ReplicatordDown", started, 60, region=SG)
    faults.resolved("ReplicatordAbsent", started, 60, region=SG)
    faults.wait(lambda: metric_sum(restarted.metrics(), "replicatord_lease_takeovers_total") >= 1, 30,
                "the restarted daemon to take over the dead one's leases")
    faults.wait(lambda: not watch.is_active("ReplicatordNoLeasesHeld"), 30, "Singapore's leases to be held again")
    return restarted


class DashboardQueries:
    """Each panel query of config/grafana-dashboard.json, with Grafana's variables as Grafana sets
    them for this run (All for region, instance and pair; $__interval at the scrape interval, its
    floor; $__rate_interval = max($__interval + scrape interval, 4 x scrape interval); $__range the
    run so far), must parse and, at one of the moments it is run, return series. Before a daemon is
    killed, every series that events made is there; the lease takeovers only after it."""

    def __init__(self, prometheus: Prometheus, began: float) -> None:
        self.prometheus = prometheus
        self.began = began
        self.targets = dashboard_targets(json.loads(DASHBOARD.read_text()))
        self.answered: set[int] = set()  # indexes in self.targets
        self.finite: set[int] = set()

    def values(self) -> dict[str, str]:
        return {"region": ".*", "instance": ".*", "pair": ".*", "__interval": format_duration(INTERVAL_S),
                "__rate_interval": format_duration(max(2 * INTERVAL_S, 4 * INTERVAL_S)),
                "__range": format_duration(math.ceil(time.monotonic() - self.began))}

    def run(self) -> set[int]:
        """Run every query not answered yet (PrometheusError if one does not parse); what is still
        without series."""
        values = self.values()
        for index, (_, _, expr) in enumerate(self.targets):
            if index in self.answered:
                continue
            result = self.prometheus.query(grafana_expr(expr, values))
            if result:
                self.answered.add(index)
            if any(math.isfinite(float(sample["value"][1])) for sample in result):
                self.finite.add(index)
        return self.missing()

    def missing(self) -> set[int]:
        return set(range(len(self.targets))) - self.answered

    def check(self, deadline_s: float) -> str:
        """Wait for the queries still without series (but those of NO_SERIES_HERE); check the
        variables' queries."""
        exempt = {i for i, (_, _, expr) in enumerate(self.targets) if any(m in expr for m in NO_SERIES_HERE)}
        try:
            wait_for(lambda: self.run() <= exempt, deadline_s, "every dashboard query to return series")
        except TimeoutError:
            raise AssertionError("dashboard queries without series: " + "; ".join(
                f"{t} {r}: {grafana_expr(e, self.values())}" for i, (t, r, e) in enumerate(self.targets)
                if i in self.missing() - exempt)) from None
        now_answered = [self.targets[i][:2] for i in exempt & self.answered]
        assert not now_answered, f"{now_answered} return series now: take them off NO_SERIES_HERE"
        values = self.values()
        for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
                assert match, variable["definition"]
                found = self.prometheus.label_values(match.group(2), grafana_expr(match.group(1), values))
                assert found, f"variable {variable['name']}: no values"
                if variable["name"] == "region":
                    assert set(found) == set(REGIONS), found
        return (f"{len(self.targets)} queries parse, {len(self.answered)} return series ({len(self.finite)} with a "
                f"finite value), {len(exempt)} documented without")
