"""Forwarder: local DynamoDB stream -> replication records -> every peer's Kinesis stream.

Only changes that originate here are forwarded (loop prevention: what the applier wrote
carries the peer's region, and the applier's own deletes carry the delete marker).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from replicatord.aws import Aws
from replicatord.config import Conflict, Tuning
from replicatord.conflict import being_deleted, delete_version, version_of, without_marker
from replicatord.dlq import DeadLetterQueue, stream_record_text
from replicatord.errors import InvalidRequest, ReplicatorError
from replicatord.metrics import Metrics
from replicatord.records import (
    Entry,
    ReplicationRecord,
    creation_seconds,
    encode_record,
    oversized,
    partition_key,
    plan_batches,
)
from replicatord.shards import Abandoned, backoff_s, run_together, sleep_or_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    reason: str  # replicated | delete_marker | known_delete | no_version | unknown_event


def plan_forward(stream_record: dict[str, Any], pair: str, region: str, conflict: Conflict) -> ReplicationRecord | Skip:
    """What to do with one local DynamoDB stream record: a record to forward, or why not."""
    event = stream_record.get("eventName")
    ddb = stream_record.get("dynamodb", {})
    keys = ddb.get("Keys") or {}
    sequence = str(ddb.get("SequenceNumber", ""))
    created = creation_seconds(ddb.get("ApproximateCreationDateTime", 0))
    if event in ("INSERT", "MODIFY"):
        image = ddb.get("NewImage") or {}
        if being_deleted(image, conflict):
            return Skip("delete_marker")
        image = without_marker(image, conflict)
        version = version_of(image, conflict)
        if version is None:
            return Skip("no_version")
        if version.region != region:
            return Skip("replicated")
        return ReplicationRecord("PUT", pair, keys, image, version, region, sequence, float(created))
    if event == "REMOVE":
        old = ddb.get("OldImage") or {}
        if being_deleted(old, conflict):
            return Skip("known_delete")
        version = delete_version(old, created, region, conflict)
        return ReplicationRecord("DELETE", pair, keys, None, version, region, sequence, float(created))
    return Skip("unknown_event")


def plan_repair(stream_record: dict[str, Any], pair: str, region: str, conflict: Conflict) -> ReplicationRecord | None:
    """An application write stamped older than the item it overwrote: the replaced image won.

    Returns the PUT that restores it (applied with the normal rule, so it lands only if it is
    still the winner), or None. DESIGN.md §4, repair.
    """
    if stream_record.get("eventName") != "MODIFY":
        return None
    ddb = stream_record.get("dynamodb", {})
    old = ddb.get("OldImage") or {}
    if being_deleted(old, conflict):
        return None  # the replaced image was on its way out: nothing to restore
    new_version = version_of(ddb.get("NewImage"), conflict)
    old_version = version_of(old, conflict)
    if new_version is None or old_version is None or not new_version < old_version:
        return None
    image = without_marker(old, conflict)
    return ReplicationRecord(
        "PUT", pair, ddb.get("Keys") or {}, image, old_version, old_version.region,
        str(ddb.get("SequenceNumber", "")), float(creation_seconds(ddb.get("ApproximateCreationDateTime", 0))),
    )


class Repairer(Protocol):
    async def apply(self, record: ReplicationRecord) -> bool: ...


class Forwarder:
    def __init__(
        self,
        aws: Aws,
        pair: str,
        peers: dict[str, tuple[Any, str]],  # peer region -> (kinesis client, stream name)
        conflict: Conflict,
        tuning: Tuning,
        dlq: DeadLetterQueue,
        repairer: Repairer,
        metrics: Metrics,
        stop: asyncio.Event,
    ) -> None:
        self.aws = aws
        self.repairer = repairer
        self.pair = pair
        self.region = aws.settings.region
        self.peers = peers
        self.conflict = conflict
        self.tuning = tuning
        self.dlq = dlq
        self.metrics = metrics
        self.stop = stop

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        entries: list[Entry] = []
        for stream_record in records:
            repair = plan_repair(stream_record, self.pair, self.region, self.conflict)
            if repair is not None and await self._repair(repair):
                self.metrics.conflicts.labels("stale_write").inc()
                log.info("forwarder %s: application write to %s was older than the item it replaced; "
                         "restored the winner %s", self.pair, repair.keys, repair.version.encode())
            planned = plan_forward(stream_record, self.pair, self.region, self.conflict)
            if isinstance(planned, Skip):
                self.metrics.records_skipped.labels(self.pair, planned.reason).inc()
                if planned.reason in ("no_version", "unknown_event"):
                    await self.dlq.send(
                        self.pair, "forwarder", planned.reason,
                        f"{stream_record.get('eventName')} without the version attributes "
                        f"{self.conflict.timestamp_attribute!r}/{self.conflict.region_attribute!r}"
                        if planned.reason == "no_version" else "unknown stream event",
                        stream_record_text(stream_record),
                    )
                continue
            entry = Entry(encode_record(planned), partition_key(planned.keys))
            if oversized(entry):
                self.metrics.records_skipped.labels(self.pair, "oversized").inc()
                await self.dlq.send(self.pair, "forwarder", "oversized",
                                    f"record of {entry.size} bytes exceeds Kinesis' 1 MiB", entry.data)
                continue
            entries.append(entry)
        if not entries:
            return
        await run_together(self._put(peer, entries) for peer in self.peers)

    async def _repair(self, repair: ReplicationRecord) -> bool:
        try:
            return await self.repairer.apply(repair)
        except InvalidRequest as exc:
            # The image it would restore is refused by DynamoDB; record it, don't stall the shard.
            await self.dlq.send(self.pair, "forwarder", "repair_rejected", str(exc), encode_record(repair))
            return False

    async def _put(self, peer: str, entries: list[Entry]) -> None:
        """PutRecords in batches; retry only the entries that failed, with capped backoff."""
        client, stream = self.peers[peer]
        reachable = self.metrics.peer_reachable.labels(peer)
        for batch in plan_batches(entries):
            attempt = 0
            while batch:
                try:
                    result = await self.aws.call(
                        "kinesis", "put_records", client=client, StreamName=stream,
                        Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e in batch],
                    )
                except ReplicatorError as exc:
                    reachable.set(0)
                    failed, reason = batch, exc.kind
                    detail = str(exc)
                else:
                    reachable.set(1)
                    failed = [e for e, r in zip(batch, result["Records"], strict=True) if r.get("ErrorCode")]
                    codes = {r["ErrorCode"] for r in result["Records"] if r.get("ErrorCode")}
                    reason = "throttled" if "ProvisionedThroughputExceededException" in codes else "put_failed"
                    detail = ", ".join(sorted(codes))
                    sent = len(batch) - len(failed)
                    self.metrics.records_forwarded.labels(self.pair, peer).inc(sent)
                if not failed:
                    break
                attempt += 1
                self.metrics.errors.labels("forwarder", reason).inc()
                log.warning("forwarder %s -> %s: %d of %d records not accepted (%s); retry %d",
                            self.pair, peer, len(failed), len(batch), detail, attempt)
                batch = failed
                if await sleep_or_stop(self.stop, backoff_s(attempt, self.tuning)):
                    raise Abandoned
