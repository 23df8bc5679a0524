"""Randomized convergence against the real emulators (docs/design.md §4), reproducible from its seed.

Per seed: 20 keys written from every region at once (two regions, and a full mesh of three:
Beijing, Singapore, Ningxia) with puts, updates and deletes, timestamps near the wall clock with
clock skew between regions, exact ties across regions and stale application writes; duplicates
and reordering injected on the Kinesis streams (records put again, in shuffled order, on other
shards); a region whose Kinesis refuses every put for a few seconds, so that its peers divert
their records for it to their outboxes (docs/outbox.md) and records of one item arrive out of
order; daemon restarts (kill -9 or SIGTERM). After the writes stop and the pipelines drain,
all tables must be identical and every key must hold the last writer's version: the highest
among all application writes and deletes to it (`../shared/convergence_model.py` decides the
same for 2-4 regions). A delete's version is read back from the region's DynamoDB stream (when
the delete happened there).

    CONVERGENCE_SEEDS=300 CONVERGENCE_SEEDS_3=100 .venv/bin/pytest tests/test_convergence_random.py  # long run
    CONVERGENCE_SEED_START=1234 CONVERGENCE_SEEDS=1 CONVERGENCE_SEEDS_3=0 ...             # one seed again
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from replicatord.config import Conflict
from replicatord.conflict import PUT, Version, being_deleted, delete_version, version_of
from replicatord.local import emulators
from replicatord.local.aws_behaviour import Control
from replicatord.local.compare import diff_items
from replicatord.local.world import (
    DaemonProcess,
    Drained,
    client,
    provision_local,
    regions_for,
    stream_of,
    table_of,
    topology_document,
    wait_for,
    write_topology,
)
from replicatord.records import creation_seconds
from tests.conftest import quick_tuning

pytestmark = pytest.mark.e2e

START = int(os.environ.get("CONVERGENCE_SEED_START", "0"))
# CI's share; scripts/convergence.sh runs the long run.
SEEDS = {2: int(os.environ.get("CONVERGENCE_SEEDS", "6")), 3: int(os.environ.get("CONVERGENCE_SEEDS_3", "4"))}
KEYS = 20
OPS_PER_REGION = 40
# outbox_after_s: a peer whose Kinesis refuses puts for a second is diverted (the outbox in the path).
TUNING = quick_tuning(failover_s=3, lease_take_interval_s=0.3, poll_interval_ms=100, shard_refresh_s=10,
                      outbox_after_s=1)
CONFLICT = Conflict()


class StreamLog:
    """Every record of a region's DynamoDB stream so far, read forward across seeds."""

    def __init__(self, region: str, endpoint: str) -> None:
        self.ddb = client("dynamodb", region, endpoint)
        self.streams = client("dynamodbstreams", region, endpoint)
        self.region = region
        self.records: list[dict[str, Any]] = []
        self.after: str | None = None

    def read(self) -> list[dict[str, Any]]:
        arn = self.ddb.describe_table(TableName=table_of(self.region))["Table"]["LatestStreamArn"]
        (shard,) = self.streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
        kwargs: dict[str, Any] = {"StreamArn": arn, "ShardId": shard["ShardId"]}
        if self.after:
            kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber=self.after)
        else:
            kwargs.update(ShardIteratorType="TRIM_HORIZON")
        iterator = self.streams.get_shard_iterator(**kwargs)["ShardIterator"]
        while True:
            page = self.streams.get_records(ShardIterator=iterator, Limit=1000)
            if not page["Records"]:
                return self.records
            self.records.extend(page["Records"])
            self.after = page["Records"][-1]["dynamodb"]["SequenceNumber"]
            iterator = page["NextShardIterator"]


@dataclass
class World:
    regions: tuple[str, ...]
    workdir: Path
    endpoints: dict[str, str]
    config: Path
    daemons: dict[str, DaemonProcess] = field(default_factory=dict)
    logs: dict[str, StreamLog] = field(default_factory=dict)
    restarts: int = 0
    drain: Drained | None = None

    def drained(self) -> bool:
        """Every shard checkpointed at its stream's last record, twice in a row (across seeds)."""
        if self.drain is None:
            self.drain = Drained(lambda service, region: client(service, region, self.endpoints[region]),
                                 {r: [(table_of(r), stream_of(r))] for r in self.regions})
        return self.drain()

    def ddb(self, region: str) -> Any:
        return client("dynamodb", region, self.endpoints[region])

    def start(self, region: str) -> DaemonProcess:
        self.restarts += 1
        daemon = DaemonProcess(self.config, region, self.workdir, f"{region}-{self.restarts}").start()
        self.daemons[region] = daemon
        return daemon


