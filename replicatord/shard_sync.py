"""Keeping a pipeline's leases in step with its stream's shards (KCL's shard syncer).

A lease per new shard, naming its parents (listing order has parents before children); finished
leases of shards the stream no longer lists are deleted. A new deployment whose initial position
is `latest` starts each open shard at the time of its first sync; a shard whose parents left the
stream before they were ever read is reported as records lost to the stream's retention.
"""

from __future__ import annotations

import logging
import time

from replicatord.lease_table import LeaseTable
from replicatord.leases import ACTIVE, FINISHED, LATEST, Lease, lease_key, partition_of, shard_of
from replicatord.metrics import Metrics
from replicatord.sources import Shard, StreamSource

log = logging.getLogger(__name__)


class ShardSync:
    def __init__(self, name: str, pair: str, source: StreamSource, leases: LeaseTable, metrics: Metrics,
                 initial_position: str) -> None:
        self.name = name
        self.pair = pair
        self.source = source
        self.leases = leases
        self.metrics = metrics
        self.initial_position = initial_position

    def key(self, shard_id: str) -> str:
        return lease_key(self.source.role, self.source.incarnation, shard_id)

    @property
    def partition(self) -> str:
        """The pipeline's partition of the lease table (`leases.partition_of` its lease keys)."""
        return partition_of(self.key("-"))

    async def sync(self) -> list[Lease] | None:
        """Leases for new shards, finished leases of departed shards deleted. Returns the leases
        read (consistently) if nothing changed, else None."""
        shards = await self.source.list_shards()
        listed = {self.key(shard.id) for shard in shards}
        existing = {lease.key: lease for lease in await self.leases.query(self.partition, consistent=True)}
        first_start = not existing
        changed = False
        for shard in shards:  # listing order has parents before children
            if self.key(shard.id) not in existing:
                changed = True
                await self._new_shard(shard, first_start, listed, existing)
        for key, lease in existing.items():
            if lease.state == FINISHED and key not in listed:
                await self.leases.delete(lease)  # read to its end and gone from the stream
                changed = True
                log.info("%s: shard %s left the stream; its lease is deleted", self.name, shard_of(key))
        return None if changed else list(existing.values())

    async def _new_shard(self, shard: Shard, first_start: bool, listed: set[str], existing: dict[str, Lease]) -> None:
        key = self.key(shard.id)
        parents = tuple(self.key(p) for p in shard.parent_ids)
        if first_start and self.initial_position == "latest":  # a new deployment: what is written from now on
            start = None if shard.closed else f"{LATEST}{int(time.time())}"
            created = await self.leases.create(key, parents, start, FINISHED if shard.closed else ACTIVE)
        else:
            created = await self.leases.create(key, parents)
        if not created:
            return  # another instance was quicker
        log.info("%s: new shard %s%s", self.name, shard.id,
                 f" (parents {', '.join(shard.parent_ids)})" if parents else "")
        unseen = [p for p, k in zip(shard.parent_ids, parents, strict=True) if k not in listed and k not in existing]
        if unseen and not first_start:
            # Its parents left the stream before this pipeline ever saw them (it was stopped for
            # longer than the retention): their records were never read.
            self.metrics.lost_to_retention(self.pair, self.source.role)
            log.error("%s: shard %s's parents %s left the stream before they were read: their records "
                      "were lost to the stream's retention; verify the pair and backfill up to this shard's "
                      "first record ('replicatord verify --repair', 'replicatord backfill')",
                      self.name, shard.id, ", ".join(unseen))
