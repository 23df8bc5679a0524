"""Shard lineage, end of shard, iterator expiry, throttling and trimmed checkpoints.

The emulator does none of these faithfully (docs/design.md §7), so the Kinesis client is replaced at
the client seam by a small fake stream; the lease table is a real emulator process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import pytest
import yaml
from botocore.exceptions import ClientError

from replicatord import consumer, reader
from replicatord.aws import Aws
from replicatord.config import Settings, parse_topology, resolve_settings
from replicatord.lease_table import HeldLease, LeaseTable, item_key
from replicatord.leases import FINISHED, lease_key
from replicatord.local.world import REGIONS, topology_document
from replicatord.metrics import Metrics
from replicatord.pipeline import Pipeline, Shared
from replicatord.renewal import RenewalBatcher
from replicatord.sources import KinesisSource
from tests.conftest import LocalRegions, quick_tuning, until

pytestmark = pytest.mark.integration

SG = REGIONS[1]
TUNING = quick_tuning(poll_interval_ms=20, lease_take_interval_s=0.1, shard_refresh_s=0.2, backoff_base_ms=10,
                      backoff_max_ms=50)


def _error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "GetRecords")


class FakeKinesis:
    """Shards with fixed records; closed shards end with a null NextShardIterator."""

    def __init__(self, shards: dict[str, dict[str, Any]]) -> None:
        self.shards = shards  # id -> {"parents": [...], "records": [seq, ...], "closed": bool}
        # [operation, shard, error code, calls to let through first]: each raised once
        self.faults: list[list[Any]] = []
        self.iterators_from: list[tuple[str, str]] = []  # (shard, "TRIM_HORIZON" or "after N")
        self.reads = 0
        self.stuck_reads = 0
        self.timestamps: list[float] = []
        self.arrived: dict[int, float] = {}  # sequence number -> arrival time (default 0)
        self.read_at: list[float] = []

    def _fault(self, operation: str, shard: str) -> None:
        for fault in self.faults:
            if fault[:2] == [operation, shard]:
                if fault[3]:
                    fault[3] -= 1
                    return
                self.faults.remove(fault)
                raise _error(fault[2])

    async def list_shards(self, **_: Any) -> dict[str, Any]:
        out = []
        for shard_id, shard in self.shards.items():
            entry: dict[str, Any] = {"ShardId": shard_id}
            parents = shard.get("parents", [])
            if parents:
                entry["ParentShardId"] = parents[0]
            if len(parents) > 1:
                entry["AdjacentParentShardId"] = parents[1]
            out.append(entry)
        return {"Shards": out}

    async def get_shard_iterator(self, *, ShardId: str, ShardIteratorType: str, **kw: Any) -> dict[str, Any]:  # noqa: N803
        after = kw.get("StartingSequenceNumber")
        self.iterators_from.append((ShardId, f"after {after}" if after else ShardIteratorType))
        if ShardIteratorType == "AT_TIMESTAMP":
            self.timestamps.append(kw["Timestamp"])
        trimmed_through = self.shards[ShardId].get("trimmed_through")
        if after is not None and trimmed_through is not None and int(after) <= trimmed_through:
            # What Kinesis consumers report for a checkpoint past the retention: an iterator that
            # answers empty pages at the retention for ever, or (less often) a refusal.
            if self.shards[ShardId].get("trimmed_answer") == "refused":
                raise ClientError({"Error": {"Code": "InvalidArgumentException", "Message":
                                             f"StartingSequenceNumber {after} is no longer available"}},
                                  "GetShardIterator")
            return {"ShardIterator": f"{ShardId}|stuck"}
        # As AWS: an iterator after a trimmed sequence number reads on from the oldest record left.
        position = 0
        if after is not None:
            position = sum(1 for seq in self.shards[ShardId]["records"] if seq <= int(after))
        return {"ShardIterator": f"{ShardId}|{position}"}

    async def get_records(self, *, ShardIterator: str, Limit: int) -> dict[str, Any]:  # noqa: N803
        shard_id, position_text = ShardIterator.split("|")
        self.reads += 1
        self.read_at.append(time.monotonic())
        self._fault("get_records", shard_id)
        shard = self.shards[shard_id]
        if position_text == "stuck":
            self.stuck_reads += 1
            return {"Records": [], "NextShardIterator": ShardIterator, "MillisBehindLatest": 86_400_000}
        if shard.get("empty_probes") and Limit == 1:
            shard["empty_probes"] -= 1  # an empty first page, which Kinesis allows
            return {"Records": [], "NextShardIterator": ShardIterator, "MillisBehindLatest": 86_400_000}
        position = int(position_text)
        chunk = shard["records"][position:position + min(Limit, 3)]
        end = position + len(chunk)
        records = [{"SequenceNumber": str(seq), "Data": b"x", "ApproximateArrivalTimestamp": self.arrived.get(seq, 0)}
                   for seq in chunk]
        closed_and_done = shard.get("closed") and end >= len(shard["records"])
        return {"Records": records, "NextShardIterator": None if closed_and_done else f"{shard_id}|{end}",
                "MillisBehindLatest": 0}


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        self.seen.extend((shard_id, int(r["SequenceNumber"])) for r in records)


R = TypeVar("R", bound=Recorder)
LeaseEnv = tuple[Aws, Settings, Metrics]  # the lease_env fixture


@contextlib.asynccontextmanager
async def _running(pipeline: Pipeline) -> AsyncIterator[None]:
    """The pipeline and the renewal batcher it shares, as the daemon runs them; stopped after."""
    stop = pipeline.shared.stop
    tasks = [asyncio.create_task(pipeline.run()), asyncio.create_task(pipeline.shared.renewals.run(stop))]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def _run_until(pipeline: Pipeline, condition: Callable[[], Any], deadline_s: float = 30) -> None:
    async with _running(pipeline):
        await until(condition, deadline_s, "the pipeline's progress")


@pytest.fixture
async def lease_env(regions: LocalRegions) -> AsyncIterator[LeaseEnv]:
    regions.provision()
    topology = parse_topology(yaml.safe_dump(topology_document(regions.endpoints, tuning=TUNING)))
    settings = resolve_settings(topology, SG, "fake-1")
    metrics = Metrics()
    async with Aws(settings, metrics) as aws:
        yield aws, settings, metrics


def _pipeline(aws: Aws, settings: Settings, metrics: Metrics, fake: FakeKinesis, stop: asyncio.Event,
              processor: R | None = None, initial_position: str | None = None,
              **tuning: Any) -> tuple[Pipeline, R, LeaseTable]:
    """An applier pipeline over the fake stream; `tuning` overrides the module's TUNING."""
    aws.local["kinesis"] = fake  # the client seam
    leases = LeaseTable(aws, settings.me.lease_table)
    recorder = processor if processor is not None else cast(R, Recorder())
    shared = Shared(leases, RenewalBatcher(leases), settings.instance_id, settings.region,
                    settings.topology.tuning.model_copy(update=tuning), metrics, stop)
    source = KinesisSource(aws, "ddb_replication_stream_sg", "1")
    return Pipeline("user", source, recorder, shared, initial_position=initial_position), recorder, leases


