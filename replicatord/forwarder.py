"""Forwarder: local DynamoDB stream -> replication records -> every peer's Kinesis stream.

Only changes that originate here are forwarded (loop prevention: what the applier wrote
carries the peer's region, and the applier's own deletes carry the delete marker).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from replicatord.aio import run_together
from replicatord.aws import Aws
from replicatord.config import Conflict, Tuning
from replicatord.conflict import DELETE, PUT, Item, Version, being_deleted, delete_version, version_of, without_marker
from replicatord.dlq import DeadLetterQueue
from replicatord.metrics import Metrics
from replicatord.outbox import Route
from replicatord.producer import KinesisProducer, Target
from replicatord.records import (
    Entry,
    RecordError,
    ReplicationRecord,
    creation_seconds,
    encode_record,
    oversized,
    partition_key,
    shown,
)
from replicatord.retry import (
    GAVE_UP,
    Arrival,
    RecordRetry,
    reason_of,
)
from replicatord.shipper import OutboxCount
from replicatord.tombstones import Tombstones, TombstoneTable

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
    reason: str  # replicated | delete_marker | known_delete | ttl_delete | no_version | unknown_event


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
        return ReplicationRecord("PUT", pair, keys, image, version, region, sequence,
                                 float(change_time(created, version)))
    if event == "REMOVE":
        old = ddb.get("OldImage") or {}
        if being_deleted(old, conflict):
            return Skip("known_delete")
        if is_ttl_delete(stream_record):
            if conflict.ttl_deletes == "skip":
                return Skip("ttl_delete")
            version = ttl_delete_version(old, region, conflict)
        else:
            version = delete_version(old, created, region, conflict)
        return ReplicationRecord("DELETE", pair, keys, None, version, region, sequence, float(created))
    return Skip("unknown_event")


def is_ttl_delete(stream_record: dict[str, Any]) -> bool:
    """A REMOVE made by DynamoDB's TTL sweep: `userIdentity` {Type: Service, PrincipalId:
    dynamodb.amazonaws.com} (Lambda's events spell the members type/principalId)."""
    identity = stream_record.get("userIdentity") or {}
    kind = identity.get("Type", identity.get("type"))
    principal = identity.get("PrincipalId", identity.get("principalId"))
    return kind == "Service" and principal == "dynamodb.amazonaws.com"


def ttl_delete_version(removed: Item | None, region: str, conflict: Conflict) -> Version:
    """A TTL delete removes the version the item held, whenever the sweep ran (hours or days
    after the expiry): stamped at the sweep, it would destroy writes the peer made since. An
    unversioned item's delete carries timestamp 0: it removes only unversioned copies."""
    removed_version = version_of(removed, conflict)
    return Version(removed_version.timestamp if removed_version else Decimal(0), DELETE, region)


def change_time(created: Decimal, version: Version | None) -> Decimal:
    """When a change was made, as precisely as known (for the latency histogram). AWS rounds
    ApproximateCreationDateTime down to the second; an application timestamp within that
    second is closer. Never later than the change, so latency is never under-reported."""
    if created != created.to_integral_value():
        return created  # the stream gave sub-second precision
    if version is not None and created <= version.timestamp < created + 1:
        return version.timestamp
    return created


def plan_repair(stream_record: dict[str, Any], pair: str, region: str, conflict: Conflict) -> ReplicationRecord | None:
    """An application write stamped older than the item it overwrote: the replaced image won.

    Returns the PUT that restores it (applied with the normal rule, so it lands only if it is
    still the winner), or None. docs/design.md §4, repair.
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


@dataclass(frozen=True)
class RecordPlan:
    """What the forwarder does with one local stream record, worked out away from the event loop."""

    stream_record: dict[str, Any]
    created_s: float
    forward: ReplicationRecord | Skip | None = None
    entry: Entry | None = None  # the encoded record; None if it is over Kinesis' size limit
    repair: ReplicationRecord | None = None  # a stale write's restore
    written: Version | None = None  # the version an INSERT/MODIFY wrote
    error: Exception | None = None  # planning failed on this record: it goes to the dead-letter queue


def plan_page(records: list[dict[str, Any]], pair: str, region: str, conflict: Conflict) -> list[RecordPlan]:
    """Plan every record of a page; one that breaks planning is reported, not raised."""
    plans = []
    for stream_record in records:
        created = time.time()
        try:
            created = float(creation_seconds(stream_record["dynamodb"]["ApproximateCreationDateTime"]))
            if not stream_keys(stream_record["dynamodb"]):
                raise RecordError("stream record without Keys")
            forward = plan_forward(stream_record, pair, region, conflict)
            entry = None
            if isinstance(forward, ReplicationRecord):
                entry = Entry(encode_record(forward), partition_key(forward.keys))
                entry = None if oversized(entry) else entry
            plans.append(RecordPlan(stream_record, created, forward, entry,
                                    plan_repair(stream_record, pair, region, conflict),
                                    written_version(stream_record, conflict)))
        except Exception as exc:  # noqa: BLE001 - one record that breaks planning never stops the page
            plans.append(RecordPlan(stream_record, created, error=exc))
    return plans



@dataclass
class PageWork:
    """What a page asks of the forwarder, sorted."""

    outgoing: list[tuple[Entry, Arrival]] = field(default_factory=list)  # to every peer
    app_deletes: list[tuple[ReplicationRecord, Arrival]] = field(default_factory=list)  # their tombstones
    repairs: list[tuple[str, ReplicationRecord, Arrival]] = field(default_factory=list)
    written: list[tuple[dict[str, Any], Version, Arrival]] = field(default_factory=list)  # checked against tombstones


class Forwarder:
    def __init__(
        self,
        aws: Aws,
        pair: str,
        peers: dict[str, str],  # peer region -> its Kinesis stream (the client: aws.peers)
        tombstones: TombstoneTable,
        conflict: Conflict,
        tuning: Tuning,
        dlq: DeadLetterQueue,
        repairer: Repairer,
        metrics: Metrics,
        stop: asyncio.Event,
        outboxes: Mapping[str, tuple[Route, str]] | None = None,
        outbox_count: OutboxCount | None = None,
    ) -> None:
        """`outboxes`: peer -> its route and its outbox stream in this region (outbox.py); a
        peer without one holds the page until it takes the page's records."""
        self.aws = aws
        self.repairer = repairer
        self.pair = pair
        self.region = aws.settings.region
        self.peers = peers
        self.tombstones = tombstones
        self.conflict = conflict
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.retry = RecordRetry(pair, "forwarder", dlq, tuning, metrics, stop)
        self.producer = KinesisProducer(aws, pair, self.retry, tuning, metrics, stop)
        self.outboxes = dict(outboxes or {})
        self.outbox_count = outbox_count

    def page_keys(self, records: list[dict[str, Any]]) -> frozenset[str] | None:
        """The items a page changes (consumer.py: a page that shares none with the page before
        is forwarded while that one is still on its way); None if a record does not say."""
        try:
            return frozenset(partition_key(stream_keys(record["dynamodb"])) for record in records)
        except Exception:  # noqa: BLE001 - a malformed record: the page waits its turn, process() judges it
            return None

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Forward the page's application changes, record their deletes' tombstones, then repair.

        Returns once every record is forwarded, skipped or dead-lettered; a failed step is
        retried alone (retry.py), so nothing that succeeded is sent or written again. A crash
        replays the page: forwarding again is harmless, tombstones only grow, and repairs are
        conditional writes with the normal rules.
        """
        plans = await asyncio.to_thread(plan_page, records, self.pair, self.region, self.conflict)
        await self._forward(await self._sort(plans))

    async def _sort(self, plans: list[RecordPlan]) -> PageWork:
        """What each planned record asks for; what cannot be forwarded goes to the queue now."""
        work = PageWork()
        for plan in plans:
            letter = Arrival(plan.stream_record, plan.created_s)
            if plan.error is not None:
                self.metrics.records_skipped.labels(self.pair, "invalid").inc()
                self.metrics.errors.labels("forwarder", reason_of(plan.error)).inc()
                if not isinstance(plan.error, RecordError):
                    log.error("forwarder %s: planning a stream record failed", self.pair, exc_info=plan.error)
                await self.retry.dead_letter(reason_of(plan.error), str(plan.error), letter)
                continue
            if plan.repair is not None:
                work.repairs.append(("stale_write", plan.repair, letter))
            if plan.written is not None:
                work.written.append((plan.stream_record, plan.written, letter))
            planned = plan.forward
            if is_ttl_delete(plan.stream_record):
                replicated = isinstance(planned, ReplicationRecord) and planned.op == "DELETE"
                self.metrics.ttl_deletes.labels(self.pair, "replicated" if replicated else "skipped").inc()
            if isinstance(planned, Skip):
                await self._skipped(plan, planned, letter, work)
            elif plan.entry is None:
                self.metrics.records_skipped.labels(self.pair, "oversized").inc()
                await self.retry.dead_letter("oversized", "the record exceeds Kinesis' 1 MiB", letter)
            elif planned is not None:
                work.outgoing.append((plan.entry, letter))
                if planned.op == "DELETE":
                    work.app_deletes.append((planned, letter))
        return work

    async def _skipped(self, plan: RecordPlan, skip: Skip, letter: Arrival, work: PageWork) -> None:
        self.metrics.records_skipped.labels(self.pair, skip.reason).inc()
        if skip.reason == "no_version":
            restore = await self._unversioned(plan.stream_record, letter)
            if restore is not None:
                work.repairs.append(("stale_write", restore, letter))
        elif skip.reason == "unknown_event":
            await self.retry.dead_letter(skip.reason, "unknown stream event", letter)

    async def _forward(self, work: PageWork) -> None:
        """Forward to every peer while the page's writes are checked against their keys'
        tombstones (the read needs nothing from forwarding, and this page's own deletes are added
        to what it found, so the check sees what it would after recording them); then record the
        deletes' tombstones (after forwarding: a crash in between forwards them again) and repair."""
        keyed = [(stream_record["dynamodb"], stream_keys(stream_record["dynamodb"]), version, letter)
                 for stream_record, version, letter in work.written]
        steps: list[Coroutine[Any, Any, Tombstones | None]] = []
        if work.outgoing:
            steps += (self._deliver(peer, work.outgoing) for peer in self.peers)
        if keyed:
            steps.append(self.retry.step(functools.partial(
                self.tombstones.fetch, self.pair, [keys for _, keys, _, _ in keyed]), "tombstone read"))
        done = await run_together(steps)
        tombstones = done[-1] if keyed else None
        for delete, letter in work.app_deletes:
            await self.retry.run(functools.partial(self.tombstones.record, self.pair, delete.keys, delete.version),
                                 letter, f"tombstone of {shown(delete.keys)}")
        repairs = list(work.repairs)
        if tombstones is not None:
            for delete, _ in work.app_deletes:
                tombstones.raise_to(self.pair, delete.keys, delete.version)
            repairs += self._resurrections(keyed, tombstones)
        for kind, record, letter in repairs:
            await self._repair(kind, record, letter)

    async def _deliver(self, peer: str, outgoing: list[tuple[Entry, Arrival]]) -> None:
        """One peer's records of the page: on its stream, or in its outbox while it is diverted
        (and what is left of a put to it when it becomes diverted meanwhile)."""
        direct = Target(peer, self.peers[peer])
        if peer not in self.outboxes:
            await self.producer.put(direct, outgoing)
            return
        route, outbox = self.outboxes[peer]
        left = outgoing if route.diverted() else await self.producer.put(direct, outgoing, route)
        if left:
            await self.producer.put(Target(peer, outbox, outbox=True), left)
            if self.outbox_count is not None:
                self.outbox_count.note(self.pair, peer, "diverted", len(left))

    def _resurrections(
        self, keyed: list[tuple[dict[str, Any], Item, Version, Arrival]], tombstones: Tombstones
    ) -> list[tuple[str, ReplicationRecord, Arrival]]:
        """Writes older than their key's tombstone: an old PUT that slipped in before the
        tombstone existed, or an application write older than a known delete. The repair applies
        the tombstone with the normal DELETE rule."""
        repairs = []
        for ddb, keys, version, letter in keyed:
            tombstone = tombstones.get(self.pair, keys)
            if tombstone is not None and version < tombstone:
                repairs.append(("resurrection", ReplicationRecord(
                    "DELETE", self.pair, keys, None, tombstone, tombstone.region,
                    str(ddb.get("SequenceNumber", "")),
                    float(creation_seconds(ddb.get("ApproximateCreationDateTime", 0))),
                ), letter))
        return repairs

    async def _unversioned(self, stream_record: dict[str, Any], letter: Arrival) -> ReplicationRecord | None:
        """A local change without the version attributes: the `conflict.missing_version` policy.

        With `stamp`, returns the repair that restores the image the change replaced when that
        image is newer than the stamp: the unversioned write lost. Planned whether or not this
        attempt stamped, so a replayed page, or a newer write that got in before the stamp,
        still gets it (a conditional PUT: it lands only while the replaced image wins).
        """
        ddb = stream_record.get("dynamodb", {})
        if self.conflict.missing_version == "dead_letter":
            self.metrics.unversioned.labels(self.pair, "dead_letter").inc()
            await self.retry.dead_letter(
                "no_version",
                f"{stream_record.get('eventName')} without the version attributes "
                f"{self.conflict.timestamp_attribute!r}/{self.conflict.region_attribute!r}",
                letter,
            )
            return None
        # stamp: give the item a version (when the change was made, here); that change replicates.
        created = creation_seconds(ddb.get("ApproximateCreationDateTime", 0))
        keys = stream_keys(ddb)
        stamped = await self.retry.run(functools.partial(self.repairer.stamp, keys, created), letter,
                                       f"stamp of {shown(keys)}")
        if stamped is GAVE_UP:
            return None
        self.metrics.unversioned.labels(self.pair, "stamped" if stamped else "already_versioned").inc()
        return plan_restore(ddb, Version(created, PUT, self.region), self.pair, self.conflict)

    async def _repair(self, kind: str, repair: ReplicationRecord, letter: Arrival) -> None:
        """Apply a repair with the normal rules; count and log it if it landed. One that DynamoDB
        refuses or that keeps failing goes to the dead-letter queue with the stream record."""
        landed = await self.retry.run(functools.partial(self.repairer.apply, repair), letter,
                                      f"{kind} repair of {shown(repair.keys)}")
        if landed is GAVE_UP:
            return
        if landed:
            self.metrics.conflicts.labels(kind).inc()
            log.info("forwarder %s: %s repair of %s: applied %s %s", self.pair, kind, shown(repair.keys),
                     repair.op, repair.version.encode())
