"""Putting a pair's records on a peer's Kinesis stream: PutRecords in batches within Kinesis'
limits, until every entry is accepted or dead-lettered.

Only the entries the peer did not accept are sent again. A call that fails for the peer (errors.py:
`peer_trouble`: an outage, throttling, a refused key, a missing stream) is retried until it passes,
and a refused key pair is read from SSM again (`peer_keys`); one the peer refuses for its content
(invalid, or an unknown error) is split into single entries, and an entry refused on its own goes
the per-record way (retry.py). `replicatord_peer_reachable` says whether the peer last answered.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replicatord.aio import run_together
from replicatord.aws import Aws
from replicatord.backoff import backoff_s, sleep_or_stop
from replicatord.config import Tuning
from replicatord.errors import ReplicatorError
from replicatord.metrics import Metrics
from replicatord.records import Entry, plan_batches
from replicatord.retry import Abandoned, Arrival, RecordRetry, Verdict, reason_of, verdict

log = logging.getLogger(__name__)


class KinesisProducer:
    def __init__(self, aws: Aws, pair: str, peers: dict[str, str], retry: RecordRetry, tuning: Tuning,
                 metrics: Metrics, stop: asyncio.Event) -> None:
        """`peers`: peer region -> its Kinesis stream (the clients are `aws.peers`)."""
        self.aws = aws
        self.pair = pair
        self.peers = peers
        self.retry = retry
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.entries_at_once = asyncio.Semaphore(tuning.apply_concurrency)  # single entries of a split batch

    async def put(self, peer: str, outgoing: list[tuple[Entry, Arrival]]) -> None:
        """PutRecords to `peer` in batches within Kinesis' limits."""
        pending = iter(outgoing)
        for batch in plan_batches(entry for entry, _ in outgoing):
            await self._send(peer, [next(pending) for _ in batch])

    async def _send(self, peer: str, batch: list[tuple[Entry, Arrival]]) -> None:
        """Put `batch` on the peer's stream until every entry is accepted or dead-lettered."""
        attempt = 0
        while batch:
            try:
                result = await self.aws.call(
                    "kinesis", "put_records", client=self.aws.peers[peer], StreamName=self.peers[peer],
                    Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e, _ in batch])
            except ReplicatorError as exc:
                attempt += 1
                outcome = await self._refused(peer, batch, exc, attempt)
                if outcome == "done":
                    return
                if outcome == "again":
                    continue
                reason, detail, failed = exc.kind, str(exc), len(batch)
            else:
                self.metrics.peer_reachable.labels(peer).set(1)
                kept = [item for item, r in zip(batch, result["Records"], strict=True) if r.get("ErrorCode")]
                codes = {r["ErrorCode"] for r in result["Records"] if r.get("ErrorCode")}
                self.metrics.records_forwarded.labels(self.pair, peer).inc(len(batch) - len(kept))
                if not kept:
                    return
                attempt += 1
                reason = "throttled" if "ProvisionedThroughputExceededException" in codes else "put_failed"
                detail, failed, batch = ", ".join(sorted(codes)), len(kept), kept
            self.metrics.errors.labels("forwarder", reason).inc()
            log.warning("forwarder %s -> %s: %d records not accepted (%s); retry %d",
                        self.pair, peer, failed, detail, attempt)
            if await sleep_or_stop(self.stop, backoff_s(attempt, self.tuning)):
                raise Abandoned

    async def _refused(self, peer: str, batch: list[tuple[Entry, Arrival]], exc: ReplicatorError,
                       attempt: int) -> str:
        """What a failed call means: "done" (split, or its one entry dead-lettered), "again" (a
        new key pair: at once), or "wait" (the peer's trouble: after a backoff)."""
        if exc.peer_trouble:
            self.metrics.peer_reachable.labels(peer).set(0)
            return "again" if exc.peer_keys and await self.aws.refresh_peer(peer) else "wait"
        self.metrics.peer_reachable.labels(peer).set(1)  # it answered: the content is refused
        if len(batch) > 1:
            await run_together(self._send_one(peer, item) for item in batch)
            return "done"
        entry, letter = batch[0]
        if verdict(exc, attempt, time.time() - letter.created_s, self.tuning) is Verdict.DEAD_LETTER:
            self.metrics.errors.labels("forwarder", reason_of(exc)).inc()
            await self.retry.dead_letter(reason_of(exc), f"put to {peer}: {exc}", letter)
            return "done"
        return "wait"

    async def _send_one(self, peer: str, item: tuple[Entry, Arrival]) -> None:
        async with self.entries_at_once:
            await self._send(peer, [item])
