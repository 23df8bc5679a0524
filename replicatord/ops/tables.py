"""What `verify`, `backfill` and `dlq redrive` share: one region's tables read in segments at a
bounded rate, items compared, and changes written by version through the applier's own code.

Every write goes through `Applier.apply` (docs/design.md §4): a PUT lands only if it is newer than the
item and the key's tombstone, a DELETE records its tombstone and removes the item only if it is
not newer. So an operator command can never overwrite a newer write of an application or of the
daemons, whatever runs at the same time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TextIO

from replicatord.applier import Applier
from replicatord.aws import Aws, StartupError, batch_get_item
from replicatord.backoff import backoff_s
from replicatord.config import Pair, Settings, Topology
from replicatord.conflict import Item, Version
from replicatord.dlq import MAX_BODY_BYTES, DeadLetterQueue
from replicatord.errors import NotFound, ReplicatorError
from replicatord.lease_table import LeaseTable
from replicatord.metrics import Metrics
from replicatord.provenance import Provenance
from replicatord.records import ReplicationRecord, item_to_json, partition_key
from replicatord.tombstones import Tombstones, TombstoneTable

BATCH_GET_MAX = 100


class RateLimit:
    """At most `per_s` items per second (a token bucket with one second of burst); None: no limit."""

    def __init__(self, per_s: float | None) -> None:
        self.per_s = per_s
        self.tokens = per_s or 0.0
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.per_s:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.per_s, self.tokens + (now - self.at) * self.per_s)
            self.at = now
            if self.tokens >= min(n, self.per_s):
                self.tokens -= n
                return
            await asyncio.sleep((min(n, self.per_s) - self.tokens) / self.per_s)


def canonical(value: Any) -> Any:
    """An attribute value with its sets in a fixed order: DynamoDB keeps no order in a set."""
    (kind, inner), = value.items()
    if kind in ("SS", "NS", "BS"):
        return {kind: sorted(inner)}
    if kind == "L":
        return {"L": [canonical(v) for v in inner]}
    if kind == "M":
        return {"M": {k: canonical(v) for k, v in inner.items()}}
    return value


def same_item(a: Item | None, b: Item | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(canonical(a[k]) == canonical(b[k]) for k in a)


def key_text(keys: Item) -> str:
    """A key as readable JSON for reports (binary as base64)."""
    return json.dumps(item_to_json(keys, "keys"), sort_keys=True, separators=(",", ":"))


@dataclass
class RegionOps:
    """One region's clients for an operator command."""

    topology: Topology
    region: str
    profile: str | None = None
    aws: Aws = field(init=False)
    metrics: Metrics = field(default_factory=Metrics)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _appliers: dict[str, Applier] = field(default_factory=dict)
    _keys: dict[str, list[str]] = field(default_factory=dict)
    _dlq: DeadLetterQueue | None = None

    def __post_init__(self) -> None:
        settings = Settings(self.topology, self.region, "replicatord-ops", "127.0.0.1", 0)
        self.aws = Aws(settings, self.metrics, self.profile)

    @property
    def config(self) -> Any:
        return self.topology.regions[self.region]

    async def key_names(self, table: str) -> list[str]:
        if table not in self._keys:
            try:
                desc = await self.aws.call("dynamodb", "describe_table", TableName=table)
            except NotFound:
                raise StartupError(f"table {table!r} not found in {self.region}") from None
            self._keys[table] = [k["AttributeName"] for k in desc["Table"]["KeySchema"]]
        return self._keys[table]

    async def dlq(self) -> DeadLetterQueue:
        if self._dlq is None:
            name = self.config.dead_letter_queue
            try:
                url = (await self.aws.call("sqs", "get_queue_url", QueueName=name))["QueueUrl"]
            except NotFound:
                raise StartupError(f"dead-letter queue {name!r} not found in {self.region}") from None
            self._dlq = DeadLetterQueue(self.aws, url, self.metrics, MAX_BODY_BYTES)
        return self._dlq

    def leases(self) -> LeaseTable:
        return LeaseTable(self.aws, self.config.lease_table)

    def tombstones(self) -> TombstoneTable:
        return TombstoneTable(self.aws, self.config.tombstone_table, self.topology.conflict.tombstone_ttl_s,
                              self.topology.tuning)

    async def applier(self, pair: Pair) -> Applier:
        """The applier of `pair` in this region: the one place that writes by version, with the
        daemon's rules of what a peer could have sent (a redriven letter is judged again)."""
        if pair.name not in self._appliers:
            table = pair.tables[self.region]
            described = (await self.aws.call("dynamodb", "describe_table", TableName=table))["Table"]
            peers = [region for region in self.topology.regions if region != self.region]
            rules = Provenance.from_table(self.region, peers, described, self.topology.conflict)
            self._appliers[pair.name] = Applier(
                self.aws, pair.name, table, self.config.stats_table, self.tombstones(),
                self.topology.conflict, self.topology.tuning, await self.dlq(), self.metrics, self.stop, rules)
        return self._appliers[pair.name]

    async def close(self) -> None:
        """Add what a redrive applied to replicated_count, as the daemon would have."""
        for applier in self._appliers.values():
            await applier.flush_stats()

    async def scan_pages(
        self, table: str, segment: int, segments: int, rate: RateLimit, start: Item | None = None, limit: int = 500
    ) -> AsyncIterator[tuple[list[Item], Item | None]]:
        """The items of one segment of a parallel scan, a page at a time, with the key to resume
        after each page (None at the end). Strongly consistent."""
        kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True, "Segment": segment,
                                  "TotalSegments": segments, "Limit": limit}
        if start:
            kwargs["ExclusiveStartKey"] = start
        while True:
            page = await self.call_with_backoff("scan", **kwargs)
            items = page.get("Items", [])
            await rate.take(max(1, len(items)))
            last = page.get("LastEvaluatedKey")
            yield items, last
            if not last:
                return
            kwargs["ExclusiveStartKey"] = last

    async def get_many(self, table: str, keys: Sequence[Item], rate: RateLimit) -> dict[str, Item]:
        """The items of `keys` that exist, by canonical key (strongly consistent BatchGetItem)."""
        found: dict[str, Item] = {}
        names = await self.key_names(table)
        for start in range(0, len(keys), BATCH_GET_MAX):
            chunk = list({partition_key(k): k for k in keys[start:start + BATCH_GET_MAX]}.values())
            request = {table: {"Keys": chunk, "ConsistentRead": True}}
            items = (await batch_get_item(self.aws, request, self.topology.tuning)).get(table, [])
            await rate.take(max(1, len(items)))
            for item in items:
                found[partition_key({n: item[n] for n in names})] = item
        return found

    async def call_with_backoff(self, operation: str, **kwargs: Any) -> Any:
        """A read that waits out throttling and passing failures (a few times), then fails."""
        for attempt in range(8):
            try:
                return await self.aws.call("dynamodb", operation, **kwargs)
            except ReplicatorError as exc:
                if not exc.passing or attempt == 7:
                    raise
                await asyncio.sleep(backoff_s(attempt, self.topology.tuning))
        raise AssertionError("unreachable")

    async def tombstones_of(self, pair: str, keys: Sequence[Item]) -> Tombstones:
        return await self.tombstones().fetch(pair, keys)


