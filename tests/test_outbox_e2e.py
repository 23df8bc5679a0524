"""Store and forward end to end (issue 19): a peer black-holed for longer than the DynamoDB
stream's retention loses nothing, and one unreachable peer never holds up the others.

The local regions keep DynamoDB stream records 20 s (AWS: 24 hours) and roll shards over every
3 s, so an outage of 35 s is longer than the stream keeps anything: without an outbox the
forwarder's position would be trimmed while it waits for the peer (docs/outbox.md).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from replicatord.local.wan import running_link
from replicatord.local.world import (
    DaemonProcess,
    metric_sum,
    regions_for,
    table_of,
    topology_document,
    wait_for,
    write_topology,
)
from tests.conftest import LocalRegions, assert_identical, quick_tuning

pytestmark = pytest.mark.e2e

RETENTION_S = 20.0
# Longer than the stream's retention (OUTBOX_OUTAGE_S=300 for the README's figure).
OUTAGE_S = float(os.environ.get("OUTBOX_OUTAGE_S", "35"))
MESH_TUNING = quick_tuning(aws_timeout_s=2, outbox_after_s=3)
# Small pages: the outbox drains for a few seconds, long enough to kill the daemon meanwhile.
TUNING = {**MESH_TUNING, "get_records_limit": 10}
MODE = {"direct": 0, "diverted": 1, "draining": 2}


@pytest.fixture
def behaviour(behaviour: dict[str, Any]) -> dict[str, Any]:
    return {**behaviour, "stream_rollover_s": 3.0, "stream_retention_s": RETENTION_S}


class Writers:
    """Each region's application writes its own items, `rate` a second, until stopped."""

    def __init__(self, regions: LocalRegions, names: tuple[str, ...], rate: float = 10.0) -> None:
        self.regions = regions
        self.stop = threading.Event()
        self.written: dict[str, int] = dict.fromkeys(names, 0)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._write, args=(r, 1 / rate), daemon=True) for r in names]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not self.errors, self.errors

    def _write(self, region: str, every_s: float) -> None:
        ddb = self.regions.client("dynamodb", region)
        try:
            while not self.stop.wait(every_s):
                i = self.written[region]
                # Items written in both regions too: the last writer must win everywhere.
                pk = f"shared-{i % 40}" if i % 3 == 0 else f"{region}-{i}"
                ddb.put_item(TableName=table_of(region), Item={
                    "PK": {"S": pk}, "n": {"N": str(i)}, "last_update_timestamp": {"N": f"{time.time():.6f}"},
                    "last_updater_region": {"S": region}})
                self.written[region] = i + 1
        except BaseException as exc:  # noqa: BLE001 - reported by __exit__
            self.errors.append(exc)


def mode(daemon: DaemonProcess, peer: str) -> float:
    return metric_sum(daemon.metrics(), "replicatord_peer_mode", peer=peer)


def arrived(regions: LocalRegions, region: str, pk: str) -> bool:
    item = regions.client("dynamodb", region).get_item(TableName=table_of(region), Key={"PK": {"S": pk}},
                                                       ConsistentRead=True)
    return "Item" in item


def probe(regions: LocalRegions, source: str, target: str, name: str, deadline_s: float) -> float:
    """Write an item in `source`; seconds until it is in `target`."""
    written = time.monotonic()
    regions.client("dynamodb", source).put_item(TableName=table_of(source), Item={
        "PK": {"S": name}, "last_update_timestamp": {"N": f"{time.time():.6f}"},
        "last_updater_region": {"S": source}})
    wait_for(lambda: arrived(regions, target, name), deadline_s, f"{name} to reach {target}", interval_s=0.05)
    return time.monotonic() - written


def no_trim_reported(regions: LocalRegions) -> None:
    for log in regions.workdir.glob("daemon-*.log"):
        text = log.read_text()
        assert "were trimmed" not in text and "at its retention" not in text, log.name