async def test_children_start_after_their_parents_end_through_split_and_merge(lease_env: LeaseEnv) -> None:
    aws, settings, metrics = lease_env
    fake = FakeKinesis({
        "p": {"records": [1, 2, 3, 4, 5, 6, 7], "closed": True},
        "c1": {"parents": ["p"], "records": [10, 11, 12, 13], "closed": True},
        "c2": {"parents": ["p"], "records": [20, 21]},
        "m": {"parents": ["c1", "c2"], "records": [30, 31]},  # c2 never ends: the merge child waits
    })
    fake.faults += [["get_records", "p", "ProvisionedThroughputExceededException", 0],
                    ["get_records", "c1", "ExpiredIteratorException", 1]]  # after its first page
    stop = asyncio.Event()
    pipeline, recorder, leases = _pipeline(aws, settings, metrics, fake, stop)
    expected = {("p", s) for s in range(1, 8)} | {("c1", s) for s in range(10, 14)} | {("c2", 20), ("c2", 21)}
    await _run_until(pipeline, lambda: expected <= set(recorder.seen))

    order = recorder.seen
    last_parent = max(i for i, (shard, _) in enumerate(order) if shard == "p")
    first_child = min(i for i, (shard, _) in enumerate(order) if shard != "p")
    assert last_parent < first_child, order
    assert not any(shard == "m" for shard, _ in order), "a merge child was read before both parents ended"
    for shard in ("p", "c1"):  # each record exactly once: expiry resumed from the checkpoint, not the start
        seqs = [s for sh, s in order if sh == shard]
        assert seqs == sorted(set(seqs)), seqs
    # After the expiry: a look at the oldest record (is the checkpoint trimmed?), then on from it.
    assert fake.iterators_from.count(("c1", "TRIM_HORIZON")) == 2
    assert ("c1", "after 12") in fake.iterators_from, fake.iterators_from  # pages of 3: 10, 11, 12
    partition = pipeline.shards.partition
    state = {lease.key.rsplit("/", 1)[1]: lease for lease in await leases.query(partition, consistent=True)}
    assert state["p"].state == FINISHED and state["p"].checkpoint == "7"
    assert state["c1"].state == FINISHED and state["c1"].checkpoint == "13"
    assert state["m"].parents == tuple(lease_key("applier", pipeline.source.incarnation, s) for s in ("c1", "c2"))
    assert state["m"].checkpoint is None and state["m"].owner is None
    assert metrics.registry.get_sample_value(
        "replicatord_errors_total", {"pipeline": "applier", "type": "throttled"}) == 1
    assert metrics.registry.get_sample_value(
        "replicatord_errors_total", {"pipeline": "applier", "type": "expired_iterator"}) == 1


