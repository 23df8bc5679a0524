"""`replicatord backfill --pair P --from REGION [--to PEER]`: copy the items a table already holds
to every peer (or the peers named, e.g. a region being added: then it first waits until the
source region has applied what reached it before the backfill started).

For bringing an existing table into replication, or refilling a region after a loss the daemon
reported as trimmed. Every item goes through the applier's conditional writes in each peer
(ops/tables.py): it lands only where it is newer than what the peer holds and than the key's
tombstone, so the daemons and the applications may go on writing meanwhile and a newer write is
never overwritten. Items without version attributes are counted and left alone.

Progress is kept per scan segment in the source region's lease table (partition
`backfill/<pair>/<region>`, or `backfill/<pair>/<region>/to/<peers>` with `--to`; one item per
segment: the key to resume after, and the counts), after
every page: an interrupted backfill started again continues where each segment stopped,
repeating at most the page that was in flight. `--restart` starts over.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from replicatord.aws import StartupError
from replicatord.config import Pair, Topology
from replicatord.conflict import version_of, without_marker
from replicatord.errors import ReplicatorError
from replicatord.lease_table import SegmentProgress
from replicatord.leases import ACTIVE, latest_since, shard_of
from replicatord.ops.tables import Progress, RateLimit, RegionOps, Regions, key_text, pick_pairs, put_record
from replicatord.provenance import future_beyond_bound
from replicatord.records import RecordError, creation_seconds, item_from_json, item_to_json

COUNTS = ("scanned", "copied", "older", "failed", "unversioned", "future")
# With --to, how long the backfill waits for the source's appliers to catch up before it starts.
APPLIED_TIMEOUT_S = 300.0
WRITES_AT_ONCE = 16


@dataclass
class Segment:
    number: int
    of: int
    resume: dict[str, Any] | None = None
    finished: bool = False
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def shard(self) -> str:
        return f"segment-{self.number:04d}-of-{self.of:04d}"


@dataclass
class Summary:
    pair: str
    source: str
    peers: list[str]
    segments: int
    counts: Counter[str] = field(default_factory=Counter)  # over every run
    this_run: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    resumed: bool = False
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        rate = self.this_run["scanned"] / self.elapsed_s if self.elapsed_s else 0.0
        return {"pair": self.pair, "from": self.source, "to": self.peers, "segments": self.segments,
                "complete": self.complete, "resumed": self.resumed,
                "totals": {name: self.counts[name] for name in COUNTS},
                "this_run": {name: self.this_run[name] for name in COUNTS}, "elapsed_s": round(self.elapsed_s, 1),
                "items_per_s": round(rate, 1), "failures": self.failures[:10]}

    def describe(self) -> list[str]:
        c = self.counts
        lines = [f"backfill {self.pair} from {self.source} to {', '.join(self.peers)}: "
                 + ("complete" if self.complete else "incomplete")
                 + (" (resumed)" if self.resumed else ""),
                 f"  items: {c['scanned']:,} scanned; writes per peer: {c['copied']:,} copied, "
                 f"{c['older']:,} skipped as older (the peer holds as new or newer), {c['failed']:,} failed; "
                 f"{c['unversioned']:,} without version attributes (left alone), {c['future']:,} with a version "
                 "more than conflict.max_future_s ahead (reported, not copied)",
                 f"  this run: {self.this_run['scanned']:,} items in {self.elapsed_s:.1f}s "
                 f"({self.to_json()['items_per_s']:,.0f} items/s)"]
        lines += [f"  failed: {failure}" for failure in self.failures[:10]]
        return lines


class Backfill:
    def __init__(self, topology: Topology, ops: dict[str, RegionOps], pair: Pair, source: str,
                 rate: float | None, segments: int, show_progress: bool, targets: list[str] | None = None) -> None:
        self.topology = topology
        self.ops = ops
        self.pair = pair
        self.source = source
        self.peers = peers_of(topology, source, targets)
        self.rate = RateLimit(rate)
        self.segments = segments
        self.partition = f"backfill/{pair.name}/{source}" + (f"/to/{','.join(self.peers)}" if targets else "")
        self.progress = Progress(f"backfill {pair.name} {source}->{','.join(self.peers)}") if show_progress else None
        self.writes_at_once = asyncio.Semaphore(WRITES_AT_ONCE)

    async def load(self, restart: bool) -> list[Segment]:
        """The segments' stored progress (a second run continues), or fresh ones."""
        leases = self.ops[self.source].leases()
        if restart:
            await leases.clear_progress(self.partition)
        stored = await leases.load_progress(self.partition)
        if not stored:
            return [Segment(n, self.segments) for n in range(self.segments)]
        segments = []
        for row in stored:
            number, of = (int(part) for part in row.segment.split("-")[1::2])
            segment = Segment(number, of, row.resume, row.finished)
            segment.counts.update({name: count for name, count in row.counts.items() if name in COUNTS})
            segments.append(segment)
        self.segments = segments[0].of
        known = {s.number for s in segments}
        segments += [Segment(n, self.segments) for n in range(self.segments) if n not in known]
        return sorted(segments, key=lambda s: s.number)

    async def save(self, segment: Segment) -> None:
        await self.ops[self.source].leases().save_progress(self.partition, SegmentProgress(
            segment.shard, segment.finished, segment.resume, {name: segment.counts[name] for name in COUNTS}))

    async def run_segment(self, segment: Segment, summary: Summary) -> None:
        if segment.finished:
            return
        src = self.ops[self.source]
        table = self.pair.tables[self.source]
        start = None
        if segment.resume is not None:
            try:
                start = item_from_json(segment.resume, "resume")
            except RecordError:
                start = None  # unreadable progress: this segment starts over (writes are idempotent)
        async for items, last in src.scan_pages(table, segment.number, segment.of, self.rate, start):
            counts = await self.copy(items, summary)
            segment.counts.update(counts)
            summary.this_run.update(counts)
            segment.resume = item_to_json(last, "resume") if last else None
            segment.finished = last is None
            await self.save(segment)
            if self.progress:
                self.progress.add(len(items), f"{summary.this_run['copied']:,} copied")

    async def copy(self, items: list[dict[str, Any]], summary: Summary) -> Counter[str]:
        conflict = self.topology.conflict
        names = await self.ops[self.source].key_names(self.pair.tables[self.source])
        counts: Counter[str] = Counter(scanned=len(items))
        records = []
        for item in items:
            version = version_of(item, conflict)
            if version is None:
                counts["unversioned"] += 1
                continue
            keys = {n: item[n] for n in names}
            if future_beyond_bound(version.timestamp, conflict, time.time()):
                counts["future"] += 1
                summary.failures.append(f"{key_text(keys)}: version {version.timestamp} is more than "
                                        f"conflict.max_future_s ahead: not copied")
                continue
            records.append(put_record(self.pair.name, keys, without_marker(item, conflict), version, version.region))
        for peer in self.peers:
            applier = await self.ops[peer].applier(self.pair)
            tombstones = await self.ops[peer].tombstones_of(self.pair.name, [r.keys for r in records])

            await asyncio.gather(*(self.write(applier, tombstones, peer, r, counts, summary) for r in records))
        return counts

    async def write(self, applier: Any, tombstones: Any, peer: str, record: Any, counts: Counter[str],
                    summary: Summary) -> None:
        async with self.writes_at_once:
            try:
                landed = await applier.apply(record, tombstones)
            except ReplicatorError as exc:
                counts["failed"] += 1
                summary.failures.append(f"{key_text(record.keys)} to {peer}: {exc}")
                return
        counts["copied" if landed else "older"] += 1


