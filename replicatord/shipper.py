"""The shipper: the processor of a pipeline that reads one peer's outbox (outbox.py) and puts its
records on the peer's stream.

An outbox holds replication records exactly as the peer's stream would have: the shipper puts them
unchanged, waiting as long as the peer does not answer (its lease and checkpoint keep the place;
the outbox keeps the records for its retention). What the peer refuses for its content goes the
per-record way (retry.py) with this pipeline's role, and `dlq redrive` puts such a letter on the
peer's stream again. Each accepted put tells the peer's route that the peer answers (DIVERTED ->
DRAINING); the daemon finds when the outbox is drained (Daemon._check_outboxes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from replicatord.aws import Aws
from replicatord.config import Tuning
from replicatord.dlq import DeadLetterQueue
from replicatord.errors import ReplicatorError
from replicatord.metrics import Metrics
from replicatord.outbox import Route
from replicatord.producer import KinesisProducer, Target
from replicatord.records import Entry
from replicatord.retry import Arrival, RecordRetry
from replicatord.sources import KinesisSource, shipper_role

log = logging.getLogger(__name__)


class OutboxCount:
    """How many records went into each outbox and were shipped from it, in the stats table (one item
    per pair and peer, `outbox/<pair>/<peer>`): the outbox's depth, the same for every instance of
    the region and across restarts. Best effort, as `replicated_count`: a count that cannot be
    written goes out with the next; a page replayed after a crash is counted in and out again."""

    def __init__(self, aws: Aws, table: str) -> None:
        self.aws = aws
        self.table = table
        self.unsent: Counter[tuple[str, str, str]] = Counter()  # (pair, peer, diverted|shipped) -> records
        self.writing = asyncio.Lock()

    @staticmethod
    def key(pair: str, peer: str) -> dict[str, Any]:
        return {"PK": {"S": f"outbox/{pair}/{peer}"}}

    def note(self, pair: str, peer: str, event: str, count: int) -> None:
        """Count records diverted into or shipped from an outbox; written by the next flush (no
        call on the page's path)."""
        self.unsent[pair, peer, event] += count

    async def flush(self) -> None:
        """Add what was noted since the last flush to the stats table; what cannot be written
        is kept for the next."""
        async with self.writing:
            for (p, q, e), n in list(self.unsent.items()):
                try:
                    await self.aws.call("dynamodb", "update_item", TableName=self.table, Key=self.key(p, q),
                                        UpdateExpression=f"ADD {e} :n", ExpressionAttributeValues={":n": {"N": str(n)}})
                except ReplicatorError as exc:
                    log.debug("cannot count the outbox of %s in %s: %s", q, self.table, exc)
                    return
                self.unsent[p, q, e] -= n
                if self.unsent[p, q, e] <= 0:
                    del self.unsent[p, q, e]

    async def depth(self, pair: str, peer: str) -> int:
        """Records put in the outbox and not yet shipped (as counted)."""
        item = (await self.aws.call("dynamodb", "get_item", TableName=self.table, Key=self.key(pair, peer))).get("Item")
        counts = {name: int((item or {}).get(name, {}).get("N", "0")) for name in ("diverted", "shipped")}
        return max(counts["diverted"] - counts["shipped"], 0)


class Shipper:
    def __init__(self, source: KinesisSource, pair: str, peer: str, stream: str, route: Route,
                 producer: KinesisProducer, metrics: Metrics, count: OutboxCount | None = None) -> None:
        self.count = count
        self.source = source
        self.pair = pair
        self.route = route
        self.target = Target(peer, stream)
        self.producer = producer
        self.metrics = metrics

    @classmethod
    def build(cls, source: KinesisSource, pair: str, peer: str, stream: str, route: Route, dlq: DeadLetterQueue,
              tuning: Tuning, metrics: Metrics, stop: asyncio.Event, count: OutboxCount | None = None) -> Shipper:
        retry = RecordRetry(pair, shipper_role(peer), dlq, tuning, metrics, stop)
        return cls(source, pair, peer, stream, route, KinesisProducer(source.aws, pair, retry, tuning, metrics, stop),
                   metrics, count)

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Put the page's records on the peer's stream; returns once the peer has every one (or
        one was dead-lettered). Raises Abandoned if stopping first."""
        outgoing = [(Entry(bytes(r["Data"]), str(r["PartitionKey"])),
                     Arrival(bytes(r["Data"]), self.source.created_s(r))) for r in records]
        await self.producer.put(self.target, outgoing, self.route, wait=True)
        self.metrics.outbox_records.labels(self.pair, self.target.peer, "shipped").inc(len(records))
        if self.count is not None:
            self.count.note(self.pair, self.target.peer, "shipped", len(records))
