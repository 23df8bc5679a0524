"""Reading stream shards: DynamoDB Streams and Kinesis behind one interface, a worker per shard.

A `ShardWorker` reads one shard from its checkpoint, hands each page of records to the
pipeline's processor, and checkpoints only after the processor succeeded, so a crash replays
at most the page in flight (at-least-once; apply is idempotent). Which shards an instance
reads is decided in pipeline.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from replicatord.aws import Aws
from replicatord.config import Tuning
from replicatord.errors import ExpiredIterator, InvalidRequest, LeaseLost, ReplicatorError, Transient, TrimmedData
from replicatord.leases import HeldLease, LeaseTable, shard_of
from replicatord.metrics import Metrics
from replicatord.records import creation_seconds
from replicatord.retry import Abandoned, backoff_s, sleep_or_stop

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Shard:
    id: str
    parent_ids: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    records: list[dict[str, Any]]
    next_iterator: str | None
    behind_s: float = 0.0  # Kinesis MillisBehindLatest, when the page is empty


async def run_together(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; if any fails, cancel the rest and raise its error itself (no group)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as failed:
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def poll(interval_s: float, stop: asyncio.Event) -> AsyncIterator[None]:
    """Drift-free ticks every `interval_s` until `stop` is set (arq's `poll`)."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        yield
        next_at += interval_s
        if await sleep_or_stop(stop, max(0.0, next_at - loop.time())):
            return


class StreamSource(Protocol):
    pipeline: str
    # Names this incarnation of the stream in lease keys: a stream that is deleted and created
    # again (or a DynamoDB stream disabled and enabled again) starts with fresh leases.
    stream: str

    async def list_shards(self) -> list[Shard]: ...
    async def get_iterator(self, shard_id: str, after: str | None) -> str: ...
    async def get_records(self, iterator: str, limit: int) -> Page: ...
    def sequence_number(self, record: dict[str, Any]) -> str: ...
    def created_s(self, record: dict[str, Any]) -> float: ...


class DynamoStreamSource:
    pipeline = "forwarder"

    def __init__(self, aws: Aws, table: str, stream_arn: str) -> None:
        self.aws = aws
        self.stream = f"{table}@{stream_arn.rsplit('/', 1)[-1]}"
        self.arn = stream_arn

    async def list_shards(self) -> list[Shard]:
        shards: list[Shard] = []
        kwargs: dict[str, Any] = {"StreamArn": self.arn}
        while True:
            result = await self.aws.call("dynamodbstreams", "describe_stream", **kwargs)
            desc = result["StreamDescription"]
            for s in desc.get("Shards", []):
                parent = s.get("ParentShardId")
                shards.append(Shard(s["ShardId"], (parent,) if parent else ()))
            last = desc.get("LastEvaluatedShardId")
            if not last:
                return shards
            kwargs["ExclusiveStartShardId"] = last

    async def get_iterator(self, shard_id: str, after: str | None) -> str:
        kwargs: dict[str, Any] = {"StreamArn": self.arn, "ShardId": shard_id}
        if after:
            kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber=after)
        else:
            kwargs.update(ShardIteratorType="TRIM_HORIZON")
        result = await self.aws.call("dynamodbstreams", "get_shard_iterator", **kwargs)
        return str(result["ShardIterator"])

    async def get_records(self, iterator: str, limit: int) -> Page:
        result = await self.aws.call(
            "dynamodbstreams", "get_records", ShardIterator=iterator, Limit=min(limit, 1000)
        )
        return Page(result.get("Records", []), result.get("NextShardIterator"))

    def sequence_number(self, record: dict[str, Any]) -> str:
        return str(record["dynamodb"]["SequenceNumber"])

    def created_s(self, record: dict[str, Any]) -> float:
        return float(creation_seconds(record["dynamodb"]["ApproximateCreationDateTime"]))


class KinesisSource:
    pipeline = "applier"

    def __init__(self, aws: Aws, stream: str, created: str) -> None:
        self.aws = aws
        self.name = stream
        self.stream = f"{stream}@{created}"

    async def list_shards(self) -> list[Shard]:
        shards: list[Shard] = []
        kwargs: dict[str, Any] = {"StreamName": self.name}
        while True:
            result = await self.aws.call("kinesis", "list_shards", **kwargs)
            for s in result.get("Shards", []):
                parents = tuple(p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p)
                shards.append(Shard(s["ShardId"], parents))
            token = result.get("NextToken")
            if not token:
                return shards
            kwargs = {"NextToken": token}

    async def get_iterator(self, shard_id: str, after: str | None) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.name, "ShardId": shard_id}
        if after:
            kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=after)
        else:
            kwargs.update(ShardIteratorType="TRIM_HORIZON")
        result = await self.aws.call("kinesis", "get_shard_iterator", **kwargs)
        return str(result["ShardIterator"])

    async def get_records(self, iterator: str, limit: int) -> Page:
        result = await self.aws.call("kinesis", "get_records", ShardIterator=iterator, Limit=limit)
        behind_s = float(result.get("MillisBehindLatest") or 0) / 1000
        return Page(result.get("Records", []), result.get("NextShardIterator"), behind_s)

    def sequence_number(self, record: dict[str, Any]) -> str:
        return str(record["SequenceNumber"])

    def created_s(self, record: dict[str, Any]) -> float:
        return float(creation_seconds(record["ApproximateArrivalTimestamp"]))


