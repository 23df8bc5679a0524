"""Applier: local Kinesis stream -> conditional writes to the local table (last writer wins).

Independent keys are applied concurrently; the records of one key are applied in order.
A record that cannot be decoded goes to the dead-letter queue with the reason; the page goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any

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
from replicatord.errors import ConditionFailed, InvalidRequest, Transient
from replicatord.metrics import Metrics
from replicatord.records import (
    RecordError,
    ReplicationRecord,
    decode_record,
    encode_record,
    partition_key,
    same_key_runs,
)
from replicatord.shards import run_together
from replicatord.tombstones import Tombstones, TombstoneTable

log = logging.getLogger(__name__)

# DynamoDB's message (and the emulator's) for an item over 400 KB.
ITEM_TOO_LARGE = "maximum allowed size"

# How often a replicated delete retries when the item changed between marking and deleting.
DELETE_ATTEMPTS = 3


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
    ) -> None:
        self.aws = aws
        self.pair = pair
        self.table = table
        self.tombstones = tombstones
        self.stats_table = stats_table
        self.conflict = conflict
        self.dlq = dlq
        self.metrics = metrics
        self.limit = asyncio.Semaphore(tuning.apply_concurrency)

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        decoded: list[tuple[str, ReplicationRecord]] = []
        for kinesis_record in records:
            data: bytes = kinesis_record["Data"]
            try:
                record = decode_record(data)
                if record.pair != self.pair:
                    raise RecordError(f"record of pair {record.pair!r} on the stream of pair {self.pair!r}")
            except RecordError as exc:
                self.metrics.errors.labels("applier", "bad_record").inc()
                await self.dlq.send(self.pair, "applier", "bad_record", str(exc), data)
                continue
            decoded.append((partition_key(record.keys), record))
        applied = [0]
        tombstones = await self.tombstones.fetch(self.pair, [record.keys for _, record in decoded])
        await run_together(self._apply_key(run, tombstones, applied) for run in same_key_runs(decoded).values())
        if applied[0]:
            await self.aws.call(
                "dynamodb", "update_item", TableName=self.stats_table,
                Key={"PK": {"S": "replicated_count"}}, UpdateExpression="ADD cnt :n",
                ExpressionAttributeValues={":n": {"N": str(applied[0])}},
            )

    async def _apply_key(self, records: list[ReplicationRecord], tombstones: Tombstones, applied: list[int]) -> None:
        async with self.limit:
            for record in records:
                try:
                    done = await self.apply(record, tombstones)
                except InvalidRequest as exc:
                    # DynamoDB refuses the write itself (too large, bad attribute): retrying cannot help.
                    self.metrics.errors.labels("applier", exc.kind).inc()
                    await self.dlq.send(self.pair, "applier", "rejected", str(exc), encode_record(record))
                    continue
                if done:
                    applied[0] += 1
                    self.metrics.records_applied.labels(self.pair, record.op).inc()
                    self.metrics.latency.labels(self.pair).observe(
                        max(0.0, time.time() - record.approximate_creation_time)
                    )
                else:
                    self.metrics.records_stale.labels(self.pair).inc()

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
        image in; the forwarder sees that write and repairs it (DESIGN.md §4, resurrection)."""
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
        raise Transient(f"item {record.keys} kept changing while it was being deleted")

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