def running_world(count: int, workdir: Path) -> Iterator[World]:
    os.environ.update(emulators.LOCAL_CREDENTIALS)
    regions = regions_for(count)
    ports = {r: emulators.free_port() for r in regions}
    # behaviour={}: the AWS-behaviour layer at AWS's own figures (no injected faults), so a test can
    # make one region's Kinesis refuse puts.
    with emulators.running(ports, workdir, behaviour={}) as emus:
        endpoints = {r: e.endpoint_url for r, e in emus.items()}
        config = write_topology(workdir / "topology.yaml",
                                topology_document(endpoints, kinesis_shards=2, tuning=TUNING))
        provision_local(config, report=lambda _line: None)
        w = World(regions, workdir, endpoints, config)
        w.logs = {r: StreamLog(r, endpoints[r]) for r in regions}
        for region in regions:
            w.start(region).wait_ready()
        try:
            yield w
        finally:
            for daemon in w.daemons.values():
                daemon.terminate(timeout_s=15)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from running_world(2, tmp_path_factory.mktemp("convergence"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Three regions, two in one partition (each reaches the other with its own role)."""
    yield from running_world(3, tmp_path_factory.mktemp("convergence-3"))


@dataclass
class Workload:
    """One region's application: puts, updates and deletes of the seed's keys."""

    region: str
    ops: list[tuple[str, str, Decimal | None]]  # (action, key, timestamp)


def plan_workloads(seed: int, keys: list[str], regions: tuple[str, ...]) -> list[Workload]:
    rnd = random.Random(seed)
    now = Decimal(int(time.time()))
    workloads = []
    for region in regions:
        skew = rnd.choice([-2, -1, 0, 0, 1, 2])  # this region's clock against the others'
        used: set[tuple[str, Decimal]] = set()
        ops: list[tuple[str, str, Decimal | None]] = []
        for i in range(OPS_PER_REGION):
            key = rnd.choice(keys)
            action = rnd.choices(["put", "update", "delete"], [55, 20, 25])[0]
            if action == "delete":
                ops.append(("delete", key, None))
                continue
            # Whole seconds, so the two regions often stamp exactly the same time; sometimes
            # stale (an application stamping an old clock); never the same (key, time) twice in a
            # region: that pair names one change (docs/design.md §4).
            ts = now + i // 8 + skew + rnd.choice([0, 0, 0, 1, -1, -4])
            while (key, ts) in used:
                ts += 1
            used.add((key, ts))
            ops.append((action, key, ts))
        workloads.append(Workload(region, ops))
    return workloads


def run_workload(world: World, workload: Workload, seed: int, pace: random.Random) -> list[tuple[str, Version]]:
    ddb = world.ddb(workload.region)
    table = table_of(workload.region)
    writes = []
    for n, (action, key, ts) in enumerate(workload.ops):
        item_key = {"PK": {"S": key}}
        if action == "delete":
            ddb.delete_item(TableName=table, Key=item_key)
        elif action == "put":
            assert ts is not None
            ddb.put_item(TableName=table, Item={
                **item_key, "last_update_timestamp": {"N": str(ts)}, "last_updater_region": {"S": workload.region},
                "value": {"S": f"{workload.region}/{seed}/{n}"}, "n": {"N": str(n)},
            })
            writes.append((key, Version(ts, PUT, workload.region)))
        else:
            assert ts is not None
            ddb.update_item(
                TableName=table, Key=item_key,
                UpdateExpression="SET last_update_timestamp = :ts, last_updater_region = :rg, updated = :u",
                ExpressionAttributeValues={":ts": {"N": str(ts)}, ":rg": {"S": workload.region},
                                           ":u": {"S": f"{workload.region}/{seed}/{n}"}},
            )
            writes.append((key, Version(ts, PUT, workload.region)))
        time.sleep(pace.uniform(0, 0.02))  # pacing of the application, not synchronisation
    return writes


def inject_duplicates(world: World, seed: int, prefix: str, rnd: random.Random) -> int:
    """Put again a random sample of the seed's replication records, shuffled, with random
    partition keys (so they land on other shards, out of order): what an at-least-once
    transport may do."""
    injected = 0
    for region in world.regions:
        kinesis = client("kinesis", region, world.endpoints[region])
        records = []
        for shard in kinesis.list_shards(StreamName=stream_of(region))["Shards"]:
            iterator = kinesis.get_shard_iterator(StreamName=stream_of(region), ShardId=shard["ShardId"],
                                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            while iterator:
                page = kinesis.get_records(ShardIterator=iterator, Limit=10000)
                records += [r["Data"] for r in page["Records"] if f'"{prefix}'.encode() in r["Data"]]
                if not page["Records"]:
                    break
                iterator = page["NextShardIterator"]
        sample = rnd.sample(records, k=len(records) // 3)
        rnd.shuffle(sample)
        for start in range(0, len(sample), 100):
            batch = sample[start:start + 100]
            kinesis.put_records(StreamName=stream_of(region), Records=[
                {"Data": data, "PartitionKey": str(rnd.random())} for data in batch
            ])
        injected += len(sample)
    return injected


def app_deletes(world: World, prefix: str) -> list[tuple[str, Version]]:
    """Application deletes of the seed's keys, with their versions, from every region's stream."""
    deletes = []
    for region, log in world.logs.items():
        for record in log.read():
            ddb = record["dynamodb"]
            key = ddb["Keys"]["PK"]["S"]
            if record["eventName"] != "REMOVE" or not key.startswith(prefix):
                continue
            old = ddb.get("OldImage")
            if being_deleted(old, CONFLICT):
                continue  # removed by replicatord: a replicated delete or a repair
            approx = creation_seconds(ddb["ApproximateCreationDateTime"])
            deletes.append((key, delete_version(old, approx, region, CONFLICT)))
    return deletes


@pytest.mark.parametrize("seed", range(START, START + SEEDS[2]), ids=lambda s: f"seed-{s}")
def test_random_interleavings_converge_to_the_last_writer(world: World, seed: int) -> None:
    converges(world, seed)


@pytest.mark.parametrize("seed", range(START, START + SEEDS[3]), ids=lambda s: f"seed-{s}")
def test_three_regions_converge_to_the_last_writer(mesh: World, seed: int) -> None:
    converges(mesh, seed)


def refuse_puts(world: World, region: str, seconds: float) -> None:
    with Control(world.endpoints[region]).changed(kinesis_put_throttle_rate=1.0):
        time.sleep(seconds)  # the length of the outage under test


def converges(world: World, seed: int) -> None:
    rnd = random.Random(seed)
    prefix = f"s{seed}-"
    keys = [f"{prefix}{i:02d}" for i in range(KEYS)]
    workloads = plan_workloads(seed, keys, world.regions)
    writes: list[tuple[str, Version]] = []
    lock = threading.Lock()

    def run(workload: Workload, pace_seed: int) -> None:
        done = run_workload(world, workload, seed, random.Random(pace_seed))
        with lock:
            writes.extend(done)

    threads = [threading.Thread(target=run, args=(w, seed * 7 + i)) for i, w in enumerate(workloads)]
    for t in threads:
        t.start()
    # A region whose Kinesis throttles every put for a while: its peers divert their records for it
    # to their outboxes and ship them later, so one item's versions may arrive out of order
    # (drawn apart from `rnd`, which keeps each seed's other choices as they were).
    faults = random.Random(seed ^ 0x5EED)
    refusing = faults.choice([None, *world.regions])
    outage = threading.Thread(target=refuse_puts, args=(world, refusing, faults.uniform(1.0, 3.0))) if refusing \
        else None
    if outage is not None:
        outage.start()
    restart = rnd.choice([None, None, "kill", "term"])
    if restart:
        region = rnd.choice(world.regions)
        victim = world.daemons[region]
        if restart == "kill":
            victim.kill()
        else:
            assert victim.terminate() == 0
        world.start(region)
    for t in threads:
        t.join(timeout=120)
    if outage is not None:
        outage.join(timeout=30)
    inject_duplicates(world, seed, prefix, rnd)
    for daemon in world.daemons.values():
        daemon.wait_ready(60)
    wait_for(world.drained, 120, f"seed {seed}: the pipelines to drain", interval_s=1.0)

    best: dict[str, Version] = {}
    for key, version in writes + app_deletes(world, prefix):
        if key not in best or best[key] < version:
            best[key] = version
    tables = {}
    for region in world.regions:
        items = {}
        for item in world.ddb(region).scan(TableName=table_of(region), ConsistentRead=True,
                                           FilterExpression="begins_with(PK, :p)",
                                           ExpressionAttributeValues={":p": {"S": prefix}})["Items"]:
            items[item["PK"]["S"]] = item
        tables[region] = (["PK"], items)
    diff = diff_items(tables)
    assert diff.identical, f"seed {seed} (restart: {restart}): " + "\n".join(diff.describe())
    held = {key: version_of(item, CONFLICT) for key, item in tables[world.regions[0]][1].items()}
    expected = {key: version for key, version in best.items() if version.op == PUT}
    assert held == expected, f"seed {seed} (restart: {restart}): tables hold {held}, last writers {best}"
