"""End to end: daemons as subprocesses, one moto server process per region, squid on the WAN path."""

from __future__ import annotations

import random
import threading
import time
from decimal import Decimal

import pytest

from replicatord.local.compare import scan_items
from replicatord.local.load import load
from replicatord.local.squid import Squid
from replicatord.local.world import REGIONS, Drained, metric_sum, read_counter, scan_leases, wait_drained, wait_for
from tests.conftest import LocalRegions, assert_identical

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
TABLES = {CN: "user-cn", SG: "user-sg"}
STREAMS = {CN: "ddb_replication_stream_cn", SG: "ddb_replication_stream_sg"}
DRAIN_S = 180
EACH = 1200  # items loaded into each region through squid (CI's time budget)


class Loads:
    """The load generator running into both regions at once, in threads."""

    def __init__(self, regions: LocalRegions, count: int, processes: int = 2) -> None:
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(regions, r, count, processes)) for r in REGIONS
        ]
        for t in self.threads:
            t.start()

    def _run(self, regions: LocalRegions, region: str, count: int, processes: int) -> None:
        try:
            load(TABLES[region], region, count, batched=True, processes=processes,
                 endpoint_url=regions.endpoints[region])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread by join()
            self.errors.append(exc)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=300)
        assert not self.errors, self.errors


