"""Three regions end to end (issue 11): Beijing and Ningxia in the China partition, Singapore in
the global one. A full mesh: every region forwards its own changes to both peers; the two China
regions reach each other with their own role (no key pair in SSM), the border is crossed with
SSM key pairs. Then a region added to a running two-region topology under load."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from replicatord.local.load import load
from replicatord.local.world import (
    DaemonProcess,
    provision_local,
    read_counter,
    regions_for,
    stream_of,
    table_of,
    wait_drained,
    wait_for,
)
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning

pytestmark = pytest.mark.e2e

CN, SG, NX = regions_for(3)
TUNING = quick_tuning(shard_refresh_s=2)
DRAIN_S = 240
# Items the two-region topology holds when the third region is added (20,000 for the figure in
# the README: MESH_ADD_ITEMS=20000 .venv/bin/pytest -s tests/test_mesh_e2e.py -k added).
ADD_ITEMS = int(os.environ.get("MESH_ADD_ITEMS", "500"))


def _load(mesh: LocalRegions, region: str, count: int, errors: list[BaseException]) -> None:
    try:
        load(table_of(region), region, count, batched=True, processes=1, endpoint_url=mesh.endpoints[region])
    except BaseException as exc:  # noqa: BLE001 - re-raised by the test
        errors.append(exc)


def _drained(mesh: LocalRegions, regions: tuple[str, ...]) -> None:
    wait_drained(mesh.client, {r: [(table_of(r), stream_of(r))] for r in regions}, DRAIN_S,
                 f"the pipelines of {', '.join(regions)} to drain")


def _identical(mesh: LocalRegions, regions: tuple[str, ...]) -> dict[str, int]:
    return assert_identical(mesh, {r: table_of(r) for r in regions}).counts


def test_three_regions_load_at_once_with_a_kill_9_converge(mesh: LocalRegions) -> None:
    config = mesh.provision(tuning=TUNING)
    # The China regions hold no key pair of each other: they use the instance's own role.
    ssm = mesh.client("ssm", NX)
    names = {p["Name"] for p in ssm.describe_parameters()["Parameters"]}
    assert not any("TableCN" in name for name in names), names
    plan = cli("check-config", "--config", str(config), "--region", NX)
    assert "peer cn-north-1:" in plan.stdout and "own role (same partition)" in plan.stdout, plan.stdout

    daemons = {r: mesh.daemon(r, instance_id=f"{r}-first") for r in (CN, SG, NX)}
    for daemon in daemons.values():
        daemon.wait_ready(60)
    errors: list[BaseException] = []
    loads = [threading.Thread(target=_load, args=(mesh, r, 400, errors)) for r in (CN, SG, NX)]
    for thread in loads:
        thread.start()
    wait_for(lambda: read_counter(mesh.client("dynamodb", NX), "replicator_stats", "replicated_count") >= 100,
             120, "replication into Ningxia to be under way")
    daemons[NX].kill()  # kill -9 while all three regions load
    daemons[NX] = mesh.daemon(NX, instance_id=f"{NX}-second")
    for thread in loads:
        thread.join(timeout=300)
    assert not errors, errors
    daemons[NX].wait_ready(60)
    _drained(mesh, (CN, SG, NX))
    assert _identical(mesh, (CN, SG, NX)) == {CN: 1200, SG: 1200, NX: 1200}
    verify = cli("verify", "--config", str(config), "--json", "--rate", "0")
    assert verify.returncode == 0, verify.stdout
    assert {c["region"] for c in json.loads(verify.stdout)["comparisons"]} == {SG, NX}  # against Beijing
    status = json.loads(cli("status", "--config", str(config), "--json").stdout)
    assert sorted(d["direction"] for d in status["pairs"]["user"]) == sorted(
        f"{a} -> {b}" for a in (CN, SG, NX) for b in (CN, SG, NX) if a != b)
    for daemon in daemons.values():
        assert daemon.terminate() == 0


@pytest.mark.timeout(1800)  # the long run (MESH_ADD_ITEMS=20000) copies 20,000 items one conditional put at a time
def test_a_region_added_under_load_gets_everything(mesh: LocalRegions) -> None:
    """Two regions running with data and writes; Ningxia is provisioned, its daemon started, the
    others restarted one by one with the three-region topology, Ningxia backfilled from Beijing
    while both keep writing; then all three are identical and verify exits 0."""
    two = mesh.write_config(only=(CN, SG), name="two.yaml", tuning=TUNING)
    provision_local(two, report=lambda _line: None)
    daemons = {r: DaemonProcess(two, r, mesh.workdir, f"{r}-two").start() for r in (CN, SG)}
    mesh.daemons += daemons.values()
    for daemon in daemons.values():
        daemon.wait_ready(60)
    errors: list[BaseException] = []
    _load(mesh, CN, ADD_ITEMS, errors)
    assert not errors, errors
    wait_drained(mesh.client, {r: [(table_of(r), stream_of(r))] for r in (CN, SG)}, DRAIN_S + ADD_ITEMS / 50,
                 "the two regions to hold the data")

    # The applications keep writing in both regions: new keys, and newer versions of old ones.
    halt = threading.Event()
    written: dict[str, set[str]] = {CN: set(), SG: set()}

    def write(region: str) -> None:
        ddb = mesh.client("dynamodb", region)
        n = 0
        while not halt.is_set():
            pk = f"live-{region}-{n}"
            ddb.put_item(TableName=table_of(region), Item={
                "PK": {"S": pk}, "last_update_timestamp": {"N": f"{time.time():.6f}"},
                "last_updater_region": {"S": region}, "n": {"N": str(n)}})
            written[region].add(pk)
            n += 1
            halt.wait(0.05)  # a steady trickle, not a synchronisation

    writers = [threading.Thread(target=write, args=(r,)) for r in (CN, SG)]
    for writer in writers:
        writer.start()

    started = time.monotonic()
    three = mesh.write_config(name="three.yaml", tuning=TUNING)
    # Ningxia's resources and key pairs, and in Beijing and Singapore their outboxes for Ningxia
    # (provision creates only what is missing), as the README's procedure says.
    provision_local(three, report=lambda _line: None)
    new = DaemonProcess(three, NX, mesh.workdir, f"{NX}-three").start()
    mesh.daemons.append(new)
    new.wait_ready(60)
    for region in (CN, SG):  # rolling restart: each hands its leases over on SIGTERM
        assert daemons[region].terminate() == 0
        daemons[region] = DaemonProcess(three, region, mesh.workdir, f"{region}-three").start()
        mesh.daemons.append(daemons[region])
        daemons[region].wait_ready(60)
    backfill = cli("backfill", "--config", str(three), "--pair", "user", "--from", CN, "--to", NX,
                   "--json", "--rate", "0", timeout_s=1800)
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    summary = json.loads(backfill.stdout)
    assert summary["to"] == [NX] and summary["totals"]["failed"] == 0, summary
    added_s = time.monotonic() - started
    halt.set()
    for writer in writers:
        writer.join(timeout=30)
    _drained(mesh, (CN, SG, NX))
    counts = _identical(mesh, (CN, SG, NX))
    assert counts[NX] == ADD_ITEMS + len(written[CN]) + len(written[SG]), counts
    verify = cli("verify", "--config", str(three), "--json", "--rate", "0", timeout_s=600)
    assert verify.returncode == 0, verify.stdout
    print(f"\nregion added holding {ADD_ITEMS:,} items (+{len(written[CN]) + len(written[SG])} written meanwhile): "
          f"provisioned, started, others restarted and backfilled in {added_s:.0f}s; "
          f"backfill {summary['items_per_s']:,.0f} items/s; {summary['totals']['copied']:,} copied")