async def wait_applied(src: RegionOps, pair: Pair, since: float, timeout_s: float) -> None:
    """Wait until the source region's appliers have applied every record that reached its Kinesis
    stream before `since`. A region being added gets the changes made from the rolling restart
    on from their own regions, and the older ones from this backfill: so the source's table must
    first hold what was in flight to it when the others were restarted."""
    kinesis = src.aws.local["kinesis"]
    prefix = f"applier/{pair.streams[src.region]}@"
    deadline = time.monotonic() + timeout_s
    while True:
        behind = []
        for lease in await src.leases().all_leases():
            if not lease.key.startswith(prefix) or lease.state != ACTIVE:
                continue
            where: dict[str, Any] = {"ShardIteratorType": "TRIM_HORIZON"}
            if lease.checkpoint and latest_since(lease.checkpoint) is None:
                where = {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": lease.checkpoint}
            try:
                iterator = (await src.aws.call("kinesis", "get_shard_iterator", client=kinesis,
                                               StreamName=pair.streams[src.region], ShardId=shard_of(lease.key),
                                               **where))["ShardIterator"]
                page = await src.aws.call("kinesis", "get_records", client=kinesis, ShardIterator=iterator, Limit=1)
            except ReplicatorError:
                behind.append(shard_of(lease.key))
                continue
            records = page.get("Records", [])
            if records and float(creation_seconds(records[0]["ApproximateArrivalTimestamp"])) < since:
                behind.append(shard_of(lease.key))
        if not behind:
            return
        if time.monotonic() > deadline:
            raise StartupError(
                f"the appliers in {src.region} have not applied what reached them before the backfill started "
                f"(shards {', '.join(behind)}): is replicatord running there? ('replicatord status')")
        await asyncio.sleep(1)


def peers_of(topology: Topology, source: str, targets: list[str] | None) -> list[str]:
    """The regions a backfill writes into: `targets` (in topology order), else every peer."""
    return [r for r in topology.regions if r != source and (not targets or r in targets)]


async def backfill(
    topology: Topology, pair_name: str, source: str, rate: float | None, segments: int, restart: bool,
    profiles: dict[str, str], show_progress: bool = True, targets: list[str] | None = None,
) -> Summary:
    (pair,) = pick_pairs(topology, pair_name)
    async with Regions(topology, [source, *peers_of(topology, source, targets)], profiles) as ops:
        if targets:
            await wait_applied(ops[source], pair, time.time(), APPLIED_TIMEOUT_S)
        job = Backfill(topology, ops, pair, source, rate, segments, show_progress, targets)
        stored = await job.load(restart)
        summary = Summary(pair.name, source, job.peers, job.segments)
        summary.resumed = any(s.counts["scanned"] or s.finished for s in stored)
        started = time.monotonic()
        await asyncio.gather(*(job.run_segment(segment, summary) for segment in stored))
        summary.elapsed_s = time.monotonic() - started
        if job.progress:
            job.progress.close()
        for segment in stored:
            summary.counts.update(segment.counts)
        summary.complete = all(s.finished for s in stored)
        return summary