async def test_a_finished_shard_that_left_the_stream_loses_its_lease(lease_env: LeaseEnv) -> None:
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"old": {"records": [1], "closed": True}, "new": {"parents": ["old"], "records": [5]}})
    stop = asyncio.Event()
    pipeline, recorder, leases = _pipeline(aws, settings, metrics, fake, stop)
    await _run_until(pipeline, lambda: ("new", 5) in recorder.seen)
    del fake.shards["old"]  # trimmed after the stream's retention
    stop2 = asyncio.Event()
    pipeline2, _, _ = _pipeline(aws, settings, metrics, fake, stop2)

    partition = pipeline.shards.partition

    async def gone() -> bool:
        return all(not lease.key.endswith("/old") for lease in await leases.query(partition, consistent=True))

    async with _running(pipeline2):
        await until(gone, 20, "the departed shard's lease to be deleted")


async def test_a_trimmed_checkpoint_is_reported_and_reading_restarts_at_the_oldest(lease_env: LeaseEnv) -> None:
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": [1, 2, 3]}})
    stop = asyncio.Event()
    pipeline, recorder, leases = _pipeline(aws, settings, metrics, fake, stop)
    await _run_until(pipeline, lambda: ("s", 3) in recorder.seen)
    # Retention passes while the daemon is down: records 1-50 are gone, 51-52 remain.
    fake.shards["s"]["records"] = [51, 52]

    stop2 = asyncio.Event()
    pipeline2, recorder2, _ = _pipeline(aws, settings, metrics, fake, stop2)
    await _run_until(pipeline2, lambda: ("s", 52) in recorder2.seen)
    assert recorder2.seen == [("s", 51), ("s", 52)]
    assert metrics.registry.get_sample_value(
        "replicatord_checkpoint_trimmed_total", {"pair": "user", "pipeline": "applier"}) == 1


@pytest.mark.parametrize("answer", ["empty_pages", "refused"])
async def test_a_trimmed_checkpoint_that_kinesis_does_not_read_on_from_is_read_again_from_the_oldest(
        lease_env: Any, answer: str) -> None:
    """The checkpoint left the retention, and the one-record look at the oldest record finds
    nothing (an empty first page): the iterator after the checkpoint then answers empty pages at
    the retention for ever (or is refused). The worker reads the shard again from its oldest
    record and reports the loss, without a restart."""
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": [1, 2, 3]}})
    stop = asyncio.Event()
    pipeline, recorder, _ = _pipeline(aws, settings, metrics, fake, stop)
    await _run_until(pipeline, lambda: ("s", 3) in recorder.seen)
    fake.shards["s"].update(records=[51, 52], trimmed_through=50, empty_probes=1, trimmed_answer=answer)

    stop2 = asyncio.Event()
    pipeline2, recorder2, _ = _pipeline(aws, settings, metrics, fake, stop2)
    await _run_until(pipeline2, lambda: ("s", 52) in recorder2.seen)
    assert recorder2.seen == [("s", 51), ("s", 52)]
    assert fake.stuck_reads == (2 if answer == "empty_pages" else 0), fake.stuck_reads
    assert metrics.registry.get_sample_value(
        "replicatord_checkpoint_trimmed_total", {"pair": "user", "pipeline": "applier"}) == 1


