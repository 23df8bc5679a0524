"""Forwarder: local DynamoDB stream -> replication records -> every peer's Kinesis stream.

Only changes that originate here are forwarded (loop prevention: what the applier wrote
carries the peer's region, and the applier's own deletes carry the delete marker).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from replicatord.aws import Aws
from replicatord.config import Conflict, Tuning
from replicatord.conflict import PUT, Item, Version, being_deleted, delete_version, version_of, without_marker
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
from replicatord.tombstones import TombstoneTable

log = logging.getLogger(__name__)


def stream_keys(ddb: dict[str, Any]) -> Item:
    """The changed item's key. Key values come from the record's image when it has one: moto 5
    base64-encodes binary values in `Keys` twice (an emulator bug); the image holds what was
    written, and on AWS the two agree."""
    keys: Item = ddb.get("Keys") or {}
    image = ddb.get("NewImage") or ddb.get("OldImage") or {}
    return {name: image.get(name, value) for name, value in keys.items()}


@dataclass(frozen=True)
class Skip:
    reason: str  # replicated | delete_marker | known_delete | no_version | unknown_event


def plan_forward(stream_record: dict[str, Any], pair: str, region: str, conflict: Conflict) -> ReplicationRecord | Skip:
    """What to do with one local DynamoDB stream record: a record to forward, or why not."""
    event = stream_record.get("eventName")
    ddb = stream_record.get("dynamodb", {})
    keys = stream_keys(ddb)
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
    return plan_restore(ddb, version_of(ddb.get("NewImage"), conflict), pair, conflict)


def plan_restore(
    ddb: dict[str, Any], new_version: Version | None, pair: str, conflict: Conflict
) -> ReplicationRecord | None:
    """The PUT that restores the image a change of version `new_version` replaced, if that image
    is newer: it won. None otherwise."""
    old = ddb.get("OldImage") or {}
    if being_deleted(old, conflict):
        return None  # the replaced image was on its way out: nothing to restore
    old_version = version_of(old, conflict)
    if new_version is None or old_version is None or not new_version < old_version:
        return None
    return ReplicationRecord(
        "PUT", pair, stream_keys(ddb), without_marker(old, conflict), old_version, old_version.region,
        str(ddb.get("SequenceNumber", "")), float(creation_seconds(ddb.get("ApproximateCreationDateTime", 0))),
    )


class Repairer(Protocol):
    async def apply(self, record: ReplicationRecord) -> bool: ...
    async def stamp(self, keys: dict[str, Any], timestamp: Decimal) -> bool: ...


def written_version(stream_record: dict[str, Any], conflict: Conflict) -> Version | None:
    """The version an INSERT/MODIFY wrote (None for removes, marked or unversioned images)."""
    if stream_record.get("eventName") not in ("INSERT", "MODIFY"):
        return None
    image = stream_record.get("dynamodb", {}).get("NewImage")
    if being_deleted(image, conflict):
        return None
    return version_of(image, conflict)


class Forwarder:
    def __init__(
        self,
        aws: Aws,
        pair: str,
        peers: dict[str, tuple[Any, str]],  # peer region -> (kinesis client, stream name)
        tombstones: TombstoneTable,
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
        self.tombstones = tombstones
        self.conflict = conflict
        self.tuning = tuning
        self.dlq = dlq
        self.metrics = metrics
        self.stop = stop

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Forward the page's application changes, record their deletes' tombstones, then repair.

        A crash anywhere replays the page: forwarding again is harmless, tombstones only grow,
        and repairs are conditional writes with the normal rules.
        """
        entries: list[Entry] = []
        app_deletes: list[ReplicationRecord] = []
        repairs: list[tuple[str, ReplicationRecord]] = []
        written: list[tuple[dict[str, Any], Version]] = []
        for stream_record in records:
            repair = plan_repair(stream_record, self.pair, self.region, self.conflict)
            if repair is not None:
                repairs.append(("stale_write", repair))
            version = written_version(stream_record, self.conflict)
            if version is not None:
                written.append((stream_record, version))
            planned = plan_forward(stream_record, self.pair, self.region, self.conflict)
            if isinstance(planned, Skip):
                self.metrics.records_skipped.labels(self.pair, planned.reason).inc()
                if planned.reason == "no_version":
                    restore = await self._unversioned(stream_record)
                    if restore is not None:
                        repairs.append(("stale_write", restore))
                elif planned.reason == "unknown_event":
                    await self.dlq.send(self.pair, "forwarder", planned.reason, "unknown stream event",
                                        stream_record_text(stream_record))
                continue
            entry = Entry(encode_record(planned), partition_key(planned.keys))
            if oversized(entry):
                self.metrics.records_skipped.labels(self.pair, "oversized").inc()
                await self.dlq.send(self.pair, "forwarder", "oversized",
                                    f"record of {entry.size} bytes exceeds Kinesis' 1 MiB", entry.data)
                continue
            entries.append(entry)
            if planned.op == "DELETE":
                app_deletes.append(planned)
        if entries:
            await run_together(self._put(peer, entries) for peer in self.peers)
        for delete in app_deletes:  # after forwarding: a crash in between forwards it again
            await self.tombstones.record(self.pair, delete.keys, delete.version)
        repairs += await self._resurrections(written)
        for kind, record in repairs:
            await self._repair(kind, record)

    async def _resurrections(
        self, written: list[tuple[dict[str, Any], Version]]
    ) -> list[tuple[str, ReplicationRecord]]:
        """Writes older than their key's tombstone: an old PUT that slipped in before the
        tombstone existed, or an application write older than a known delete. The repair applies
        the tombstone with the normal DELETE rule."""
        if not written:
            return []
        keyed = [(stream_record["dynamodb"], stream_keys(stream_record["dynamodb"]), version)
                 for stream_record, version in written]
        tombstones = await self.tombstones.fetch(self.pair, [keys for _, keys, _ in keyed])
        repairs = []
        for ddb, keys, version in keyed:
            tombstone = tombstones.get(self.pair, keys)
            if tombstone is not None and version < tombstone:
                repairs.append(("resurrection", ReplicationRecord(
                    "DELETE", self.pair, keys, None, tombstone, tombstone.region,
                    str(ddb.get("SequenceNumber", "")),
                    float(creation_seconds(ddb.get("ApproximateCreationDateTime", 0))),
                )))
        return repairs

    async def _unversioned(self, stream_record: dict[str, Any]) -> ReplicationRecord | None:
        """A local change without the version attributes: the `conflict.missing_version` policy.

        With `stamp`, returns the repair that restores the image the change replaced when that
        image is newer than the stamp: the unversioned write lost. Planned whether or not this
        attempt stamped, so a replayed page, or a newer write that got in before the stamp,
        still gets it (a conditional PUT: it lands only while the replaced image wins).
        """
        ddb = stream_record.get("dynamodb", {})
        if self.conflict.missing_version == "dead_letter":
            self.metrics.unversioned.labels(self.pair, "dead_letter").inc()
            await self.dlq.send(
                self.pair, "forwarder", "no_version",
                f"{stream_record.get('eventName')} without the version attributes "
                f"{self.conflict.timestamp_attribute!r}/{self.conflict.region_attribute!r}",
                stream_record_text(stream_record),
            )
            return None
        # stamp: give the item a version (when the change was made, here); that change replicates.
        created = creation_seconds(ddb.get("ApproximateCreationDateTime", 0))
        stamped = await self.repairer.stamp(stream_keys(ddb), created)
        self.metrics.unversioned.labels(self.pair, "stamped" if stamped else "already_versioned").inc()
        return plan_restore(ddb, Version(created, PUT, self.region), self.pair, self.conflict)

    async def _repair(self, kind: str, repair: ReplicationRecord) -> None:
        """Apply a repair with the normal rules; count and log it if it landed."""
        try:
            landed = await self.repairer.apply(repair)
        except InvalidRequest as exc:
            # The image it would restore is refused by DynamoDB; record it, don't stall the shard.
            await self.dlq.send(self.pair, "forwarder", "repair_rejected", str(exc), encode_record(repair))
            return
        if landed:
            self.metrics.conflicts.labels(kind).inc()
            log.info("forwarder %s: %s repair of %s: applied %s %s", self.pair, kind, repair.keys,
                     repair.op, repair.version.encode())

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
