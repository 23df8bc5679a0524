"""Lease renewal: one pipeline's renewer, and the batcher that lets all of them share calls.

Every `renew_interval_s` (every pipeline of the instance on the same ticks) a pipeline's
`Renewer` asks to renew each lease it holds. The `RenewalBatcher` gathers what is asked for
within RENEW_GATHER_S into TransactWriteItems calls of up to 100 leases; a refused transaction
(a lease is no longer ours) is followed by one renewal per lease, which says which. A lease not
renewed for `failover_s` less one interval is stopped by this instance's own clock: others count
`failover_s` from a renewal they saw, which was sent no earlier than our last one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from replicatord.aio import poll
from replicatord.config import Tuning
from replicatord.errors import LeaseLost, ReplicatorError
from replicatord.lease_table import TRANSACTION_ITEMS, HeldLease, LeaseTable
from replicatord.leases import shard_of
from replicatord.metrics import Metrics

log = logging.getLogger(__name__)

# Renewals asked for this close together share one call.
RENEW_GATHER_S = 0.02


def renewal_deadline_s(tuning: Tuning) -> float:
    """How long one renewal (or any lease call) may take: half the failover time, so that a lease
    whose renewal hangs is still stopped by this instance before others may take it."""
    return tuning.failover_s / 2


class RenewalBatcher:
    """Gathers the renewals of every pipeline of the daemon. `run` is the one task that sends
    them; `renew` waits for a lease's turn."""

    def __init__(self, leases: LeaseTable) -> None:
        self.leases = leases
        self._waiting: list[tuple[HeldLease, asyncio.Future[None]]] = []
        self._asked = asyncio.Event()

    async def renew(self, held: HeldLease) -> None:
        """Renew `held` with whatever else is asked for now (LeaseLost if it is no longer ours)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((held, future))
        self._asked.set()
        await future

    async def run(self, stop: asyncio.Event) -> None:
        """Send gathered renewals until `stop`, and what was asked for before it."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                asked = asyncio.ensure_future(self._asked.wait())
                await asyncio.wait([asked, stopping], return_when=asyncio.FIRST_COMPLETED)
                asked.cancel()
                if not self._waiting and stop.is_set():
                    return
                await asyncio.sleep(RENEW_GATHER_S)
                self._asked.clear()
                gathered, self._waiting = self._waiting, []
                try:
                    await self._send(gathered)
                except Exception as exc:  # noqa: BLE001 - each waiting renewer gets it, and goes on
                    log.exception("renewing %d leases failed", len(gathered))
                    for _, future in gathered:
                        if not future.done():
                            future.set_exception(exc)
        finally:
            stopping.cancel()

    async def _send(self, gathered: list[tuple[HeldLease, asyncio.Future[None]]]) -> None:
        waiting = {id(held): (held, future) for held, future in gathered if not future.done()}
        # A lease whose lock is taken is being checkpointed (which renews it too): it waits alone.
        alone = [pair for pair in waiting.values() if pair[0].lock.locked()]
        together = sorted((pair for pair in waiting.values() if not pair[0].lock.locked()),
                          key=lambda pair: pair[0].lease.key)
        await asyncio.gather(*(_settle(future, self.leases.renew(held)) for held, future in alone),
                             *(self._send_together(together[i:i + TRANSACTION_ITEMS])
                               for i in range(0, len(together), TRANSACTION_ITEMS)))

    async def _send_together(self, batch: list[tuple[HeldLease, asyncio.Future[None]]]) -> None:
        if len(batch) > 1 and await self.leases.renew_together([held for held, _ in batch]):
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            return
        await asyncio.gather(*(_settle(future, self.leases.renew(held)) for held, future in batch))


async def _settle(future: asyncio.Future[None], work: Awaitable[None]) -> None:
    try:
        await work
    except Exception as exc:  # noqa: BLE001 - handed to the waiting renewer
        if not future.done():
            future.set_exception(exc)
    else:
        if not future.done():
            future.set_result(None)


class Renewer:
    """Renews the leases one pipeline holds, each within one renewal interval, and stops the shard
    of a lease that is lost or was not renewed in time."""

    def __init__(self, name: str, role: str, renewals: RenewalBatcher, tuning: Tuning, metrics: Metrics,
                 held: Callable[[], list[tuple[str, HeldLease, asyncio.Task[bool]]]]) -> None:
        self.name = name
        self.role = role
        self.renewals = renewals
        self.tuning = tuning
        self.metrics = metrics
        self.held = held  # the pipeline's running shard consumers: (lease key, lease, task)

    async def run(self, stop: asyncio.Event) -> None:
        interval_s = self.tuning.renew_interval_s
        async for _ in poll(interval_s, stop, aligned=True):  # every pipeline on the same ticks
            running = self.held()
            # Each renewal may take what its lease can still afford, and no more than half the
            # failover time: a renewal that hangs times out just when the shard must stop.
            budget_s = self.tuning.failover_s - interval_s
            now = time.monotonic()
            results = await asyncio.gather(
                *(asyncio.wait_for(self.renewals.renew(held),
                                   max(0.05, min(renewal_deadline_s(self.tuning), budget_s - (now - held.renewed_at))))
                  for _, held, _ in running),
                return_exceptions=True,
            )
            now = time.monotonic()
            for (key, held, task), result in zip(running, results, strict=True):
                if isinstance(result, LeaseLost):
                    self.lost(key, task, "taken by another instance")
                    continue
                if isinstance(result, BaseException):
                    self._failed(key, result)
                if now - held.renewed_at >= budget_s:
                    self.lost(key, task, f"not renewed for {now - held.renewed_at:.1f}s")

    def _failed(self, key: str, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError):
            raise error
        kind = (error.kind if isinstance(error, ReplicatorError)
                else "lease_timeout" if isinstance(error, TimeoutError) else "internal_error")
        self.metrics.errors.labels(self.role, kind).inc()
        log.warning("%s: renewing the lease of shard %s failed: %s", self.name, shard_of(key),
                    error or type(error).__name__)

    def lost(self, key: str, task: asyncio.Task[bool], why: str) -> None:
        if task.done() or task.cancelling():
            return
        self.metrics.leases_lost.labels(self.role).inc()
        log.warning("%s: lost the lease of shard %s (%s); stopping it", self.name, shard_of(key), why)
        task.cancel()