class Processor(Protocol):
    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Handle every record of the page: delivered downstream, skipped, or dead-lettered.
        Failures of single records are retried inside (retry.py); Abandoned if stopping."""
        ...


class ShardWorker:
    def __init__(
        self,
        pair: str,
        source: StreamSource,
        processor: Processor,
        leases: LeaseTable,
        held: HeldLease,
        tuning: Tuning,
        metrics: Metrics,
        stop: asyncio.Event,
    ) -> None:
        self.pair = pair
        self.source = source
        self.processor = processor
        self.leases = leases
        self.held = held
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.shard_id = shard_of(held.lease.key)

    async def run(self) -> bool:
        """Read the shard until stopped or its end; True if it was read to the end.

        When it stops for any other reason than a lost lease (stop event, abandoned page,
        cancellation after the drain bound), the lease is released so another instance can
        take it at once.
        """
        pipeline = self.source.pipeline
        release = True
        try:
            finished = await self._read()
            release = not finished
            return finished
        except LeaseLost as exc:
            release = False
            self.metrics.errors.labels(pipeline, exc.kind).inc()
            log.warning("%s %s: shard %s: %s; stopping this shard", pipeline, self.pair, self.shard_id, exc)
        except Abandoned:
            log.info("%s %s: shard %s: page in flight abandoned at shutdown; it will be replayed",
                     pipeline, self.pair, self.shard_id)
        except Exception:  # noqa: BLE001 - a bug must cost one shard a restart, never the daemon
            self.metrics.errors.labels(pipeline, "internal_error").inc()
            log.exception("%s %s: shard %s: worker failed; its lease is released and taken again",
                          pipeline, self.pair, self.shard_id)
        finally:
            self.metrics.forget_shard(self.pair, pipeline, self.shard_id)
            if release:
                await self._release()
        return False

    async def _read(self) -> bool:
        pipeline = self.source.pipeline
        iterator: str | None = None
        failures = 0
        idle_s = self.tuning.poll_interval_ms / 1000
        while not self.stop.is_set():
            try:
                if iterator is None:
                    iterator = await self.source.get_iterator(self.shard_id, self.held.lease.checkpoint)
                page = await self.source.get_records(iterator, self.tuning.get_records_limit)
                if page.records:
                    await self._deliver(page.records)
                if page.next_iterator is None:
                    await self.leases.checkpoint(self.held, None, finished=True)
                    log.info("%s %s: shard %s read to its end", pipeline, self.pair, self.shard_id)
                    return True
                iterator = page.next_iterator
                failures = 0
                if not page.records:
                    self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, page.behind_s)
                    await sleep_or_stop(self.stop, idle_s)
            except (ExpiredIterator, Transient, InvalidRequest) as exc:
                # A fresh iterator from the checkpoint: the old one expired or was refused.
                self.metrics.errors.labels(pipeline, exc.kind).inc()
                log.info("%s %s: shard %s: %s; new iterator from checkpoint", pipeline, self.pair, self.shard_id, exc)
                iterator = None
                failures += 1
                await sleep_or_stop(self.stop, backoff_s(failures, self.tuning))
            except TrimmedData as exc:
                self.metrics.errors.labels(pipeline, exc.kind).inc()
                log.error(  # noqa: TRY400 - one line for the operator, the cause is known
                    "%s %s: shard %s: checkpoint %s is older than the stream's retention; records "
                    "were trimmed before they were replicated: run 'replicatord verify --repair' or "
                    "'replicatord backfill' for this pair. Reading on from the oldest record.",
                    pipeline, self.pair, self.shard_id, self.held.lease.checkpoint,
                )
                self.metrics.trimmed.labels(self.pair, pipeline).inc()
                self.held.lease = replace(self.held.lease, checkpoint=None)
                iterator = None
            except LeaseLost:
                raise
            except ReplicatorError as exc:
                self.metrics.errors.labels(pipeline, exc.kind).inc()
                failures += 1
                log.warning("%s %s: shard %s: %s (retry %d)", pipeline, self.pair, self.shard_id, exc, failures)
                await sleep_or_stop(self.stop, backoff_s(failures, self.tuning))
        return False

    async def _release(self) -> None:
        try:
            await asyncio.wait_for(self.leases.release(self.held), RELEASE_TIMEOUT_S)
        except (ReplicatorError, TimeoutError) as exc:
            log.warning("%s %s: shard %s: cannot release the lease (it will expire): %s",
                        self.source.pipeline, self.pair, self.shard_id, exc or "timed out")

    async def _deliver(self, records: list[dict[str, Any]]) -> None:
        """Process a page until it succeeds, then checkpoint past it. Abandon it on stop."""
        pipeline = self.source.pipeline
        self.metrics.records_read.labels(self.pair, pipeline).inc(len(records))
        oldest = self.source.created_s(records[0])
        attempt = 0
        while True:
            # While a page is retried its first record keeps ageing: the gauge shows a stall.
            self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, time.time() - oldest)
            try:
                await self.processor.process(self.shard_id, records)
                break
            except (LeaseLost, Abandoned):
                raise
            except Exception as exc:  # noqa: BLE001 - records fail one by one inside; this is a bug
                # The processor handles every record's failure itself; what reaches here failed
                # outside any record. Run the page again rather than end the daemon.
                attempt += 1
                kind = exc.kind if isinstance(exc, ReplicatorError) else "internal_error"
                self.metrics.errors.labels(pipeline, kind).inc()
                log.error(  # noqa: TRY400 - a traceback only for what is not an AWS error
                    "%s %s: shard %s: page of %d records failed: %s (retry %d)",
                          pipeline, self.pair, self.shard_id, len(records), exc, attempt,
                          exc_info=not isinstance(exc, ReplicatorError))
                if await sleep_or_stop(self.stop, backoff_s(attempt, self.tuning)):
                    raise Abandoned from None
        newest = self.source.created_s(records[-1])
        self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, time.time() - newest)
        await self.leases.checkpoint(self.held, self.source.sequence_number(records[-1]))
