"""One stream of one pair, in one role (forwarder or applier): leases taken, shard consumers run.

Every `tuning.lease_take_interval_s` a pipeline syncs its leases with the stream's shards (every
`shard_refresh_s`, shard_sync.py), reads all leases, and takes what `plan_leases` says: free or
expired leases up to an even share, else at most one stolen from the most loaded instance. A
child shard's lease is only taken once its parents' leases are finished, so each item's changes
stay in order across resharding and stream rollover. Its `Renewer` (renewal.py) renews the
leases held every `renew_interval_s`, and stops a shard's consumer at once when its lease is
lost or was not renewed for `failover_s` less one renewal interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from replicatord.budget import ByteBudget
from replicatord.config import Tuning
from replicatord.consumer import Processor, ShardConsumer
from replicatord.errors import LeaseLost, ReplicatorError
from replicatord.lease_table import HeldLease, LeaseTable
from replicatord.leases import FINISHED, Lease, LeaseClock, plan_leases, ready_leases, shard_of
from replicatord.metrics import Metrics
from replicatord.outbox import Happened, Route
from replicatord.renewal import RenewalBatcher, Renewer
from replicatord.shard_sync import ShardSync
from replicatord.sources import StreamSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shared:
    """What every pipeline of a daemon shares."""

    leases: LeaseTable
    renewals: RenewalBatcher
    owner: str  # this instance's id, the owner of the leases it takes
    region: str
    tuning: Tuning
    metrics: Metrics
    stop: asyncio.Event
    budget: ByteBudget | None = None  # pages read and not yet handled (else each consumer has one)


class PauseWatch:
    """A pipeline obeys `replicatord pause` within one lease cycle: its shard consumers hold
    their position (and keep their leases) until `resume`. Without an outbox that is the
    forwarder, for every direction from this region; with one, the shipper of `peer`'s outbox,
    and the peer's `route` diverts the forwarder's records to the outbox meanwhile."""

    def __init__(self, name: str, pair: str, shared: Shared, peer: str | None = None,
                 route: Route | None = None) -> None:
        self.name = name
        self.pair = pair
        self.shared = shared
        self.peer = peer
        self.route = route
        self.running = asyncio.Event()  # cleared while paused; shard consumers wait on it
        self.running.set()
        self._paused_before: list[str] = []

    def _mine(self, direction: str) -> bool:
        source, _, target = direction.partition(":")
        return source == self.shared.region and self.peer in (None, target)

    async def check(self) -> None:
        metrics = self.shared.metrics
        paused = await self.shared.leases.paused(self.pair)
        mine = sorted(d for d in paused if self._mine(d))
        for direction in paused:
            if self.peer is None or direction in mine:
                metrics.paused.labels(self.pair, direction).set(1 if direction in mine else 0)
        if mine and self.running.is_set():
            self.running.clear()
            if self.route is not None:
                self.route.note(Happened.PAUSED)
            log.warning("%s: paused (%s): reading stops, positions and leases are kept%s", self.name,
                        ", ".join(mine), "; records for the peer wait in its outbox" if self.route else "")
        elif not mine and not self.running.is_set():
            self.running.set()
            if self.route is not None:
                self.route.note(Happened.RESUMED)
            for direction in self._paused_before:
                metrics.paused.labels(self.pair, direction).set(0)
            log.warning("%s: resumed", self.name)
        self._paused_before = mine


class Pipeline:
    def __init__(self, pair: str, source: StreamSource, processor: Processor, shared: Shared, *,
                 initial_position: str | None = None, retiring: bool = False,
                 pause: PauseWatch | None = None) -> None:
        self.pair = pair
        self.source = source
        self.processor = processor
        self.shared = shared
        self.tuning = shared.tuning
        self.name = f"{source.role} {pair}"
        # Where a stream this pipeline has no lease of starts: the oldest record left, or what is
        # written from now on (tuning.initial_position; a re-enabled stream always starts oldest).
        self.shards = ShardSync(self.name, pair, source, shared.leases, shared.metrics,
                                initial_position or shared.tuning.initial_position)
        # A replaced stream (a DynamoDB stream disabled and enabled again): the pipeline reads
        # what is left of it and stops once every lease is finished.
        self.retiring = retiring
        self.done = False
        self.pause = pause
        self.consumers: dict[str, tuple[HeldLease, asyncio.Task[bool]]] = {}
        self.renewer = Renewer(self.name, source.role, shared.renewals, shared.tuning, shared.metrics, self._running)
        self.clock = LeaseClock()
        self.cycle_ok_at = 0.0  # monotonic time of the last lease cycle that reached the table
        self._sync_at = 0.0
        self._group: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()  # set when a shard consumer ends: run a lease cycle now
        self._holds_all = False  # the last cycle found every unfinished lease held here

    @property
    def held_count(self) -> int:
        return len(self.consumers)

    def _running(self) -> list[tuple[str, HeldLease, asyncio.Task[bool]]]:
        return [(key, held, task) for key, (held, task) in list(self.consumers.items()) if not task.done()]

    def healthy(self, now: float) -> bool:
        """The lease table was reached recently (within a cycle and the failover time) and every
        held lease was renewed in time."""
        failover_s = self.tuning.failover_s
        return now - self.cycle_ok_at < failover_s + self.cycle_interval_s() and all(
            now - held.renewed_at < failover_s for held, _ in self.consumers.values()
        )

    async def run(self) -> None:
        metrics, stop, role = self.shared.metrics, self.shared.stop, self.source.role
        gauge = metrics.leases_held.labels(self.pair, role)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                renewing = group.create_task(self.renewer.run(stop), name=f"renew {self.name}")
                while not stop.is_set():
                    if self.done:
                        log.info("%s: stream %s read to its end; this pipeline stops", self.name,
                                 self.source.incarnation)
                        renewing.cancel()  # no lease is held: nothing to renew
                        break
                    self._wake.clear()
                    try:
                        if self.pause is not None:
                            await self.pause.check()
                        await self._cycle()
                    except ReplicatorError as exc:
                        metrics.errors.labels(role, exc.kind).inc()
                        log.warning("%s: lease cycle failed: %s", self.name, exc)
                    except Exception:  # noqa: BLE001 - e.g. a lease item edited by hand: next cycle
                        metrics.errors.labels(role, "internal_error").inc()
                        log.exception("%s: lease cycle failed", self.name)
                    gauge.set(self.held_count)
                    metrics.refresh_pending(self.pair, role, self.source.retention_s, time.time())
                    await self._until_next_cycle()
        finally:
            gauge.set(0)

    async def _until_next_cycle(self) -> None:
        """Wait one lease cycle: `lease_take_interval_s`, or while this instance holds every
        lease of the stream, until the next shard sync (another instance that wants a share
        steals it, and this one learns at its next renewal). A shard consumer that ends wakes
        the cycle at once (its children may start)."""
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.shared.stop.wait())]
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

    async def _cycle(self) -> None:
        self._holds_all = False  # until this cycle shows otherwise
        finished_here = self._reap()
        now = time.monotonic()
        leases = None
        if finished_here or now >= self._sync_at:
            leases = await self.shards.sync()
            self._sync_at = now + self.tuning.shard_refresh_s
        if leases is None:
            leases = await self.shared.leases.query(self.shards.partition)
        self.cycle_ok_at = time.monotonic()
        self.clock.observe(leases, self.cycle_ok_at)
        owner = self.shared.owner
        expired = {
            lease.key for lease in leases
            if lease.owner != owner and self.clock.expired(lease, self.cycle_ok_at, self.tuning.failover_s)
        }
        if self.retiring and not self.consumers and leases and all(lease.state == FINISHED for lease in leases):
            self.done = True
            return
        ready = ready_leases(leases)
        plan = plan_leases(leases, owner, expired, ready, set(self.consumers))
        by_key = {lease.key: lease for lease in leases}
        for key in plan.take:
            await self._take(by_key[key], stolen=False)
        if plan.steal is not None:
            await self._take(by_key[plan.steal], stolen=True)
        self._holds_all = all(lease.state == FINISHED or lease.key in self.consumers
                              or (lease.key not in ready and lease.owner in (None, owner)) for lease in leases)

    def _reap(self) -> bool:
        """Forget consumers that ended; True if one read its shard to the end."""
        finished = False
        for key, (_, task) in list(self.consumers.items()):
            if task.done():
                del self.consumers[key]
                finished |= not task.cancelled() and task.result()
        return finished

    async def _take(self, lease: Lease, stolen: bool) -> None:
        shared, role = self.shared, self.source.role
        resumed = lease.owner == shared.owner
        sent_at = time.monotonic()
        try:
            taken = await shared.leases.take(lease, shared.owner)
        except LeaseLost:
            return  # another instance was quicker; the next cycle sees the new state
        if stolen:
            shared.metrics.lease_steals.labels(role).inc()
        elif lease.owner is not None and not resumed:
            shared.metrics.lease_takeovers.labels(role).inc()
        how = "stole" if stolen else "resumed" if resumed else "took expired" if lease.owner else "took"
        log.info("%s: %s shard %s%s, reading from %s", self.name, how, shard_of(lease.key),
                 f" from {lease.owner}" if lease.owner and not resumed else "",
                 taken.checkpoint or "the oldest record")
        held = HeldLease(taken)
        held.renewed_at = sent_at
        running = self.pause.running if self.pause is not None else None
        consumer = ShardConsumer(self.pair, self.source, self.processor, shared.leases, held, self.tuning,
                                 shared.metrics, shared.stop, running, shared.budget)
        assert self._group is not None
        task = self._group.create_task(consumer.run(), name=lease.key)
        task.add_done_callback(lambda _: self._wake.set())
        self.consumers[lease.key] = (held, task)