async def test_a_first_start_at_latest_positions_kinesis_shards_by_time(lease_env: LeaseEnv) -> None:
    """`initial_position: latest` on Kinesis: AT_TIMESTAMP at the second of the start, not a read
    of the whole retention to skip it; what arrived before is still skipped if the iterator
    gives it (botocore sends whole seconds)."""
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": [1, 2, 3]}})
    stop = asyncio.Event()
    pipeline, recorder, _ = _pipeline(aws, settings, metrics, fake, stop, initial_position="latest")
    started = time.time()
    fake.shards["s"]["records"].append(4)
    fake.arrived[4] = started + 60  # written after the start
    await _run_until(pipeline, lambda: ("s", 4) in recorder.seen)
    assert recorder.seen == [("s", 4)]
    assert ("s", "AT_TIMESTAMP") in fake.iterators_from and ("s", "TRIM_HORIZON") not in fake.iterators_from
    assert len(fake.timestamps) == 1 and started - 1 <= fake.timestamps[0] <= started + 1


class Flaky(Recorder):
    """A processor with a bug that shows once per shard: the pipeline must survive it."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        if shard_id not in self.failed:
            self.failed.add(shard_id)
            raise RuntimeError("a bug that is not an AWS error")
        await super().process(shard_id, records)


async def test_a_malformed_lease_item_and_a_processor_bug_do_not_stop_the_pipeline(lease_env: LeaseEnv) -> None:
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": [1, 2, 3]}})
    stop = asyncio.Event()
    pipeline, flaky, leases = _pipeline(aws, settings, metrics, fake, stop, Flaky())
    await aws.call("dynamodb", "put_item", TableName=settings.me.lease_table, Item={
        **item_key(lease_key("applier", pipeline.source.incarnation, "hand-edited")),
        "counter": {"S": "not a number"}})
    await _run_until(pipeline, lambda: ("s", 3) in flaky.seen)
    assert flaky.seen == [("s", 1), ("s", 2), ("s", 3)]  # the page ran again after the bug, once
    assert metrics.registry.get_sample_value(
        "replicatord_errors_total", {"pipeline": "applier", "type": "internal_error"}) == 1


async def test_a_renewal_that_hangs_stops_its_shard_before_others_may_take_it(lease_env: LeaseEnv) -> None:
    """Renewals run at once, each under a deadline: one hanging renewal neither delays the others
    past their failover nor lets its own shard run on after others could count it expired."""
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"fast": {"records": [1]}, "slow": {"records": [1]}})
    stop = asyncio.Event()
    pipeline, recorder, leases = _pipeline(aws, settings, metrics, fake, stop)
    batcher = pipeline.shared.renewals
    renew = batcher.renew
    renewed: dict[str, list[float]] = {"fast": [], "slow": []}
    hang = asyncio.Event()

    async def renew_or_hang(held: Any) -> None:
        shard = held.lease.key.rsplit("/", 1)[1]
        if shard == "slow" and hang.is_set():
            await asyncio.sleep(3600)  # a call that never answers
        await renew(held)
        renewed[shard].append(held.renewed_at)

    batcher.renew = renew_or_hang  # type: ignore[method-assign]

    def lost() -> float:
        return metrics.registry.get_sample_value("replicatord_leases_lost_total", {"pipeline": "applier"}) or 0

    async with _running(pipeline):
        await until(lambda: renewed["fast"] and renewed["slow"], 30, "both leases to be renewed")
        hang.set()
        last_slow = renewed["slow"][-1]
        await until(lost, 30, "the lease whose renewal hangs to be stopped", interval_s=0.01)
        stopped_after = time.monotonic() - last_slow
        fast_before = len(renewed["fast"])
        await until(lambda: len(renewed["fast"]) >= fast_before + 2, 10, "the other lease to be renewed on")
    tuning = settings.topology.tuning
    assert stopped_after < tuning.failover_s, stopped_after  # before another instance may take it
    assert recorder.seen  # both shards were read before


async def test_renewals_at_one_moment_share_one_transaction(lease_env: LeaseEnv) -> None:
    """Every pipeline of an instance renews on the same ticks: one TransactWriteItems renews all
    its leases. A lease another instance took fails alone (LeaseLost); the rest are renewed."""
    aws, settings, _ = lease_env
    leases = LeaseTable(aws, settings.me.lease_table)
    keys = [lease_key(pipeline, "s@1", "shard-1") for pipeline in ("forwarder", "applier", "other")]
    held = []
    for key in keys:
        assert await leases.create(key, ())
        lease = await leases.get(key)
        assert lease is not None
        held.append(HeldLease(await leases.take(lease, "me")))
    calls: list[str] = []
    real_call = aws.call

    async def counting(service: str, operation: str, **kwargs: Any) -> Any:
        calls.append(operation)
        return await real_call(service, operation, **kwargs)

    aws.call = counting  # type: ignore[method-assign]
    stop = asyncio.Event()
    batcher = RenewalBatcher(leases)
    sending = asyncio.create_task(batcher.run(stop))
    await asyncio.gather(*(batcher.renew(h) for h in held))
    assert calls == ["transact_write_items"]
    assert [(await leases.get(k)).counter for k in keys] == [2, 2, 2]  # type: ignore[union-attr]

    taken = await leases.get(keys[1])
    assert taken is not None
    await leases.take(taken, "another-instance")
    calls.clear()
    results = await asyncio.gather(*(batcher.renew(h) for h in held), return_exceptions=True)
    stop.set()
    await asyncio.wait_for(sending, 5)
    assert [type(r).__name__ for r in results] == ["NoneType", "LeaseLost", "NoneType"]
    assert calls[0] == "transact_write_items" and calls.count("transact_write_items") == 1
    now = {k: await leases.get(k) for k in keys}
    assert [(now[k].owner, now[k].counter) for k in keys] == [  # type: ignore[union-attr]
        ("me", 3), ("another-instance", 3), ("me", 3)]
    assert [h.lease.counter for h in held] == [3, 2, 3]


class Overlapped(Recorder):
    """Notes, for each page, whether the shard's next read was issued while the page was processed."""

    def __init__(self, fake: FakeKinesis) -> None:
        super().__init__()
        self.fake = fake
        self.overlapped: list[bool] = []

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        reads = self.fake.reads
        try:
            async with asyncio.timeout(1):
                while self.fake.reads == reads:  # noqa: ASYNC110 - waits on the worker's other task
                    await asyncio.sleep(0.005)
        except TimeoutError:
            pass
        self.overlapped.append(self.fake.reads > reads)
        await super().process(shard_id, records)


