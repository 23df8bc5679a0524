"""Putting a pair's records on a peer's Kinesis stream: PutRecords in batches within Kinesis'
limits, until every entry is accepted or dead-lettered.

Only the entries the peer did not accept are sent again. A call that fails for the peer (errors.py:
`peer_trouble`: an outage, throttling, a refused key, a missing stream) is retried until it passes,
and a refused key pair is read from SSM again (`peer_keys`); one the peer refuses for its content
(invalid, or an unknown error) is split into single entries, and an entry refused on its own goes
the per-record way (retry.py). `replicatord_peer_reachable` says whether the peer last answered.
With an outbox (outbox.py), a put to the peer gives up once the peer's route is diverted and
hands back what is left, for the outbox; puts to the outbox itself are this region's Kinesis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from replicatord.aio import run_together
from replicatord.aws import Aws
from replicatord.backoff import backoff_s, sleep_or_stop
from replicatord.config import Tuning
from replicatord.errors import ReplicatorError
from replicatord.metrics import Metrics
from replicatord.outbox import Happened, Route
from replicatord.records import Entry, plan_batches
from replicatord.retry import Abandoned, Arrival, RecordRetry, Verdict, reason_of, verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where a pair's records for `peer` go: the peer's stream, or (`outbox`) the peer's outbox in
    this region (outbox.py)."""

    peer: str
    stream: str
    outbox: bool = False

    def __str__(self) -> str:
        return f"{self.peer} (outbox {self.stream})" if self.outbox else self.peer


class KinesisProducer:
    def __init__(self, aws: Aws, pair: str, retry: RecordRetry, tuning: Tuning, metrics: Metrics,
                 stop: asyncio.Event) -> None:
        self.aws = aws
        self.pair = pair
        self.retry = retry
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.entries_at_once = asyncio.Semaphore(tuning.apply_concurrency)  # single entries of a split batch

    async def put(self, target: Target, outgoing: list[tuple[Entry, Arrival]],
                  route: Route | None = None, wait: bool = False) -> list[tuple[Entry, Arrival]]:
        """PutRecords to `target` in batches within Kinesis' limits. With a `route` (a peer's
        stream while it has an outbox), its mode learns of every answer and failure, and once it
        is diverted the entries not yet accepted are returned instead of waiting for the peer,
        unless `wait` (the shipper: the peer's records are already in the outbox)."""
        pending = iter(outgoing)
        left: list[tuple[Entry, Arrival]] = []
        for batch in plan_batches(entry for entry, _ in outgoing):
            items = [next(pending) for _ in batch]
            left += items if left else await self._send(target, items, None if wait else route, route)
        return left

    def _client(self, target: Target) -> Any:
        return self.aws.local["kinesis"] if target.outbox else self.aws.peers[target.peer]

    def _accepted(self, target: Target, count: int, route: Route | None) -> None:
        if target.outbox:
            self.metrics.outbox_records.labels(self.pair, target.peer, "diverted").inc(count)
            return
        self.metrics.peer_reachable.labels(target.peer).set(1)
        self.metrics.records_forwarded.labels(self.pair, target.peer).inc(count)
        if route is not None:
            # A call whose every entry was refused (throttled) took nothing: the peer's trouble too.
            route.note(Happened.PUT_OK if count else Happened.PUT_FAILED)

    async def _send(self, target: Target, batch: list[tuple[Entry, Arrival]], divert: Route | None,
                    route: Route | None) -> list[tuple[Entry, Arrival]]:
        """Put `batch` on the target stream until every entry is accepted or dead-lettered (`route`
        learns of each answer); what is left once `divert` is diverted."""
        attempt = 0
        while batch:
            try:
                result = await self.aws.call(
                    "kinesis", "put_records", client=self._client(target), StreamName=target.stream,
                    Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e, _ in batch])
            except ReplicatorError as exc:
                attempt += 1
                outcome = await self._refused(target, batch, exc, attempt, route)
                if outcome == "done":
                    return []
                if outcome == "again":
                    continue
                reason, detail, failed = exc.kind, str(exc), len(batch)
            else:
                kept = [item for item, r in zip(batch, result["Records"], strict=True) if r.get("ErrorCode")]
                codes = {r["ErrorCode"] for r in result["Records"] if r.get("ErrorCode")}
                self._accepted(target, len(batch) - len(kept), route)
                if not kept:
                    return []
                attempt += 1
                reason = "throttled" if "ProvisionedThroughputExceededException" in codes else "put_failed"
                detail, failed, batch = ", ".join(sorted(codes)), len(kept), kept
            if divert is not None and divert.diverted():
                return batch  # the outbox takes them
            self.metrics.errors.labels(self.retry.role, reason).inc()
            log.warning("%s %s -> %s: %d records not accepted (%s); retry %d",
                        self.retry.role, self.pair, target, failed, detail, attempt)
            if await sleep_or_stop(self.stop, backoff_s(attempt, self.tuning)):
                raise Abandoned
        return []

    async def _refused(self, target: Target, batch: list[tuple[Entry, Arrival]], exc: ReplicatorError,
                       attempt: int, route: Route | None) -> str:
        """What a failed call means: "done" (split, or its one entry dead-lettered), "again" (a
        new key pair: at once), or "wait" (the peer's trouble: after a backoff)."""
        if exc.peer_trouble:
            if target.outbox:
                return "wait"  # this region's own Kinesis: it comes back
            self.metrics.peer_reachable.labels(target.peer).set(0)
            if route is not None:
                route.note(Happened.PUT_FAILED)
            return "again" if exc.peer_keys and await self.aws.refresh_peer(target.peer) else "wait"
        if not target.outbox:
            self.metrics.peer_reachable.labels(target.peer).set(1)  # it answered: the content is refused
        if len(batch) > 1:
            await run_together(self._send_one(target, item) for item in batch)
            return "done"
        entry, letter = batch[0]
        if verdict(exc, attempt, time.time() - letter.created_s, self.tuning) is Verdict.DEAD_LETTER:
            self.metrics.errors.labels(self.retry.role, reason_of(exc)).inc()
            await self.retry.dead_letter(reason_of(exc), f"put to {target}: {exc}", letter)
            return "done"
        return "wait"

    async def _send_one(self, target: Target, item: tuple[Entry, Arrival]) -> None:
        async with self.entries_at_once:
            await self._send(target, [item], None, None)
