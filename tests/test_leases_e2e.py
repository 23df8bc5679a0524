"""Several daemons per region share the shards: balance, failover, graceful handoff, fencing, resharding."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from replicatord.leases import Lease
from replicatord.local.load import load
from replicatord.local.world import REGIONS, DaemonProcess, metric_sum, read_counter, scan_leases, wait_for
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning, wait_until

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
TABLES = {CN: "user-cn", SG: "user-sg"}
# Shorter than the defaults (10 s / 3 s / 1 s) so that the suite stays quick; same ratios.
TUNING = quick_tuning(shard_refresh_s=2)
APPLIER = "applier/ddb_replication_stream_sg@"


class BackgroundLoad:
    def __init__(self, regions: LocalRegions, count: int) -> None:
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(regions, count))
        self.thread.start()

    def _run(self, regions: LocalRegions, count: int) -> None:
        try:
            load(TABLES[CN], CN, count, batched=False, processes=1, endpoint_url=regions.endpoints[CN])
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.errors.append(exc)

    def join(self) -> None:
        self.thread.join(timeout=300)
        assert not self.errors, self.errors


def applier_leases(regions: LocalRegions) -> dict[str, Lease]:
    return {lease.key: lease for lease in scan_leases(regions.client("dynamodb", SG)) if lease.key.startswith(APPLIER)}


def owners(regions: LocalRegions) -> dict[str, str | None]:
    return {key: lease.owner for key, lease in applier_leases(regions).items()}


def held(daemon: DaemonProcess) -> float:
    return metric_sum(daemon.metrics(), "replicatord_leases_held", pipeline="applier")


def owned_only_by(regions: LocalRegions, alive: list[DaemonProcess]) -> bool:
    """Every applier shard has exactly one owner, a live instance, and the live instances' own
    counts agree with the table (none believes it holds a lease it lost)."""
    current = owners(regions)
    ids = {d.instance_id for d in alive}
    if len(current) != 4 or not all(owner in ids for owner in current.values()):
        return False
    return all(held(d) == sum(1 for o in current.values() if o == d.instance_id) for d in alive)


def assert_converged(regions: LocalRegions, count: int) -> None:
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    wait_for(lambda: ddb[SG].scan(TableName=TABLES[SG], Select="COUNT")["Count"] >= count, 180,
             "every item to reach ap-southeast-1")
    assert_identical(regions, TABLES, count)


def test_three_instances_share_fail_over_hand_off_and_rebalance(regions: LocalRegions) -> None:
    regions.provision(kinesis_shards=4, tuning=TUNING)
    regions.daemon(CN).wait_ready()
    first = regions.daemon(SG, "sg-a")
    first.wait_ready()
    wait_for(lambda: owned_only_by(regions, [first]), 30, "one instance to hold all four shards")

    background = BackgroundLoad(regions, 2500)
    # Scale 1 -> 3: the newcomers steal one lease at a time until each holds 1 or 2.
    second, third = regions.daemon(SG, "sg-b"), regions.daemon(SG, "sg-c")
    instances = [first, second, third]

    def balanced() -> bool:
        return owned_only_by(regions, instances) and all(1 <= held(d) <= 2 for d in instances)

    wait_for(balanced, 60, "three instances to balance to 1-2 leases each")
    assert sum(metric_sum(d.metrics(), "replicatord_lease_steals_total") for d in instances) >= 2

    # kill -9: the victim's leases expire after failover_s and are taken within one more cycle.
    victim = max((second, third), key=held)
    victim.kill()
    killed_at = time.monotonic()
    survivors = [first, second if victim is third else third]
    wait_for(lambda: owned_only_by(regions, survivors), 60, "the killed instance's shards to be owned again",
             interval_s=0.05)
    failover_took = time.monotonic() - killed_at
    print(f"kill -9: shards owned again after {failover_took:.2f}s (failover_s {TUNING['failover_s']})")
    assert failover_took <= TUNING["failover_s"] + TUNING["renew_interval_s"] + 2.5, failover_took
    assert sum(metric_sum(d.metrics(), "replicatord_lease_takeovers_total") for d in survivors) >= 1

    # SIGTERM: the leaving instance releases its leases and the other takes them at once.
    leaving, staying = survivors[1], survivors[0]
    assert held(leaving) >= 1
    assert leaving.terminate() == 0
    stopped_at = time.monotonic()
    wait_for(lambda: owned_only_by(regions, [staying]), 30, "the released shards to be taken", interval_s=0.05)
    handoff_took = time.monotonic() - stopped_at
    print(f"SIGTERM: shards owned again {handoff_took:.2f}s after the process exited")
    assert handoff_took <= 2.0, handoff_took

    background.join()
    assert_converged(regions, 2500)
    status = cli("status", "--config", str(regions.config), "--region", SG)
    assert status.returncode == 0, status.stderr
    # The four applier shards, all with the last instance standing (the DynamoDB stream rolls over
    # every few seconds: its newest shard may be between its lease's creation and its taking).
    owner_of: dict[str, str] = {}
    owner = ""
    for line in status.stdout.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            owner = line.strip().split(":")[0]
        elif line.strip().startswith(APPLIER):
            owner_of[line.split()[0]] = owner
    assert len(owner_of) == 4 and set(owner_of.values()) == {staying.instance_id}, status.stdout


def test_a_fenced_instance_cannot_move_a_checkpoint_back(regions: LocalRegions) -> None:
    regions.provision(kinesis_shards=4, tuning=TUNING)
    regions.daemon(CN).wait_ready()
    paused = regions.daemon(SG, "sg-paused")
    paused.wait_ready()
    wait_for(lambda: owned_only_by(regions, [paused]), 30, "one instance to hold all four shards")
    background = BackgroundLoad(regions, 1500)
    wait_for(lambda: read_counter(regions.client("dynamodb", SG), "replicator_stats", "replicated_count") > 100,
             60, "replication to be under way")
    assert paused.process is not None
    os.kill(paused.process.pid, signal.SIGSTOP)
    other = regions.daemon(SG, "sg-other")
    try:
        wait_for(lambda: set(owners(regions).values()) == {"sg-other"}, 60, "the other instance to take over")
        history: dict[str, list[int]] = {}

        def record() -> None:
            for key, lease in applier_leases(regions).items():
                if lease.checkpoint is not None:
                    history.setdefault(key, []).append(int(lease.checkpoint))

        record()
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)
    # The resumed instance finds its leases gone (renewal or checkpoint fails) and stops those shards.
    def noticed() -> bool:
        record()
        return metric_sum(paused.metrics(), "replicatord_leases_lost_total") + metric_sum(
            paused.metrics(), "replicatord_errors_total", type="lease_lost") > 0

    wait_until(noticed, 60, "the paused instance to notice it lost its leases", interval_s=0.1)
    background.join()
    # Twenty more looks at the checkpoints while the resumed instance settles (an observation,
    # not a synchronisation: nothing waits on it).
    looks: list[None] = []

    def looked_twenty_times() -> bool:
        record()
        looks.append(None)
        return len(looks) >= 20

    wait_until(looked_twenty_times, 30, "twenty looks at the checkpoints", interval_s=0.1)
    for key, checkpoints in history.items():
        assert checkpoints == sorted(checkpoints), (key, checkpoints)
    # Having stopped the shards it lost, the resumed instance rejoins through the normal protocol.
    wait_for(lambda: owned_only_by(regions, [paused, other]) and held(paused) == held(other) == 2, 60,
             "the two instances to share the shards")
    assert_converged(regions, 1500)
    assert other.alive() and paused.alive()


def test_update_shard_count_during_a_load_loses_nothing(regions: LocalRegions) -> None:
    regions.provision(kinesis_shards=2, tuning=TUNING)
    regions.daemon(CN).wait_ready()
    regions.daemon(SG).wait_ready()
    background = BackgroundLoad(regions, 1500)
    wait_for(lambda: read_counter(regions.client("dynamodb", SG), "replicator_stats", "replicated_count") > 100,
             60, "replication to be under way")
    regions.client("kinesis", SG).update_shard_count(
        StreamName="ddb_replication_stream_sg", TargetShardCount=4, ScalingType="UNIFORM_SCALING")
    wait_for(lambda: len(applier_leases(regions)) == 6, 30, "leases for the four child shards")
    children = [lease for lease in applier_leases(regions).values() if lease.parents]
    assert len(children) == 4
    background.join()
    assert_converged(regions, 1500)
