"""Reading stream shards: DynamoDB Streams and Kinesis behind one interface, a worker per shard.

A `ShardWorker` reads one shard from its checkpoint, hands each page of records to the
pipeline's processor, and checkpoints only after the processor succeeded, so a crash replays
at most the page in flight (at-least-once; apply is idempotent). Which shards an instance
reads is decided in pipeline.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from replicatord.aws import Aws
from replicatord.backoff import backoff_s, sleep_or_stop
from replicatord.budget import ByteBudget, Hold
from replicatord.config import Tuning
from replicatord.errors import (
    ExpiredIterator,
    InvalidRequest,
    LeaseLost,
    NotFound,
    ReplicatorError,
    Transient,
    TrimmedData,
)
from replicatord.leases import HeldLease, LeaseTable, latest_since, shard_of
from replicatord.metrics import Metrics
from replicatord.records import creation_seconds
from replicatord.retry import Abandoned

log = logging.getLogger(__name__)

T = TypeVar("T")

RELEASE_TIMEOUT_S = 2.0
# Kinesis, from a checkpoint past its retention: GetShardIterator(AFTER_SEQUENCE_NUMBER) succeeds
# and GetRecords answers empty pages with MillisBehindLatest stuck at the retention (reported by
# Kinesis consumers; docs/aws-behaviour.md). An empty page this close to the retention, before
# any record came from the checkpoint, that many times in a row, means the checkpoint was trimmed.
TRIM_EDGE = 0.95
TRIM_EDGE_PAGES = 2
# A shard that found nothing for this long is read every `idle_poll_interval_ms`.
IDLE_AFTER_S = 10.0


@dataclass(frozen=True)
class Shard:
    id: str
    parent_ids: tuple[str, ...]
    closed: bool = False  # it has an ending sequence number: no record will be added


@dataclass(frozen=True)
class Page:
    records: list[dict[str, Any]]
    next_iterator: str | None
    behind_s: float = 0.0  # Kinesis MillisBehindLatest, when the page is empty
    hold: Hold = field(default_factory=Hold)  # its bytes in the daemon's page budget


async def run_together(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently and return their results in order; if any fails, cancel the rest and
    raise its error itself (no group)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
        return [task.result() for task in tasks]
    except BaseExceptionGroup as failed:
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def poll(interval_s: float, stop: asyncio.Event, aligned: bool = False) -> AsyncIterator[None]:
    """Drift-free ticks every `interval_s` until `stop` is set (arq's `poll`). `aligned`: on
    multiples of `interval_s` of the loop's clock, so that loops of one process tick together."""
    loop = asyncio.get_running_loop()
    next_at = math.ceil(loop.time() / interval_s) * interval_s if aligned else loop.time()
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
    # Whether an iterator from a trimmed position silently starts at the oldest record left
    # (Kinesis) instead of being refused with TrimmedDataAccessException (DynamoDB Streams).
    silent_trim: bool
    retention_s: float  # how long a record stays in the stream
    max_page_bytes: int  # the most one GetRecords can answer

    def page_bytes(self, records: list[dict[str, Any]]) -> int:
        """What a page of `records` holds, about."""
        ...

    def min_read_interval_ms(self, tuning: Tuning) -> int:
        """The least time between two reads of one shard while records come."""
        ...

    async def list_shards(self) -> list[Shard]: ...
    async def get_iterator(self, shard_id: str, after: str | None) -> str: ...

    async def get_iterator_since(self, shard_id: str, since_s: float) -> str:
        """An iterator at the first record written at or after `since_s`, or before it where the
        stream cannot position by time (the reader skips what is older)."""
        ...
    async def get_records(self, iterator: str, limit: int) -> Page: ...
    def sequence_number(self, record: dict[str, Any]) -> str: ...
    def created_s(self, record: dict[str, Any]) -> float: ...


class DynamoStreamSource:
    pipeline = "forwarder"
    silent_trim = False
    retention_s = 24 * 3600.0  # fixed for DynamoDB Streams
    max_page_bytes = 1024 * 1024  # GetRecords answers 1 MB at most

    def page_bytes(self, records: list[dict[str, Any]]) -> int:
        # Parsed by botocore already; an item is 400 KB at most, and the page 1 MB.
        return min(self.max_page_bytes, 2048 * len(records))

    def __init__(self, aws: Aws, table: str, stream_arn: str) -> None:
        self.aws = aws
        self.stream = f"{table}@{stream_arn.rsplit('/', 1)[-1]}"
        self.arn = stream_arn

    def min_read_interval_ms(self, tuning: Tuning) -> int:
        # No per-second read limit on DynamoDB Streams (at most two readers per shard).
        return tuning.stream_read_interval_ms

    async def list_shards(self) -> list[Shard]:
        shards: list[Shard] = []
        kwargs: dict[str, Any] = {"StreamArn": self.arn}
        while True:
            result = await self.aws.call("dynamodbstreams", "describe_stream", **kwargs)
            desc = result["StreamDescription"]
            for s in desc.get("Shards", []):
                parent = s.get("ParentShardId")
                closed = "EndingSequenceNumber" in s.get("SequenceNumberRange", {})
                shards.append(Shard(s["ShardId"], (parent,) if parent else (), closed))
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

    async def get_iterator_since(self, shard_id: str, since_s: float) -> str:
        # DynamoDB Streams has no AT_TIMESTAMP: from the oldest record (at most 24 hours of them).
        return await self.get_iterator(shard_id, None)

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
    silent_trim = True
    max_page_bytes = 10 * 1024 * 1024  # GetRecords answers 10 MiB at most

    def page_bytes(self, records: list[dict[str, Any]]) -> int:
        return sum(len(r.get("Data", b"")) + 128 for r in records)

    def __init__(self, aws: Aws, stream: str, created: str, retention_s: float = 24 * 3600.0) -> None:
        self.aws = aws
        self.name = stream
        self.stream = f"{stream}@{created}"
        self.retention_s = retention_s  # the stream's RetentionPeriodHours

    def min_read_interval_ms(self, tuning: Tuning) -> int:
        # Kinesis: 5 reads per second per shard, for every consumer together.
        return tuning.min_read_interval_ms

    async def list_shards(self) -> list[Shard]:
        shards: list[Shard] = []
        kwargs: dict[str, Any] = {"StreamName": self.name}
        while True:
            result = await self.aws.call("kinesis", "list_shards", **kwargs)
            for s in result.get("Shards", []):
                parents = tuple(p for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")) if p)
                closed = "EndingSequenceNumber" in s.get("SequenceNumberRange", {})
                shards.append(Shard(s["ShardId"], parents, closed))
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

    async def get_iterator_since(self, shard_id: str, since_s: float) -> str:
        # AT_TIMESTAMP: the first record whose ApproximateArrivalTimestamp is at or after it, so a
        # stream kept for days is not read from its oldest record to skip it.
        result = await self.aws.call("kinesis", "get_shard_iterator", StreamName=self.name, ShardId=shard_id,
                                     ShardIteratorType="AT_TIMESTAMP", Timestamp=since_s)
        return str(result["ShardIterator"])

    async def get_records(self, iterator: str, limit: int) -> Page:
        result = await self.aws.call("kinesis", "get_records", ShardIterator=iterator, Limit=limit)
        behind_s = float(result.get("MillisBehindLatest") or 0) / 1000
        return Page(result.get("Records", []), result.get("NextShardIterator"), behind_s)

    def sequence_number(self, record: dict[str, Any]) -> str:
        return str(record["SequenceNumber"])

    def created_s(self, record: dict[str, Any]) -> float:
        return float(creation_seconds(record["ApproximateArrivalTimestamp"]))


async def iterator_after(source: StreamSource, shard_id: str, checkpoint: str | None) -> str:
    """An iterator at the first record past `checkpoint`: a sequence number, a `latest` start's
    marker (records written from that second on), or None (the oldest record)."""
    since = latest_since(checkpoint)
    if since is not None:
        return await source.get_iterator_since(shard_id, since)
    return await source.get_iterator(shard_id, checkpoint)


class Processor(Protocol):
    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Handle every record of the page: delivered downstream, skipped, or dead-lettered.
        Failures of single records are retried inside (retry.py); Abandoned if stopping."""
        ...


# A processor with `page_keys(records) -> frozenset[str] | None` (the items a page holds) may be
# given a page while the one before is still being processed, when the two share no item: the
# forwarder then sends the next page while the last one crosses the link to the peer. Positions
# still advance in page order.
PAGES_IN_FLIGHT = 2


def _after(sequence: str, checkpoint: str) -> bool:
    """Whether a sequence number comes after the checkpoint (both numbers in one shard)."""
    try:
        return int(sequence) > int(checkpoint)
    except ValueError:
        return False


def _dropped(task: asyncio.Task[Any] | None) -> asyncio.Task[Any] | None:
    """Cancel a task whose result will not be used (its failure, if any, is of no interest);
    returns None, to be assigned in its place. (A page read ahead gives its bytes back through
    the worker's holds.)"""
    if task is not None:
        task.cancel()
        if task.done() and not task.cancelled():
            task.exception()
    return None


def _when(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


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
        running: asyncio.Event | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.pair = pair
        self.source = source
        # The daemon's page budget (budget.py): pages this worker holds, read ahead within it.
        self.budget = budget or ByteBudget(tuning.read_ahead_budget_mib * 1024 * 1024)
        self._holds: set[Hold] = set()
        self.processor = processor
        self.leases = leases
        self.held = held
        self.running = running  # cleared while the pipeline is paused
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.shard_id = shard_of(held.lease.key)
        self._position: tuple[str, float] | None = None  # delivered, not yet checkpointed
        self._checkpointed_at = time.monotonic()
        self._last_read = -float("inf")
        self._empty_since: float | None = None  # monotonic time of the first empty page in a row
        self._min_read_ms = source.min_read_interval_ms(tuning)
        self._page_keys: Callable[[list[dict[str, Any]]], frozenset[str] | None] | None = getattr(
            processor, "page_keys", None)
        self._in_flight: deque[tuple[asyncio.Task[None], frozenset[str]]] = deque()
        # Reading from a Kinesis checkpoint not known to be in the stream still: empty pages at
        # the retention's edge, counted (TRIM_EDGE), until a record comes.
        self._edge_pages: int | None = None

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
            for hold in list(self._holds):
                self._give_back(hold)
            self.metrics.forget_shard(self.pair, pipeline, self.shard_id)
            if release:
                await self._keep_position()
                await self._release()
        return False

    async def _read(self) -> bool:
        pipeline = self.source.pipeline
        iterator: str | None = None
        failures = 0
        # While pages come with records, the next page is read (at the shard's read spacing)
        # while this one is delivered: pages are still delivered one after another, in order.
        ahead: asyncio.Task[Page | None] | None = None
        trimmed = refused = False  # what the last failure said, handled inside the try below
        try:
            while not self.stop.is_set():
                if self.running is not None and not self.running.is_set():
                    ahead = self._drop_ahead(ahead)
                    await self._settle()
                    await self._flush_checkpoint()
                    await self._paused()  # the position is kept; reading resumes from the checkpoint
                    iterator = None
                    continue
                try:
                    if refused:
                        if await self._shard_gone():
                            return True
                        refused = False
                    if iterator is None:
                        await self._settle()  # the pages read from the old position are done
                        await self._flush_checkpoint()
                        iterator = await (self._read_on_after_trim() if trimmed else self._start())
                        trimmed = False
                    if ahead is not None:
                        page, ahead = await ahead, None
                    else:
                        page = await self._read_page(iterator, self._gap_s(), self._hold(None))
                    if page is None:
                        break  # stopping
                    if page.records and page.next_iterator is not None:
                        room = self._hold(self.source.max_page_bytes)
                        if room is not None:  # read ahead only within the daemon's page budget
                            ahead = asyncio.create_task(
                                self._read_page(page.next_iterator, self._min_read_ms / 1000, room),
                                name=f"read ahead {self.shard_id}")
                    records = self._skip_before_start(page.records)
                    if records:
                        await self._hand_over(records, page.hold)
                    else:
                        self._give_back(page.hold)
                    if page.next_iterator is None:
                        await self._settle()
                        await self._flush_checkpoint(finished=True)
                        log.info("%s %s: shard %s read to its end", pipeline, self.pair, self.shard_id)
                        return True
                    iterator = page.next_iterator
                    failures = 0
                    if page.records:
                        self._empty_since = None
                        self._edge_pages = None
                    elif self._at_trimmed_edge(page):
                        trimmed, iterator, ahead = True, None, self._drop_ahead(ahead)
                    else:
                        self._empty_since = self._empty_since or time.monotonic()
                        await self._flush_checkpoint()
                        self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, page.behind_s)
                        # Caught up, or (Kinesis) behind by what MillisBehindLatest says.
                        self.metrics.set_pending(self.pair, pipeline, self.shard_id,
                                                 time.time() - page.behind_s if page.behind_s else None)
                    continue
                except (ExpiredIterator, Transient, InvalidRequest) as exc:
                    ahead = self._drop_ahead(ahead)  # it read on from a position that is given up
                    # A fresh iterator from the checkpoint: the old one expired or was refused.
                    self.metrics.errors.labels(pipeline, exc.kind).inc()
                    log.info("%s %s: shard %s: %s; new iterator from checkpoint",
                             pipeline, self.pair, self.shard_id, exc)
                    iterator = None
                    failures += 1
                    await sleep_or_stop(self.stop, backoff_s(failures, self.tuning))
                except TrimmedData:
                    ahead = self._drop_ahead(ahead)
                    # DynamoDB Streams: the checkpoint (or the iterator's position) is past retention.
                    trimmed, iterator = True, None
                except NotFound as exc:
                    ahead = self._drop_ahead(ahead)
                    # The shard is unknown: gone from the stream (retention), or a passing refusal.
                    self.metrics.errors.labels(pipeline, exc.kind).inc()
                    refused, iterator = True, None
                    failures += 1
                    await sleep_or_stop(self.stop, backoff_s(failures, self.tuning))
                except LeaseLost:
                    raise
                except ReplicatorError as exc:
                    ahead = self._drop_ahead(ahead)
                    self.metrics.errors.labels(pipeline, exc.kind).inc()
                    failures += 1
                    log.warning("%s %s: shard %s: %s (retry %d)", pipeline, self.pair, self.shard_id, exc, failures)
                    await sleep_or_stop(self.stop, backoff_s(failures, self.tuning))
            await self._settle()  # stopping: the pages handed over finish, as a page being delivered does
        finally:
            if ahead is not None:
                ahead.cancel()
            for task, _ in self._in_flight:
                _dropped(task)
            self._in_flight.clear()
        return False

    def _hold(self, nbytes: int | None) -> Hold | None:
        """A hold in the page budget: for a page that must be read (`nbytes` None: always, sized
        once read), or for one read ahead (room for `nbytes`, else None)."""
        hold = self.budget.hold(0) if nbytes is None else self.budget.try_hold(nbytes)
        if hold is not None:
            self._holds.add(hold)
        return hold

    def _drop_ahead(self, task: asyncio.Task[Page | None] | None) -> asyncio.Task[Any] | None:
        """Cancel a read ahead that will not be used (returns None, to be assigned in its place);
        a page it read gives its bytes back."""
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            page = task.result()
            if page is not None:
                self._give_back(page.hold)
        return _dropped(task)

    def _give_back(self, hold: Hold) -> None:
        self.budget.release(hold)
        self._holds.discard(hold)

    async def _hand_over(self, records: list[dict[str, Any]], hold: Hold | None = None) -> None:
        """Deliver the page (its `hold` given back once delivered). A page that shares no item
        with the pages still being delivered goes beside them (at most PAGES_IN_FLIGHT at once;
        each item's changes stay in order); otherwise, and for a processor that does not say
        which items a page holds, it waits."""
        keys = self._page_keys(records) if self._page_keys is not None else None
        while self._in_flight and (keys is None or len(self._in_flight) >= PAGES_IN_FLIGHT
                                   or any(not keys.isdisjoint(held) for _, held in self._in_flight)):
            await self._settle_oldest()
        if keys is None:
            await self._deliver(records, None, hold)
            return
        previous = self._in_flight[-1][0] if self._in_flight else None
        task = asyncio.create_task(self._deliver(records, previous, hold), name=f"deliver {self.shard_id}")
        self._in_flight.append((task, keys))

    async def _settle_oldest(self) -> None:
        task, _ = self._in_flight[0]
        try:
            await task
        finally:
            if self._in_flight and self._in_flight[0][0] is task:
                self._in_flight.popleft()

    async def _settle(self) -> None:
        """Wait until every page handed over is delivered (their errors are raised here)."""
        while self._in_flight:
            await self._settle_oldest()

    def _gap_s(self) -> float:
        """How far apart this shard's reads are: the source's least interval while records come
        (`min_read_interval_ms` for Kinesis, `stream_read_interval_ms` for DynamoDB Streams),
        `poll_interval_ms` after a page that found nothing, and `idle_poll_interval_ms` once
        nothing came for IDLE_AFTER_S."""
        tuning = self.tuning
        if self._empty_since is None:
            return self._min_read_ms / 1000
        gap_ms = tuning.poll_interval_ms
        if time.monotonic() - self._empty_since >= IDLE_AFTER_S:
            gap_ms = tuning.idle_poll_interval_ms or gap_ms
        return max(self._min_read_ms, gap_ms) / 1000

    async def _read_page(self, iterator: str, gap_s: float, hold: Hold | None) -> Page | None:
        """GetRecords, no sooner than `gap_s` after this shard's previous read (the per-shard
        read limits are shared with every other consumer of the stream); None if stopping. The
        page holds what it is worth in the budget through `hold` (given back on any failure)."""
        assert hold is not None
        try:
            wait_s = self._last_read + gap_s - time.monotonic()
            if wait_s > 0 and await sleep_or_stop(self.stop, wait_s):
                self._give_back(hold)
                return None
            self._last_read = time.monotonic()
            page = await self.source.get_records(iterator, self.tuning.get_records_limit)
        except BaseException:
            self._give_back(hold)
            raise
        self.budget.resize(hold, self.source.page_bytes(page.records))
        return replace(page, hold=hold)

    async def _paused(self) -> None:
        """While paused: read nothing, but look every `shard_refresh_s` at the first record after
        the checkpoint, so that the time to data loss stays true."""
        assert self.running is not None
        while not self.running.is_set() and not self.stop.is_set():
            checkpoint = self.held.lease.checkpoint
            try:
                iterator = await iterator_after(self.source, self.shard_id, checkpoint)
                page = await self.source.get_records(iterator, 1)
                self.metrics.set_pending(self.pair, self.source.pipeline, self.shard_id,
                                         self.source.created_s(page.records[0]) if page.records else None)
            except ReplicatorError as exc:
                log.debug("%s %s: shard %s: paused, cannot look at the next record: %s",
                          self.source.pipeline, self.pair, self.shard_id, exc)
            waiters = [asyncio.ensure_future(self.running.wait()), asyncio.ensure_future(self.stop.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.tuning.shard_refresh_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _skip_before_start(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A pipeline that starts at `latest` skips what was written before its start (records
        are in order: what is kept is the end of the page); if nothing is kept, its position
        moves past the page."""
        since = latest_since(self.held.lease.checkpoint)
        if since is None or self._position is not None or not records:
            return records
        kept = [r for r in records if self.source.created_s(r) >= since]
        if not kept:
            last = records[-1]
            self._position = (self.source.sequence_number(last), self.source.created_s(last))
        return kept

    async def _start(self) -> str:
        """An iterator from the checkpoint. Where a trimmed position silently reads on from the
        oldest record left (Kinesis), look first: if the oldest record left is past the
        checkpoint, the checkpoint's record and maybe others after it were trimmed."""
        checkpoint = self.held.lease.checkpoint
        self._edge_pages = None
        since = latest_since(checkpoint)
        if since is not None:
            return await self.source.get_iterator_since(self.shard_id, since)
        if checkpoint is None or not self.source.silent_trim:
            return await self.source.get_iterator(self.shard_id, checkpoint)
        oldest = await self.source.get_iterator(self.shard_id, None)
        page = await self.source.get_records(oldest, 1)
        if page.records and _after(self.source.sequence_number(page.records[0]), checkpoint):
            self._report_trimmed(self.source.created_s(page.records[0]))
            return oldest  # an iterator may be used again: it reads from the oldest record
        # The oldest record is at or before the checkpoint (it is still in the stream), or the
        # probe found nothing, which Kinesis allows: then the pages say it (_at_trimmed_edge).
        self._edge_pages = None if page.records else 0
        try:
            return await self.source.get_iterator(self.shard_id, checkpoint)
        except InvalidRequest as exc:
            if "StartingSequenceNumber" not in str(exc):
                raise
            # Some Kinesis consumers report this answer for a trimmed checkpoint instead.
            self._edge_pages = None
            self._report_trimmed(self.source.created_s(page.records[0]) if page.records else None)
            return oldest

    def _at_trimmed_edge(self, page: Page) -> bool:
        """An empty page at the retention's edge while reading from an unconfirmed checkpoint;
        True once TRIM_EDGE_PAGES came in a row (then the checkpoint is taken as trimmed)."""
        if self._edge_pages is None:
            return False
        if page.behind_s < TRIM_EDGE * self.source.retention_s:
            self._edge_pages = 0
            return False
        self._edge_pages += 1
        if self._edge_pages < TRIM_EDGE_PAGES:
            return False
        self._edge_pages = None
        log.warning("%s %s: shard %s: empty pages %.0fs behind the stream's tip, at its retention (%.0fs), "
                    "reading from checkpoint %s: the checkpoint was trimmed", self.source.pipeline, self.pair,
                    self.shard_id, page.behind_s, self.source.retention_s, self.held.lease.checkpoint)
        return True

    async def _read_on_after_trim(self) -> str:
        oldest = await self.source.get_iterator(self.shard_id, None)
        page = await self.source.get_records(oldest, 1)
        self._report_trimmed(self.source.created_s(page.records[0]) if page.records else None)
        self.held.lease = replace(self.held.lease, checkpoint=None)
        return oldest

    def _report_trimmed(self, oldest_left_s: float | None) -> None:
        """One error line naming the shard and the time range whose records may be lost."""
        lease = self.held.lease
        since = _when(lease.checkpoint_at) if lease.checkpoint_at else "the shard's start"
        until = _when(oldest_left_s) if oldest_left_s is not None else "now"
        self.metrics.lost_to_retention(self.pair, self.source.pipeline)
        log.error("%s %s: shard %s: the records after checkpoint %s (written %s) up to %s were trimmed "
                  "by the stream's retention before they were read; verify the pair and backfill that "
                  "range ('replicatord verify --repair', 'replicatord backfill'). Reading on from the "
                  "oldest record left.", self.source.pipeline, self.pair, self.shard_id,
                  lease.checkpoint or "(none)", since, until)

    async def _shard_gone(self) -> bool:
        """The shard was refused as unknown: if the stream no longer lists it, it left the stream
        (retention) before it was read to its end. Report what was lost, finish its lease so that
        its children start, and return True. False if it is still listed (try again)."""
        if any(shard.id == self.shard_id for shard in await self.source.list_shards()):
            return False
        lease = self.held.lease
        since = _when(lease.checkpoint_at) if lease.checkpoint_at else "its start"
        self.metrics.lost_to_retention(self.pair, self.source.pipeline)
        log.error("%s %s: shard %s left the stream before it was read to its end: its records after "
                  "checkpoint %s (written %s) were lost to the stream's retention; verify the pair and "
                  "backfill from then ('replicatord verify --repair', 'replicatord backfill'). Its "
                  "children start now.", self.source.pipeline, self.pair, self.shard_id,
                  lease.checkpoint or "(none)", since)
        await self.leases.checkpoint(self.held, None, finished=True)
        return True

    async def _keep_position(self) -> None:
        """On the way out, checkpoint what was delivered (best effort: a record delivered but not
        checkpointed is delivered again by the next owner)."""
        try:
            await asyncio.wait_for(self._flush_checkpoint(), RELEASE_TIMEOUT_S)
        except (ReplicatorError, TimeoutError) as exc:
            log.warning("%s %s: shard %s: cannot checkpoint on the way out (the next reader replays from the "
                        "last checkpoint): %s", self.source.pipeline, self.pair, self.shard_id, exc or "timed out")

    async def _release(self) -> None:
        try:
            await asyncio.wait_for(self.leases.release(self.held), RELEASE_TIMEOUT_S)
        except (ReplicatorError, TimeoutError) as exc:
            log.warning("%s %s: shard %s: cannot release the lease (it will expire): %s",
                        self.source.pipeline, self.pair, self.shard_id, exc or "timed out")

    async def _deliver(self, records: list[dict[str, Any]], previous: asyncio.Task[None] | None = None,
                       hold: Hold | None = None) -> None:
        """Process a page until it succeeds, then (once `previous`, the page before, is
        delivered) checkpoint past it. Abandon it on stop. Its `hold` is given back at the end."""
        try:
            await self._deliver_page(records, previous)
        finally:
            if hold is not None:
                self._give_back(hold)

    async def _deliver_page(self, records: list[dict[str, Any]], previous: asyncio.Task[None] | None) -> None:
        pipeline = self.source.pipeline
        self.metrics.records_read.labels(self.pair, pipeline).inc(len(records))
        oldest = self.source.created_s(records[0])
        self.metrics.set_pending(self.pair, pipeline, self.shard_id, oldest)
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
        if previous is not None:
            await previous  # positions advance in page order
        newest = self.source.created_s(records[-1])
        self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, time.time() - newest)
        # The next record, if any, is no older than this one: an upper bound of its age.
        self.metrics.set_pending(self.pair, pipeline, self.shard_id, newest)
        self._position = (self.source.sequence_number(records[-1]), newest)
        if time.monotonic() - self._checkpointed_at >= self.tuning.checkpoint_interval_ms / 1000:
            await self._flush_checkpoint()

    async def _flush_checkpoint(self, finished: bool = False) -> None:
        """Write the position delivered so far (checkpoints are written at most every
        `checkpoint_interval_ms` while records come, and whenever the shard is caught up: a
        crash replays at most that much, and applying again is harmless)."""
        position, self._position = self._position, None
        if position is None and not finished:
            return
        sequence, at = position if position is not None else (None, None)
        try:
            await self.leases.checkpoint(self.held, sequence, finished=finished, at=at)
        except BaseException:
            self._position = self._position or position  # not written: still to do
            raise
        self._checkpointed_at = time.monotonic()