class Regions:
    """The regions an operator command works in, opened together and closed together."""

    def __init__(self, topology: Topology, regions: Sequence[str], profiles: dict[str, str] | None = None) -> None:
        self.ops = {r: RegionOps(topology, r, (profiles or {}).get(r)) for r in regions}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> dict[str, RegionOps]:
        for ops in self.ops.values():
            await self._stack.enter_async_context(ops.aws)
        return self.ops

    async def __aexit__(self, *exc: object) -> None:
        for ops in self.ops.values():
            await ops.close()
        await self._stack.aclose()


def put_record(pair: str, keys: Item, item: Item, version: Version, origin: str) -> ReplicationRecord:
    """The PUT that copies `item` as it is (its own version) to another region."""
    return ReplicationRecord("PUT", pair, keys, item, version, origin, "ops", time.time())


def parse_profiles(values: Sequence[str] | None, topology: Topology) -> dict[str, str]:
    """`--profile REGION=NAME` (repeatable): the AWS profile per region."""
    profiles = {}
    for value in values or []:
        region, sep, name = value.partition("=")
        if not sep or not name:
            raise StartupError(f"--profile: expected REGION=PROFILE, got {value!r}")
        if region not in topology.regions:
            raise StartupError(f"--profile: {region!r} is not in the topology")
        profiles[region] = name
    return profiles


def pick_pairs(topology: Topology, name: str | None) -> list[Pair]:
    if name is None:
        return list(topology.pairs)
    for pair in topology.pairs:
        if pair.name == name:
            return [pair]
    raise StartupError(f"--pair: {name!r} is not in the topology (pairs: {', '.join(p.name for p in topology.pairs)})")


class Progress:
    """A progress bar on a terminal, plain lines every few seconds otherwise (on stderr)."""

    def __init__(self, what: str, total: int | None = None, out: TextIO | None = None, every_s: float = 5.0) -> None:
        self.what, self.total, self.out, self.every_s = what, total, out or sys.stderr, every_s
        self.done = 0
        self.started = self.shown_at = time.monotonic()
        self.tty = self.out.isatty()

    def add(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            rate = self.done / max(now - self.started, 1e-6)
            if self.total:
                width = 30
                filled = int(width * min(1.0, self.done / self.total))
                bar = "#" * filled + "-" * (width - filled)
                self.out.write(f"\r{self.what} [{bar}] {self.done}/{self.total} {rate:,.0f}/s {note}   ")
            else:
                self.out.write(f"\r{self.what}: {self.done:,} {rate:,.0f}/s {note}   ")
            self.out.flush()
        elif now - self.shown_at >= self.every_s:
            self.shown_at = now
            rate = self.done / max(now - self.started, 1e-6)
            self.out.write(f"{self.what}: {self.done:,} done ({rate:,.0f}/s) {note}\n")
            self.out.flush()

    def close(self) -> float:
        elapsed = time.monotonic() - self.started
        if self.tty:
            self.out.write("\n")
        return elapsed