async def test_next_page_is_read_while_a_page_is_delivered_and_checkpoints_are_spaced(lease_env: LeaseEnv) -> None:
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": list(range(1, 61))}})  # 20 pages of 3, then nothing new
    stop = asyncio.Event()
    pipeline, recorder, leases = _pipeline(aws, settings, metrics, fake, stop, Overlapped(fake),
                                           min_read_interval_ms=0, checkpoint_interval_ms=60_000)
    checkpoints: list[str] = []
    real_call = aws.call

    async def counting(service: str, operation: str, **kwargs: Any) -> Any:
        if operation == "update_item" and "checkpoint" in kwargs.get("UpdateExpression", ""):
            checkpoints.append(kwargs["ExpressionAttributeValues"][":seq"]["S"])
        return await real_call(service, operation, **kwargs)

    aws.call = counting  # type: ignore[method-assign]
    await _run_until(pipeline, lambda: len(recorder.seen) == 60 and checkpoints[-1:] == ["60"])

    assert [seq for _, seq in recorder.seen] == list(range(1, 61))  # in order, each once
    assert all(recorder.overlapped), recorder.overlapped  # every page: the next read was under way
    # One checkpoint when the shard was caught up, not one per page.
    assert checkpoints == ["60"]
    state = await leases.query(pipeline.shards.partition, consistent=True)
    assert [lease.checkpoint for lease in state] == ["60"]


