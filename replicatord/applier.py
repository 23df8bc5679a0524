"""Applier: local Kinesis stream -> conditional writes to the local table (last writer wins).

Independent keys are applied concurrently; the records of one key are applied in order. Each
record stands alone (retry.py): one that cannot be decoded, or whose write DynamoDB refuses or
keeps failing, goes to the dead-letter queue with the reason while the rest of the page goes
on, and a retry repeats only the write that failed. Pages are decoded in a worker thread, so a
large record never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from replicatord.aio import poll, run_together
from replicatord.aws import Aws
from replicatord.config import Conflict, Tuning
from replicatord.conflict import (
    Item,
    WriteCondition,
    delete_condition,
    mark_condition,
    put_condition,
    stamp_condition,
    unmark_condition,
)
from replicatord.dlq import DeadLetterQueue
from replicatord.errors import ConditionFailed, Contended, InvalidRequest, ReplicatorError
from replicatord.metrics import Metrics
from replicatord.provenance import Provenance, refusal
from replicatord.records import (
    Probe,
    RecordError,
    ReplicationRecord,
    creation_seconds,
    decode_payload,
    partition_key,
    same_key_runs,
    shown,
)
from replicatord.retry import GAVE_UP, Arrival, RecordRetry
from replicatord.tombstones import Tombstones, TombstoneTable

log = logging.getLogger(__name__)

# DynamoDB's message (and the emulator's) for an item over 400 KB.
ITEM_TOO_LARGE = "maximum allowed size"

# replicated_count is written at most this often (one ADD for the pages in between).
STATS_INTERVAL_S = 2.0

# How often a replicated delete retries when the item changed between marking and deleting.
DELETE_ATTEMPTS = 3


@dataclass(frozen=True)
class Incoming:
    record: ReplicationRecord
    letter: Arrival


@dataclass(frozen=True)
class Refused:
    """A payload that is not a record (`bad_record`), or not one a peer could have sent
    (provenance.refusal's reasons): dead-lettered with the reason, never applied."""

    reason: str
    detail: str


Decoded = tuple[str, ReplicationRecord] | Probe | Refused


def decode_page(payloads: list[bytes], pair: str, rules: Provenance | None, now: float) -> list[Decoded]:
    """Each payload as (partition key, record), a preflight probe, or why it is refused."""
    out: list[Decoded] = []
    for data in payloads:
        try:
            record = decode_payload(data)
            if record.pair != pair:
                raise RecordError(f"record of pair {shown(record.pair)} on the stream of pair {pair!r}")
        except RecordError as exc:
            out.append(Refused("bad_record", str(exc)))
            continue
        if isinstance(record, Probe):
            out.append(record)
        elif rules is not None and (why := refusal(record, rules, now)) is not None:
            out.append(Refused(*why))
        else:
            out.append((partition_key(record.keys), record))
    return out


def payload_chunks(records: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """The page cut, in order, into runs of at most `limit` payload bytes (a larger record alone)."""
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for record in records:
        data = len(record.get("Data", b""))
        if chunks[-1] and size + data > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(record)
        size += data
    return [chunk for chunk in chunks if chunk]


class Applier:
    def __init__(
        self,
        aws: Aws,
        pair: str,
        table: str,
        stats_table: str,
        tombstones: TombstoneTable,
        conflict: Conflict,
        tuning: Tuning,
        dlq: DeadLetterQueue,
        metrics: Metrics,
        stop: asyncio.Event,
        provenance: Provenance | None = None,
    ) -> None:
        """`provenance`: what a peer could have sent (the daemon and the operator commands always
        give it; without it only the shape of records is checked)."""
        self.aws = aws
        self.pair = pair
        self.table = table
        self.provenance = provenance
        self.chunk_bytes = tuning.apply_chunk_bytes
        self.tombstones = tombstones
        self.stats_table = stats_table
        self.conflict = conflict
        self.metrics = metrics
        self.limit = asyncio.Semaphore(tuning.apply_concurrency)
        self.retry = RecordRetry(pair, "applier", dlq, tuning, metrics, stop)
        self.stop = stop
        self.unreported = 0  # changes applied but not yet added to replicated_count

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Apply a page: returns once every record is applied, stale or dead-lettered. It is
        decoded and applied `tuning.apply_chunk_bytes` of payload at a time, in order: decoded
        records take many times their payload's memory (a 10 MiB page of small attributes would
        take over 100 MB at once). What is refused goes to the queue in batches while the good
        records are applied."""
        for chunk in payload_chunks(records, self.chunk_bytes):
            await self._process_chunk(chunk)

    async def _process_chunk(self, records: list[dict[str, Any]]) -> None:
        payloads: list[bytes] = [r["Data"] for r in records]
        decoded = await asyncio.to_thread(decode_page, payloads, self.pair, self.provenance, time.time())
        junk: list[tuple[str, str, Arrival]] = []
        incoming: list[tuple[str, Incoming]] = []
        for kinesis_record, outcome in zip(records, decoded, strict=True):
            arrived = kinesis_record.get("ApproximateArrivalTimestamp")
            letter = Arrival(kinesis_record["Data"], float(creation_seconds(arrived)) if arrived else time.time())
            if isinstance(outcome, Refused):
                self.metrics.records_refused.labels(self.pair, outcome.reason).inc()
                self.metrics.errors.labels("applier", outcome.reason).inc()
                junk.append((outcome.reason, outcome.detail, letter))
            elif isinstance(outcome, Probe):
                self.metrics.probes.labels(self.pair).inc()
            else:
                key, record = outcome
                incoming.append((key, Incoming(record, letter)))
        counts = [0]
        await run_together([self.retry.dead_letter_many(junk), self._apply_page(incoming, counts)])
        await self._report(counts[0])

    async def _apply_page(self, incoming: list[tuple[str, Incoming]], counts: list[int]) -> None:
        if not incoming:
            return
        tombstones = await self.retry.step(
            functools.partial(self.tombstones.fetch, self.pair, [i.record.keys for _, i in incoming]),
            "tombstone read",
        )
        await run_together(self._apply_key(run, tombstones, counts) for run in same_key_runs(incoming).values())

    async def _apply_key(self, run: list[Incoming], tombstones: Tombstones, counts: list[int]) -> None:
        for incoming in run:
            record = incoming.record
            done = await self.retry.run(functools.partial(self._apply_limited, record, tombstones),
                                        incoming.letter, f"{record.op} of {shown(record.keys)}")
            if done is GAVE_UP:
                continue
            if done:
                counts[0] += 1
                self.metrics.records_applied.labels(self.pair, record.op).inc()
                self.metrics.latency.labels(self.pair).observe(
                    max(0.0, time.time() - record.created_s)
                )
            else:
                self.metrics.records_stale.labels(self.pair).inc()

    async def _apply_limited(self, record: ReplicationRecord, tombstones: Tombstones) -> bool:
        async with self.limit:  # held per attempt, not while a retry waits
            return await self.apply(record, tombstones)

    async def _report(self, applied: int) -> None:
        """Count what was applied for replicated_count (the sample's counter); `report` writes it."""
        self.unreported += applied

    async def report(self) -> None:
        """Add what was applied to replicated_count every STATS_INTERVAL_S (the pages between two
        writes go out in one ADD, and a failed write goes out again at the next), until stop."""
        async for _ in poll(STATS_INTERVAL_S, self.stop):
            await self.flush_stats()

    async def flush_stats(self) -> None:
        """Write what was applied since the last report. Best effort: a failure keeps the count
        for the next report and never makes a page run again."""
        count, self.unreported = self.unreported, 0
        if not count:
            return
        try:
            await self.aws.call(
                "dynamodb", "update_item", TableName=self.stats_table,
                Key={"PK": {"S": "replicated_count"}}, UpdateExpression="ADD cnt :n",
                ExpressionAttributeValues={":n": {"N": str(count)}},
            )
        except ReplicatorError as exc:
            self.unreported += count
            self.metrics.errors.labels("applier", f"stats_{exc.kind}").inc()
            log.warning("applier %s: cannot add %d to %s replicated_count (kept for the next report): %s",
                        self.pair, count, self.stats_table, exc)

    async def apply(self, record: ReplicationRecord, tombstones: Tombstones | None = None) -> bool:
        """Apply one change with the last-writer-wins rule; False if the local item (or the key's
        tombstone) is as new or newer. `tombstones` is the page's prefetch, else read here."""
        if tombstones is None:
            tombstones = await self.tombstones.fetch(self.pair, [record.keys])
        if record.op == "PUT":
            return await self._put(record, tombstones)
        return await self._delete(record, tombstones)

    async def _write(self, operation: str, condition: WriteCondition, **kwargs: Any) -> bool:
        """One conditional write to the local table; False if the condition did not hold."""
        try:
            await self.aws.call(
                "dynamodb", operation, TableName=self.table,
                ConditionExpression=condition.expression,
                ExpressionAttributeNames=condition.names,
                ExpressionAttributeValues=condition.values,
                **kwargs,
            )
        except ConditionFailed:
            return False
        return True

    async def _put(self, record: ReplicationRecord, tombstones: Tombstones) -> bool:
        """Write the image iff no live tombstone is at or above it and the local item is absent or
        older (conditional put). A tombstone recorded between the check and the put can let an old
        image in; the forwarder sees that write and repairs it (docs/design.md §4, resurrection)."""
        tombstone = tombstones.get(self.pair, record.keys)
        if tombstone is not None and record.version < tombstone:
            return False
        return await self._write("put_item", put_condition(record.keys, record.version, self.conflict),
                                 Item=record.image)

    async def stamp(self, keys: Item, timestamp: Decimal) -> bool:
        """Give an unversioned local item the version attributes (`missing_version: stamp`)."""
        condition = stamp_condition(keys, self.conflict)
        return await self._write(
            "update_item", WriteCondition(condition.expression, condition.names, {
                **condition.values, ":ts": {"N": str(timestamp)}, ":rg": {"S": self.aws.settings.region}}),
            Key=keys, UpdateExpression="SET #ts = :ts, #rg = :rg",
        )

    async def _delete(self, record: ReplicationRecord, tombstones: Tombstones) -> bool:
        """Record the tombstone, mark the item with the delete's version (so the forwarder knows this
        REMOVE), then delete it. The tombstone comes first: a crash after it only replays the rest."""
        await self.tombstones.record(self.pair, record.keys, record.version)
        tombstones.raise_to(self.pair, record.keys, record.version)
        mark = mark_condition(record.keys, record.version, self.conflict)
        remove = delete_condition(record.version, self.conflict)
        for _ in range(DELETE_ATTEMPTS):
            if not await self._mark(record.keys, mark):
                # Absent, or holds a newer version. A newer UpdateItem keeps the attributes it does
                # not name, so a marker of ours from an earlier attempt may still be on the item.
                await self._write("update_item", unmark_condition(record.version, self.conflict),
                                  Key=record.keys, UpdateExpression="REMOVE #m")
                return False
            if await self._write("delete_item", remove, Key=record.keys):
                return True
            # An application write replaced the item in between: decide again.
        raise Contended(f"item {shown(record.keys)} kept changing while it was being deleted")

    async def _mark(self, keys: Item, mark: WriteCondition) -> bool:
        """Put the delete marker on the item; False if the mark's condition did not hold.

        An item within a few bytes of DynamoDB's 400 KB limit has no room for the marker. It is on
        its way out, so then the marked item replaces it with only its key and version (a PutItem:
        the emulator refuses an UpdateItem whose SET overflows even when its REMOVE makes room).
        """
        try:
            return await self._write("update_item", mark, Key=keys, UpdateExpression="SET #m = :m")
        except InvalidRequest as exc:
            if ITEM_TOO_LARGE not in str(exc):
                raise
        found = await self.aws.call("dynamodb", "get_item", TableName=self.table, Key=keys, ConsistentRead=True)
        kept = {*keys, self.conflict.timestamp_attribute, self.conflict.region_attribute}
        marked = {name: value for name, value in found.get("Item", {}).items() if name in kept}
        if not marked:
            return False  # gone since
        log.info("applier %s: %s is too large for the delete marker; marking it without its payload",
                 self.pair, keys)
        marked[self.conflict.marker_attribute] = mark.values[":m"]
        condition = WriteCondition(mark.expression, {n: v for n, v in mark.names.items() if n != "#m"},
                                   {n: v for n, v in mark.values.items() if n != ":m"})
        return await self._write("put_item", condition, Item=marked)