def test_a_black_hole_longer_than_the_stream_retention_loses_nothing_through_kill_9_while_diverted_and_draining(
        regions: LocalRegions, tmp_path: Path) -> None:
    cn, sg = regions_for(2)
    regions.provision(tuning=TUNING)
    sg_port = int(regions.endpoints[sg].rsplit(":", 1)[1])
    with running_link("127.0.0.1", sg_port) as link:
        # Beijing reaches Singapore only through the link; Singapore reaches Beijing directly.
        config = write_topology(tmp_path / "cn.yaml", topology_document(
            {**regions.endpoints, sg: f"http://127.0.0.1:{link.port}"}, tuning=TUNING))

        def start_cn() -> DaemonProcess:
            daemon = DaemonProcess(config, cn, tmp_path).start()
            regions.daemons.append(daemon)
            daemon.wait_ready(60)  # ready with the peer unreachable: every instance of the region sees the same
            return daemon

        beijing = start_cn()
        regions.daemon(sg).wait_ready(60)
        with Writers(regions, (cn, sg)):
            wait_for(lambda: mode(beijing, sg) == MODE["direct"] and beijing.metrics().get("replicatord_up") == 1,
                     60, "Beijing to forward direct")
            link.set_blackhole(True)
            began = time.monotonic()
            wait_for(lambda: mode(beijing, sg) == MODE["diverted"], 30, "Singapore to be diverted")
            # The other direction is not held up: Singapore's writes reach Beijing at their usual pace.
            lag = probe(regions, sg, cn, "probe-sg-while-diverted", 30)
            beijing.kill()  # kill -9 while diverted
            beijing = start_cn()
            wait_for(lambda: mode(beijing, sg) == MODE["diverted"], 30, "Singapore to be diverted after the restart")
            wait_for(lambda: time.monotonic() - began > OUTAGE_S, OUTAGE_S + 5, "the outage to outlast the retention")
            held = metric_sum(beijing.metrics(), "replicatord_outbox_oldest_age_seconds", peer=sg)
            link.set_blackhole(False)
            wait_for(lambda: mode(beijing, sg) == MODE["draining"], 60, "Singapore to answer and the outbox to drain",
                     interval_s=0.05)
            beijing.kill()  # kill -9 while draining
            beijing = start_cn()
            wait_for(lambda: mode(beijing, sg) == MODE["direct"], 120, "the outbox to be drained")
            probe(regions, cn, sg, "probe-cn-after", 30)
        wait_for(lambda: assert_identical_quietly(regions), 120, "the tables to converge")
        assert_identical(regions, {cn: table_of(cn), sg: table_of(sg)})
        no_trim_reported(regions)
        print(f"\nlag Singapore -> Beijing while Singapore was diverted: {lag:.2f}s; "
              f"oldest record held in the outbox at the end of the outage: {held:.1f}s")


def assert_identical_quietly(regions: LocalRegions) -> bool:
    try:
        assert_identical(regions, {r: table_of(r) for r in regions.endpoints})
    except AssertionError:
        return False
    return True


def test_without_an_outbox_the_same_outage_loses_the_stream_records(regions: LocalRegions, tmp_path: Path) -> None:
    """`outbox: null`: the old behaviour, and what the outbox buys (this must report a trim)."""
    cn, sg = regions_for(2)
    regions.provision(tuning=TUNING, outbox=None)
    sg_port = int(regions.endpoints[sg].rsplit(":", 1)[1])
    with running_link("127.0.0.1", sg_port) as link:
        config = write_topology(tmp_path / "cn.yaml", topology_document(
            {**regions.endpoints, sg: f"http://127.0.0.1:{link.port}"}, tuning=TUNING, outbox=None))
        beijing = DaemonProcess(config, cn, tmp_path).start()
        regions.daemons.append(beijing)
        beijing.wait_ready(60)
        link.set_blackhole(True)
        with Writers(regions, (cn,)):
            time.sleep(OUTAGE_S)  # the outage under test: its length is the point
            link.set_blackhole(False)
            wait_for(lambda: metric_sum(beijing.metrics(), "replicatord_checkpoint_trimmed_total") > 0,
                     60, "the forwarder to report records lost to the stream's retention")
        assert beijing.alive()