async def test_a_shard_that_stays_empty_is_read_less_often(lease_env: LeaseEnv,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """poll_interval_ms after an empty page; idle_poll_interval_ms once nothing came for IDLE_AFTER_S."""
    monkeypatch.setattr(reader, "IDLE_AFTER_S", 0.5)
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": []}})
    stop = asyncio.Event()
    pipeline, _, _ = _pipeline(aws, settings, metrics, fake, stop, min_read_interval_ms=0, poll_interval_ms=20,
                               idle_poll_interval_ms=400)
    await _run_until(pipeline, lambda: any(at - fake.read_at[0] > 2.5 for at in fake.read_at[1:]))

    first = fake.read_at[0]
    gaps = [(at - first, at - before) for before, at in zip(fake.read_at, fake.read_at[1:], strict=False)]
    assert min(gap for _, gap in gaps) < 0.4  # it polled at the short interval first
    assert all(gap >= 0.4 for since, gap in gaps if since > 0.5 + 0.4 + 0.3)  # then at the idle interval


async def test_an_instance_that_holds_every_lease_reads_the_table_only_at_shard_sync(lease_env: LeaseEnv) -> None:
    """Alone on a stream, a lease cycle has nothing to take: the lease table is read once per
    shard sync (the read serves the cycle too) instead of every lease_take_interval_s."""
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"a": {"records": [1]}, "b": {"records": [2]}})
    stop = asyncio.Event()
    pipeline, recorder, _ = _pipeline(aws, settings, metrics, fake, stop, lease_take_interval_s=0.1, shard_refresh_s=2)
    queries: list[float] = []
    real_call = aws.call

    async def counting(service: str, operation: str, **kwargs: Any) -> Any:
        if operation == "query":
            queries.append(time.monotonic())
        return await real_call(service, operation, **kwargs)

    aws.call = counting  # type: ignore[method-assign]
    started = time.monotonic()
    await _run_until(pipeline, lambda: time.monotonic() - started > 5)

    assert {shard for shard, _ in recorder.seen} == {"a", "b"}
    assert pipeline.held_count == 2
    # Cycles every 0.1 s would have read it about 50 times; shard syncs every 2 s: 3, plus the
    # cycles that took the two leases.
    assert len(queries) <= 6, [round(at - started, 2) for at in queries]


class Keyed(Recorder):
    """Pages of records 1-30 change distinct items; 31-60 all change one item. Each page takes
    a while; notes which pages were processed at once and what was done when."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[frozenset[str]] = []
        self.most_at_once = 0
        self.done: set[int] = set()
        self.same_item_at_once = 0

    def page_keys(self, records: list[dict[str, Any]]) -> frozenset[str]:
        return frozenset(f"k{seq}" if seq <= 30 else "hot" for seq in (int(r["SequenceNumber"]) for r in records))

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        keys = self.page_keys(records)
        self.same_item_at_once += any(not keys.isdisjoint(other) for other in self.active)
        self.active.append(keys)
        self.most_at_once = max(self.most_at_once, len(self.active))
        first = int(records[0]["SequenceNumber"])
        await asyncio.sleep(0.1 if (first // 3) % 2 == 0 else 0.02)  # a page may finish before the one before it
        self.active.remove(keys)
        await super().process(shard_id, records)
        self.done.update(int(r["SequenceNumber"]) for r in records)


async def test_pages_of_distinct_items_are_delivered_side_by_side_and_positions_stay_in_order(
        lease_env: Any) -> None:
    """A processor that says which items a page holds (the forwarder) gets the next page while
    the last is still being delivered, when they share no item; never two pages of one item at
    once, and no checkpoint passes a page that is not done."""
    aws, settings, metrics = lease_env
    fake = FakeKinesis({"s": {"records": list(range(1, 61))}})
    stop = asyncio.Event()
    pipeline, recorder, leases = _pipeline(aws, settings, metrics, fake, stop, Keyed(), min_read_interval_ms=0,
                                           checkpoint_interval_ms=0)
    checkpoints: list[str] = []
    early: list[int] = []  # checkpoints that passed a page not yet done
    real_call = aws.call

    async def checking(service: str, operation: str, **kwargs: Any) -> Any:
        if operation == "update_item" and "checkpoint" in kwargs.get("UpdateExpression", ""):
            at = int(kwargs["ExpressionAttributeValues"][":seq"]["S"])
            if not set(range(1, at + 1)) <= recorder.done:
                early.append(at)
            checkpoints.append(str(at))
        return await real_call(service, operation, **kwargs)

    aws.call = checking  # type: ignore[method-assign]
    await _run_until(pipeline, lambda: len(recorder.seen) == 60 and checkpoints[-1:] == ["60"])

    assert sorted(seq for _, seq in recorder.seen) == list(range(1, 61))  # each once
    assert [seq for _, seq in recorder.seen if seq > 30] == list(range(31, 61))  # one item: in order
    assert recorder.most_at_once == consumer.PAGES_IN_FLIGHT
    assert recorder.same_item_at_once == 0 and early == []
    state = await leases.query(pipeline.shards.partition, consistent=True)
    assert [lease.checkpoint for lease in state] == ["60"]
