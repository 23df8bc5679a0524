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
from typing import Any

from replicatord.config import Tuning
from replicatord.dlq import DeadLetterQueue
from replicatord.metrics import Metrics
from replicatord.outbox import Route
from replicatord.producer import KinesisProducer, Target
from replicatord.records import Entry
from replicatord.retry import Arrival, RecordRetry
from replicatord.sources import KinesisSource, shipper_role


class Shipper:
    def __init__(self, source: KinesisSource, pair: str, peer: str, stream: str, route: Route,
                 producer: KinesisProducer, metrics: Metrics) -> None:
        self.source = source
        self.pair = pair
        self.route = route
        self.target = Target(peer, stream)
        self.producer = producer
        self.metrics = metrics

    @classmethod
    def build(cls, source: KinesisSource, pair: str, peer: str, stream: str, route: Route, dlq: DeadLetterQueue,
              tuning: Tuning, metrics: Metrics, stop: asyncio.Event) -> Shipper:
        retry = RecordRetry(pair, shipper_role(peer), dlq, tuning, metrics, stop)
        return cls(source, pair, peer, stream, route, KinesisProducer(source.aws, pair, retry, tuning, metrics, stop),
                   metrics)

    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Put the page's records on the peer's stream; returns once the peer has every one (or
        one was dead-lettered). Raises Abandoned if stopping first."""
        outgoing = [(Entry(bytes(r["Data"]), str(r["PartitionKey"])),
                     Arrival(bytes(r["Data"]), self.source.created_s(r))) for r in records]
        await self.producer.put(self.target, outgoing, self.route, wait=True)
        self.metrics.outbox_records.labels(self.pair, self.target.peer, "shipped").inc(len(records))
