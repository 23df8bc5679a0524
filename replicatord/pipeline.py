"""One stream of one pair (a forwarder or an applier): shard discovery, leases, shard workers.

Every `tuning.lease_take_interval_s` a pipeline syncs the lease table with the stream's shards
(every `shard_refresh_s`: a lease per new shard, with its parents; finished leases of shards
the stream no longer lists are deleted), reads all leases, and takes what `plan_leases` says:
free or expired leases up to an even share, else at most one stolen from the most loaded
instance. A child shard's lease is only taken once its parents' leases are finished, so each
item's changes stay in order across resharding and stream rollover. Held leases are renewed
every `renew_interval_s`; a lease that cannot be renewed (another instance took it, or renewal
kept failing for `failover_s`) stops its worker at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replicatord.aio import poll
from replicatord.budget import ByteBudget
from replicatord.config import Tuning
from replicatord.consumer import Processor, ShardConsumer
from replicatord.errors import LeaseLost, ReplicatorError
from replicatord.lease_table import HeldLease, LeaseTable
from replicatord.leases import (
    ACTIVE,
    FINISHED,
    LATEST,
    Lease,
    LeaseClock,
    lease_key,
    plan_leases,
    ready_leases,
    shard_of,
    stream_of,
)
from replicatord.metrics import Metrics
from replicatord.sources import StreamSource

log = logging.getLogger(__name__)


def renewal_deadline_s(tuning: Tuning) -> float:
    """How long one renewal (or any lease call) may take: half the failover time, so that a lease
    whose renewal hangs is still stopped by this instance before others may take it."""
    return tuning.failover_s / 2


class Pipeline:
    def __init__(
        self,
        pair: str,
        source: StreamSource,
        processor: Processor,
        leases: LeaseTable,
        owner: str,
        tuning: Tuning,
        metrics: Metrics,
        stop: asyncio.Event,
        initial_position: str | None = None,
    ) -> None:
        self.pair = pair
        # Where a stream this pipeline has no lease of starts: the oldest record left, or what is
        # written from now on (tuning.initial_position; a re-enabled stream always starts oldest).
        self.initial_position = initial_position or tuning.initial_position
        self.source = source
        self.processor = processor
        self.leases = leases
        self.owner = owner
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.name = f"{source.pipeline} {pair}"
        # Set when the stream was replaced (a DynamoDB stream disabled and enabled again): the
        # pipeline reads what is left of it and stops once every lease is finished.
        self.retiring = False
        self.done = False
        # Cleared while forwarding is paused (`replicatord pause`); shard workers wait on it.
        self.running = asyncio.Event()
        self.running.set()
        self._paused_before: list[str] = []
        self.region = ""  # set by the daemon for forwarders: the region whose changes they send
        # The daemon's page budget, shared by every shard worker (set by the daemon; else each
        # worker has one of its own).
        self.budget: ByteBudget | None = None
        self.workers: dict[str, tuple[HeldLease, asyncio.Task[bool]]] = {}
        self.clock = LeaseClock()
        self.cycle_ok_at = 0.0  # monotonic time of the last lease cycle that reached the table
        self._sync_at = 0.0
        self._group: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()  # set when a shard worker ends: run a lease cycle now
        self._holds_all = False  # the last cycle found every unfinished lease held here

    @property
    def held(self) -> int:
        return len(self.workers)

    def _key(self, shard_id: str) -> str:
        return lease_key(self.source.pipeline, self.source.stream, shard_id)

    @property
    def partition(self) -> str:
        """This pipeline's partition of the lease table (`leases.stream_of` its lease keys)."""
        return stream_of(self._key("-"))

    def healthy(self, now: float) -> bool:
        """The lease table was reached recently (within a cycle and the failover time) and every
        held lease was renewed in time."""
        failover_s = self.tuning.failover_s
        return now - self.cycle_ok_at < failover_s + self.cycle_interval_s() and all(
            now - held.renewed_at < failover_s for held, _ in self.workers.values()
        )

    async def run(self) -> None:
        gauge = self.metrics.leases_held.labels(self.pair, self.source.pipeline)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                renewing = group.create_task(self._renew_loop(), name=f"renew {self.name}")
                while not self.stop.is_set():
                    if self.done:
                        log.info("%s: stream %s read to its end; this pipeline stops", self.name, self.source.stream)
                        renewing.cancel()  # no lease is held: nothing to renew
                        break
                    self._wake.clear()
                    try:
                        await self._check_paused()
                        await self._cycle()
                    except ReplicatorError as exc:
                        self.metrics.errors.labels(self.source.pipeline, exc.kind).inc()
                        log.warning("%s: lease cycle failed: %s", self.name, exc)
                    except Exception:  # noqa: BLE001 - e.g. a lease item edited by hand: next cycle
                        self.metrics.errors.labels(self.source.pipeline, "internal_error").inc()
                        log.exception("%s: lease cycle failed", self.name)
                    gauge.set(self.held)
                    self.metrics.refresh_pending(self.pair, self.source.pipeline, self.source.retention_s, time.time())
                    await self._until_next_cycle()
        finally:
            gauge.set(0)

    async def _until_next_cycle(self) -> None:
        """Wait one lease cycle: `lease_take_interval_s`, or while this instance holds every
        lease of the stream, until the next shard sync (another instance that wants a share
        steals it, and this one learns at its next renewal). A shard worker that ends wakes
        the cycle at once (its children may start)."""
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.cycle_interval_s(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def cycle_interval_s(self) -> float:
        if self._holds_all:
            return max(self.tuning.lease_take_interval_s, self._sync_at - time.monotonic())
        return self.tuning.lease_take_interval_s

    # -- lease cycle -------------------------------------------------------------------------

    async def _check_paused(self) -> None:
        """A forwarder obeys `replicatord pause` within one lease cycle: its shard workers hold
        their position (and keep their leases) until `resume`."""
        if self.source.pipeline != "forwarder" or not self.region:
            return
        paused = await self.leases.paused(self.pair)
        mine = sorted(d for d in paused if d.split(":", 1)[0] == self.region)
        for direction in paused:
            self.metrics.paused.labels(self.pair, direction).set(1 if direction in mine else 0)
        if mine and self.running.is_set():
            self.running.clear()
            log.warning("%s: forwarding paused (%s): reading stops, positions and leases are kept",
                        self.name, ", ".join(mine))
        elif not mine and not self.running.is_set():
            self.running.set()
            for direction in self._paused_before:
                self.metrics.paused.labels(self.pair, direction).set(0)
            log.warning("%s: forwarding resumed", self.name)
        self._paused_before = mine

    async def _cycle(self) -> None:
        self._holds_all = False  # until this cycle shows otherwise
        finished_here = self._reap()
        now = time.monotonic()
        leases = None
        if finished_here or now >= self._sync_at:
            leases = await self._sync_shards()
            self._sync_at = now + self.tuning.shard_refresh_s
        if leases is None:
            leases = await self.leases.query(self.partition)
        self.cycle_ok_at = time.monotonic()
        self.clock.observe(leases, self.cycle_ok_at)
        expired = {
            lease.key for lease in leases
            if lease.owner != self.owner and self.clock.expired(lease, self.cycle_ok_at, self.tuning.failover_s)
        }
        if self.retiring and not self.workers and leases and all(lease.state == FINISHED for lease in leases):
            self.done = True
            return
        ready = ready_leases(leases)
        plan = plan_leases(leases, self.owner, expired, ready, set(self.workers))
        by_key = {lease.key: lease for lease in leases}
        for key in plan.take:
            await self._take(by_key[key], stolen=False)
        if plan.steal is not None:
            await self._take(by_key[plan.steal], stolen=True)
        self._holds_all = all(lease.state == FINISHED or lease.key in self.workers
                              or (lease.key not in ready and lease.owner in (None, self.owner)) for lease in leases)

    def _reap(self) -> bool:
        """Forget workers that ended; True if one read its shard to the end."""
        finished = False
        for key, (_, task) in list(self.workers.items()):
            if task.done():
                del self.workers[key]
                finished |= not task.cancelled() and task.result()
        return finished

    async def _sync_shards(self) -> list[Lease] | None:
        """Leases for new shards, finished leases of departed shards deleted. Returns the leases
        read (consistently) if nothing changed, else None."""
        shards = await self.source.list_shards()
        listed = {self._key(shard.id) for shard in shards}
        existing = {lease.key: lease for lease in await self.leases.query(self.partition, consistent=True)}
        first_start = not existing
        latest = first_start and self.initial_position == "latest"
        changed = False
        for shard in shards:  # listing order has parents before children
            key = self._key(shard.id)
            if key in existing:
                continue
            parents = tuple(self._key(p) for p in shard.parent_ids)
            if latest:  # a new deployment that starts with what is written from now on
                start = None if shard.closed else f"{LATEST}{int(time.time())}"
                created = await self.leases.create(key, parents, start, FINISHED if shard.closed else ACTIVE)
            else:
                created = await self.leases.create(key, parents)
            changed = True
            if not created:
                continue
            log.info("%s: new shard %s%s", self.name, shard.id,
                     f" (parents {', '.join(shard.parent_ids)})" if parents else "")
            unseen = [p for p, k in zip(shard.parent_ids, parents, strict=True)
                      if k not in listed and k not in existing]
            if unseen and not first_start:
                # Its parents left the stream before this pipeline ever saw them (it was stopped
                # for longer than the retention): their records were never read.
                self.metrics.lost_to_retention(self.pair, self.source.pipeline)
                log.error("%s: shard %s's parents %s left the stream before they were read: their records "
                          "were lost to the stream's retention; verify the pair and backfill up to this shard's "
                          "first record ('replicatord verify --repair', 'replicatord backfill')",
                          self.name, shard.id, ", ".join(unseen))
        for key, lease in existing.items():
            if lease.state == FINISHED and key not in listed:
                await self.leases.delete(lease)  # read to its end and gone from the stream
                changed = True
                log.info("%s: shard %s left the stream; its lease is deleted", self.name, shard_of(key))
        return None if changed else list(existing.values())

    async def _take(self, lease: Lease, stolen: bool) -> None:
        resumed = lease.owner == self.owner
        sent_at = time.monotonic()
        try:
            taken = await self.leases.take(lease, self.owner)
        except LeaseLost:
            return  # another instance was quicker; the next cycle sees the new state
        if stolen:
            self.metrics.lease_steals.labels(self.source.pipeline).inc()
        elif lease.owner is not None and not resumed:
            self.metrics.lease_takeovers.labels(self.source.pipeline).inc()
        how = "stole" if stolen else "resumed" if resumed else "took expired" if lease.owner else "took"
        log.info("%s: %s shard %s%s, reading from %s", self.name, how, shard_of(lease.key),
                 f" from {lease.owner}" if lease.owner and not resumed else "",
                 taken.checkpoint or "the oldest record")
        held = HeldLease(taken)
        held.renewed_at = sent_at
        worker = ShardConsumer(self.pair, self.source, self.processor, self.leases, held,
                             self.tuning, self.metrics, self.stop, self.running, self.budget)
        assert self._group is not None
        task = self._group.create_task(worker.run(), name=lease.key)
        task.add_done_callback(lambda _: self._wake.set())
        self.workers[lease.key] = (held, task)

    # -- renewal -----------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        """Renew every held lease at once, each within one renewal interval. A lease not renewed
        for `failover_s` less one interval is stopped by this instance's own clock: others count
        `failover_s` from a renewal they saw, which was sent no earlier than our last one."""
        interval_s = self.tuning.renew_interval_s
        async for _ in poll(interval_s, self.stop, aligned=True):  # every pipeline on the same ticks
            running = [(key, held, task) for key, (held, task) in list(self.workers.items()) if not task.done()]
            # Each renewal may take what its lease can still afford, and no more than half the
            # failover time: a renewal that hangs times out just when the shard must stop.
            budget_s = self.tuning.failover_s - interval_s
            now = time.monotonic()
            results = await asyncio.gather(
                *(asyncio.wait_for(self.leases.renew(held),
                                   max(0.05, min(renewal_deadline_s(self.tuning), budget_s - (now - held.renewed_at))))
                  for _, held, _ in running),
                return_exceptions=True,
            )
            now = time.monotonic()
            for (key, held, task), result in zip(running, results, strict=True):
                if isinstance(result, LeaseLost):
                    self._lost(key, task, "taken by another instance")
                    continue
                if isinstance(result, BaseException):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    kind = (result.kind if isinstance(result, ReplicatorError)
                            else "lease_timeout" if isinstance(result, TimeoutError) else "internal_error")
                    self.metrics.errors.labels(self.source.pipeline, kind).inc()
                    log.warning("%s: renewing the lease of shard %s failed: %s", self.name, shard_of(key),
                                result or type(result).__name__)
                if now - held.renewed_at >= budget_s:
                    self._lost(key, task, f"not renewed for {now - held.renewed_at:.1f}s")

    def _lost(self, key: str, task: asyncio.Task[bool], why: str) -> None:
        if task.done() or task.cancelling():
            return
        self.metrics.leases_lost.labels(self.source.pipeline).inc()
        log.warning("%s: lost the lease of shard %s (%s); stopping it", self.name, shard_of(key), why)
        task.cancel()