def test_three_regions_one_black_holed_longer_than_the_retention_the_others_keep_their_lag(
        mesh: LocalRegions, tmp_path: Path) -> None:
    """Ningxia goes silent both ways (connections accepted, nothing answered) while all three
    write: Beijing and Singapore keep replicating to each other at their usual lag; once Ningxia
    answers, all three converge exactly to the last writer."""
    cn, sg, nx = regions_for(3)
    mesh.provision(tuning=MESH_TUNING)
    ports = {r: int(url.rsplit(":", 1)[1]) for r, url in mesh.endpoints.items()}
    with running_link("127.0.0.1", ports[nx]) as to_nx, running_link("127.0.0.1", ports[cn]) as nx_to_cn, \
            running_link("127.0.0.1", ports[sg]) as nx_to_sg:
        links = (to_nx, nx_to_cn, nx_to_sg)
        for region in (cn, sg):
            config = write_topology(tmp_path / f"{region}.yaml", topology_document(
                {**mesh.endpoints, nx: f"http://127.0.0.1:{to_nx.port}"}, tuning=MESH_TUNING))
            mesh.daemons.append(DaemonProcess(config, region, tmp_path).start())
        config = write_topology(tmp_path / f"{nx}.yaml", topology_document(
            {**mesh.endpoints, cn: f"http://127.0.0.1:{nx_to_cn.port}", sg: f"http://127.0.0.1:{nx_to_sg.port}"},
            tuning=MESH_TUNING))
        mesh.daemons.append(DaemonProcess(config, nx, tmp_path).start())
        for daemon in mesh.daemons:
            daemon.wait_ready(60)
        beijing, singapore, _ = mesh.daemons
        with Writers(mesh, (cn, sg, nx)):
            before = [probe(mesh, cn, sg, "probe-before-cn", 30), probe(mesh, sg, cn, "probe-before-sg", 30)]
            for link in links:
                link.set_blackhole(True)
            began = time.monotonic()
            wait_for(lambda: mode(beijing, nx) == MODE["diverted"] and mode(singapore, nx) == MODE["diverted"], 30,
                     "Ningxia to be diverted in Beijing and Singapore")
            during = []
            while time.monotonic() - began < OUTAGE_S:
                i = len(during)
                during.append(probe(mesh, cn, sg, f"probe-cn-{i}", 30))
                during.append(probe(mesh, sg, cn, f"probe-sg-{i}", 30))
            for link in links:
                link.set_blackhole(False)
            restored = time.monotonic()
            for daemon in (beijing, singapore):
                wait_for(lambda d=daemon: mode(d, nx) == MODE["direct"], 120, "Ningxia's outboxes to drain")
            drained_s = time.monotonic() - restored
            shipped = sum(metric_sum(d.metrics(), "replicatord_outbox_records_total", peer=nx, event="shipped")
                          for d in (beijing, singapore))
        wait_for(lambda: assert_identical_quietly(mesh), 180, "the three tables to converge")
        assert_identical(mesh, {r: table_of(r) for r in (cn, sg, nx)})
        no_trim_reported(mesh)
        print(f"\nBeijing <-> Singapore lag before: {', '.join(f'{x:.2f}s' for x in before)}; "
              f"while Ningxia was black-holed ({len(during)} probes): mean {sum(during) / len(during):.2f}s, "
              f"max {max(during):.2f}s; outage {OUTAGE_S:.0f}s; {shipped:.0f} records shipped from the two "
              f"outboxes, both direct again {drained_s:.1f}s after Ningxia answered")