def _shared_writes(regions: LocalRegions, keys: int, seed: int) -> dict[str, tuple[Decimal, int, str]]:
    """Both regions write the same keys at once, with colliding timestamps. Returns each key's
    winning version (timestamp, PUT=0, region): what both tables must hold afterwards."""
    rnd = random.Random(seed)
    base = Decimal(int(time.time()))
    plans: dict[str, list[tuple[str, Decimal]]] = {r: [] for r in REGIONS}
    winners: dict[str, tuple[Decimal, int, str]] = {}
    for i in range(keys):
        pk = f"shared-{i:03d}"
        for region in REGIONS:
            # Few values, so many exact ties across regions. Within a region a (timestamp,
            # region) pair names one change (docs/design.md §4), so a region never reuses one.
            for offset in rnd.sample(range(4), 3):
                ts = base + offset
                plans[region].append((pk, ts))
                version = (ts, 0, region)
                if pk not in winners or winners[pk] < version:
                    winners[pk] = version
    for region in REGIONS:
        rnd.shuffle(plans[region])

    def write(region: str) -> None:
        ddb = regions.client("dynamodb", region)
        for n, (pk, ts) in enumerate(plans[region]):
            ddb.put_item(TableName=TABLES[region], Item={
                "PK": {"S": pk},
                "last_update_timestamp": {"N": str(ts)},
                "last_updater_region": {"S": region},
                "writer": {"S": f"{region}#{n}"},
                "payload": {"M": {"n": {"N": str(n)}, "b": {"B": bytes([n % 256])}, "l": {"L": [{"NULL": True}]}}},
            })

    threads = [threading.Thread(target=write, args=(r,)) for r in REGIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return winners


def _drained(regions: LocalRegions) -> None:
    wait_drained(regions.client, {r: [(TABLES[r], STREAMS[r])] for r in REGIONS}, DRAIN_S)


def test_both_directions_through_squid_converge(regions: LocalRegions, squid: Squid) -> None:
    regions.provision(proxies={CN: squid.url, SG: squid.url})
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for d in daemons.values():
        d.wait_ready()

    loads = Loads(regions, EACH)
    winners = _shared_writes(regions, keys=40, seed=7)
    loads.join()
    _drained(regions)

    diff = assert_identical(regions, TABLES)
    assert diff.counts == {CN: 2 * EACH + 40, SG: 2 * EACH + 40}
    cn_items = {i["PK"]["S"]: i for i in scan_items(regions.client("dynamodb", CN), TABLES[CN])[1].values()}
    for pk, (ts, _, region) in winners.items():
        item = cn_items[pk]
        assert (Decimal(item["last_update_timestamp"]["N"]), item["last_updater_region"]["S"]) == (ts, region), pk

    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    metrics = {r: d.metrics() for r, d in daemons.items()}
    for src, dst in ((CN, SG), (SG, CN)):
        loaded = read_counter(ddb[src], "loader_stats", "loaded_count")
        assert loaded == EACH
        forwarded = metric_sum(metrics[src], "replicatord_records_forwarded_total", peer=dst)
        # No bounce: a region forwards its own application writes (EACH + 3 per shared key) and
        # what its repairs restored (docs/design.md §4: harmless), never what its applier wrote.
        own_writes = EACH + 3 * 40
        repairs = metric_sum(metrics[src], "replicatord_conflicts_total")
        assert own_writes <= forwarded <= own_writes + repairs
        applied = metric_sum(metrics[dst], "replicatord_records_applied_total")
        stale = metric_sum(metrics[dst], "replicatord_records_stale_total")
        # A PutRecords answered with a 5xx after it took effect is sent again: its entries arrive
        # twice (at least once, as docs/design.md §4 allows); without such a fault the counts match.
        if regions.control(dst).stats()["faults"].get("kinesis.error_after", 0):
            assert applied + stale >= forwarded
        else:
            assert applied + stale == forwarded
        # The EACH new items all applied; the shared writes count as applied or stale.
        # replicated_count is written at most every 2 s (applier.STATS_INTERVAL_S): wait for it.
        # An ADD answered with a 5xx after it took effect is sent again by botocore and counted
        # twice (best effort, as README says); without such a fault the counts match.
        wait_for(lambda: read_counter(ddb[dst], "replicator_stats", "replicated_count") >= applied, 30,  # noqa: B023
                 f"replicated_count in {dst} to reach the applied count")
        if not regions.control(dst).stats()["faults"].get("dynamodb.error_after", 0):
            assert read_counter(ddb[dst], "replicator_stats", "replicated_count") == applied
        assert applied >= EACH
        assert metric_sum(metrics[src], "replicatord_records_skipped_total", reason="replicated") >= EACH

    # Every cross-region PutRecords went through squid, to both regions' endpoints.
    log = "\n".join(squid.requests())
    for region in REGIONS:
        assert f"POST {regions.endpoints[region]}/" in log, f"no proxied request to {region}"

    for d in daemons.values():
        assert d.terminate() == 0


def test_deletes_replicate_without_echo(regions: LocalRegions) -> None:
    regions.provision()
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for d in daemons.values():
        d.wait_ready()
    Loads(regions, 200, processes=1).join()
    _drained(regions)

    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    deleted: dict[str, list[str]] = {}
    for region in REGIONS:
        own = [i["PK"]["S"] for i in scan_items(ddb[region], TABLES[region])[1].values()
               if i["last_updater_region"]["S"] == region][:25]
        for pk in own:
            ddb[region].delete_item(TableName=TABLES[region], Key={"PK": {"S": pk}})
        deleted[region] = own

    def gone() -> bool:
        return all(
            "Item" not in ddb[r].get_item(TableName=TABLES[r], Key={"PK": {"S": pk}})
            for r in REGIONS for pks in deleted.values() for pk in pks
        )

    wait_for(gone, DRAIN_S, "deletes to reach the other region")
    _drained(regions)
    diff = assert_identical(regions, TABLES)
    assert diff.counts == {CN: 350, SG: 350}
    for src, dst in ((CN, SG), (SG, CN)):
        # 200 inserts + 25 deletes; the replicated deletes were recognised, not echoed back.
        assert metric_sum(daemons[src].metrics(), "replicatord_records_forwarded_total", peer=dst) == 225
        # A delete answered with a 5xx after it took effect is retried, finds the item gone and
        # counts as stale: the count is exact only up to those injected faults.
        late = regions.control(dst).stats()["faults"].get("dynamodb.error_after", 0)
        applied = metric_sum(daemons[dst].metrics(), "replicatord_records_applied_total", op="DELETE")
        assert 25 - late <= applied <= 25
        assert metric_sum(daemons[dst].metrics(), "replicatord_records_skipped_total", reason="known_delete") == 25

    # SIGTERM: exit 0 with the forwarder checkpointed at the stream's last record and the lease released.
    assert daemons[CN].terminate() == 0
    forwarder = [lease for lease in scan_leases(regions.client("dynamodb", CN))
                 if lease.key.startswith("forwarder/user-cn@")]
    # The stream rolled over: many leases, the finished ones keep their owner, no active one does.
    assert forwarder and all(lease.owner is None for lease in forwarder if lease.state == "active")
    positions = [p for p in Drained(regions.client, {CN: [(TABLES[CN], STREAMS[CN])]}).positions()
                 if p[1].startswith("forwarder/")]
    assert positions and all(checkpoint == end for _, _, checkpoint, end in positions), positions


def test_kill_9_mid_load_then_restart_loses_nothing(regions: LocalRegions) -> None:
    regions.provision()
    daemons = {r: regions.daemon(r, instance_id=f"{r}-first") for r in REGIONS}
    for d in daemons.values():
        d.wait_ready()
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}

    loads = Loads(regions, 1500)
    # Kill the Singapore daemon while both directions are busy.
    wait_for(lambda: read_counter(ddb[SG], "replicator_stats", "replicated_count") >= 200, 120,
             "replication to be under way")
    daemons[SG].kill()
    loads.join()
    restarted = regions.daemon(SG, instance_id=f"{SG}-second")
    restarted.wait_ready()
    daemons[SG] = restarted

    def converged() -> bool:
        counts = {r: ddb[r].scan(TableName=TABLES[r], Select="COUNT")["Count"] for r in REGIONS}
        return counts == {CN: 3000, SG: 3000}

    wait_for(converged, DRAIN_S, "every item to reach both regions")
    assert_identical(regions, TABLES)
    for d in daemons.values():
        assert d.terminate() == 0
