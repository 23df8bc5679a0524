"""A worker per shard: KCL's shard consumer, as explicit states and a pure transition function.

A `ShardConsumer` reads one shard from its checkpoint (reader.py), hands each page to the
pipeline's processor, and checkpoints only after the processor succeeded (checkpointer.py), so a
crash replays at most the pages in flight (at-least-once; applying is idempotent). What it does
next is `next_step(state, event)`: the page it read, the error it met (errors.ReadAction), a
pause, a stop. Which shards an instance reads is decided in pipeline.py.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from replicatord.backoff import backoff_s, sleep_or_stop
from replicatord.budget import ByteBudget, Hold
from replicatord.checkpointer import Checkpointer
from replicatord.config import Tuning
from replicatord.errors import LeaseLost, ReadAction, ReplicatorError
from replicatord.lease_table import HeldLease, LeaseTable
from replicatord.leases import latest_since, shard_of
from replicatord.metrics import Metrics
from replicatord.reader import ShardReader, _when, dropped
from replicatord.retry import Abandoned
from replicatord.sources import Page, StreamSource

log = logging.getLogger(__name__)

# A processor with `page_keys(records) -> frozenset[str] | None` (the items a page holds) may be
# given a page while the one before is still being processed, when the two share no item: the
# forwarder then sends the next page while the last one crosses the link to the peer. Positions
# still advance in page order.
PAGES_IN_FLIGHT = 2


class Processor(Protocol):
    async def process(self, shard_id: str, records: list[dict[str, Any]]) -> None:
        """Handle every record of the page: delivered downstream, skipped, or dead-lettered.
        Failures of single records are retried inside (retry.py); Abandoned if stopping."""
        ...


# --- states and transitions -------------------------------------------------------------------


class State(enum.Enum):
    START = "an iterator from the checkpoint is needed"
    OLDEST = "an iterator at the oldest record is needed (the position was trimmed)"
    READING = "reading pages"
    CHECK_GONE = "the shard was refused: did it leave the stream?"
    PAUSED = "forwarding paused: positions and lease kept"
    FINISHED = "read to its end"
    STOPPED = "stopped"


class Event(enum.Enum):
    ITERATOR = "an iterator"
    PAGE = "a page with records"
    EMPTY = "an empty page"
    TRIMMED_EDGE = "empty pages at the retention's edge from an unconfirmed checkpoint"
    END = "the shard's last page"
    GONE = "the shard left the stream"
    LISTED = "the shard is still listed"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    # A failed call, by what its error class says a read gets (errors.ReadAction).
    FAILED_RETRY = "failed: read again after a backoff"
    FAILED_RENEW = "failed: a new iterator from the checkpoint"
    FAILED_OLDEST = "failed: the position was trimmed"
    FAILED_GONE = "failed: the shard is unknown"
    LEASE_LOST = "another instance holds the lease"


FAILED = {ReadAction.RETRY: Event.FAILED_RETRY, ReadAction.RENEW_ITERATOR: Event.FAILED_RENEW,
          ReadAction.FROM_OLDEST: Event.FAILED_OLDEST, ReadAction.SHARD_GONE: Event.FAILED_GONE,
          ReadAction.STOP: Event.LEASE_LOST}


@dataclass(frozen=True)
class Step:
    """The next state, and what to do on the way. Entering START, OLDEST or PAUSED the consumer
    first waits for the pages handed over and writes the checkpoint: no new position is taken
    while pages read from the old one are in flight."""

    state: State
    backoff: bool = False  # wait before the next attempt (the failures count up)
    drop_ahead: bool = False  # the page read ahead is from a position given up


ACTIVE = (State.START, State.OLDEST, State.READING, State.CHECK_GONE)


def next_step(state: State, event: Event) -> Step:
    """What a shard consumer does after `event` in `state` (table-tested in
    tests/unit/test_consumer.py). Pages themselves are delivered by the caller: PAGE and END
    hand the page over before the step is taken."""
    if event is Event.STOP or event is Event.LEASE_LOST:
        return Step(State.STOPPED, drop_ahead=True)
    if state is State.PAUSED:
        return Step(State.START) if event is Event.RESUME else Step(State.PAUSED)
    if event is Event.PAUSE:
        return Step(State.PAUSED, drop_ahead=True)
    if event is Event.FAILED_RETRY:
        return Step(state, backoff=True, drop_ahead=True)
    if event is Event.FAILED_RENEW:
        return Step(State.START, backoff=True, drop_ahead=True)
    if event is Event.FAILED_OLDEST:
        return Step(State.OLDEST, drop_ahead=True)
    if event is Event.FAILED_GONE:
        return Step(State.CHECK_GONE, backoff=True, drop_ahead=True)
    return _progress(state, event)


def _progress(state: State, event: Event) -> Step:
    table = {
        (State.START, Event.ITERATOR): Step(State.READING),
        (State.OLDEST, Event.ITERATOR): Step(State.READING),
        (State.READING, Event.PAGE): Step(State.READING),
        (State.READING, Event.EMPTY): Step(State.READING),
        (State.READING, Event.END): Step(State.FINISHED),
        (State.READING, Event.TRIMMED_EDGE): Step(State.OLDEST, drop_ahead=True),
        (State.CHECK_GONE, Event.GONE): Step(State.FINISHED),
        (State.CHECK_GONE, Event.LISTED): Step(State.START),
    }
    step = table.get((state, event))
    if step is None:
        raise ValueError(f"no transition from {state.name} on {event.name}")
    return step


# --- the consumer -------------------------------------------------------------------------------


class ShardConsumer:
    def __init__(self, pair: str, source: StreamSource, processor: Processor, leases: LeaseTable, held: HeldLease,
                 tuning: Tuning, metrics: Metrics, stop: asyncio.Event, running: asyncio.Event | None = None,
                 budget: ByteBudget | None = None) -> None:
        self.pair = pair
        self.source = source
        self.processor = processor
        self.leases = leases
        self.held = held
        self.running = running  # cleared while the pipeline is paused
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.shard_id = shard_of(held.lease.key)
        self.name = f"{source.role} {pair}: shard {self.shard_id}"
        self.reader = ShardReader(pair, source, held, tuning, metrics, stop,
                                  budget or ByteBudget(tuning.read_ahead_budget_mib * 1024 * 1024))
        self.checkpointer = Checkpointer(leases, held, tuning, self.name)
        self._page_keys: Callable[[list[dict[str, Any]]], frozenset[str] | None] | None = getattr(
            processor, "page_keys", None)
        self._in_flight: deque[tuple[asyncio.Task[None], frozenset[str]]] = deque()

    async def run(self) -> bool:
        """Read the shard until stopped or its end; True if it was read to the end.

        When it stops for any other reason than a lost lease (stop event, abandoned page,
        cancellation after the drain bound), the lease is released so another instance can
        take it at once.
        """
        pipeline = self.source.role
        release = True
        try:
            finished = await self._consume()
            release = not finished
            return finished
        except LeaseLost as exc:
            release = False
            self.metrics.errors.labels(pipeline, exc.kind).inc()
            log.warning("%s: %s; stopping this shard", self.name, exc)
        except Abandoned:
            log.info("%s: page in flight abandoned at shutdown; it will be replayed", self.name)
        except Exception:  # noqa: BLE001 - a bug must cost one shard a restart, never the daemon
            self.metrics.errors.labels(pipeline, "internal_error").inc()
            log.exception("%s: worker failed; its lease is released and taken again", self.name)
        finally:
            self.reader.close()
            self.metrics.forget_shard(self.pair, pipeline, self.shard_id)
            if release:
                await self.checkpointer.keep()
                await self.checkpointer.release()
        return False

    async def _consume(self) -> bool:
        state = State.START
        failures = 0
        try:
            while state not in (State.FINISHED, State.STOPPED):
                event = await self._event(state)
                step = next_step(state, event)
                if step.drop_ahead:
                    self.reader.drop_ahead()
                failures = failures + 1 if step.backoff else 0 if event in (Event.PAGE, Event.EMPTY) else failures
                if step.backoff:
                    await sleep_or_stop(self.stop, backoff_s(failures, self.tuning))
                state = step.state
            if state is State.STOPPED:
                await self._settle()  # stopping: the pages handed over finish, as a page being delivered does
        finally:
            for task, _ in self._in_flight:
                dropped(task)
            self._in_flight.clear()
        return state is State.FINISHED

    async def _event(self, state: State) -> Event:
        """Do what `state` asks (read, take an iterator, look at the listing, wait while paused)
        and say what came of it."""
        if self.stop.is_set():
            return Event.STOP
        if state is State.PAUSED:
            return await self._paused()
        try:
            if self.running is not None and not self.running.is_set():
                await self._settle()
                await self.checkpointer.flush()  # the position is kept; reading resumes from it
                return Event.PAUSE
            if state in (State.START, State.OLDEST):
                await self._settle()  # the pages read from the old position are done
                await self.checkpointer.flush()
                await (self.reader.start() if state is State.START else self.reader.from_oldest())
                return Event.ITERATOR
            if state is State.CHECK_GONE:
                return Event.GONE if await self._shard_gone() else Event.LISTED
            return await self._read()
        except ReplicatorError as exc:
            event = FAILED[exc.read]
            if event is Event.LEASE_LOST:
                raise
            self._failed(exc, event)
            return event

    def _failed(self, exc: ReplicatorError, event: Event) -> None:
        pipeline = self.source.role
        if event is not Event.FAILED_OLDEST:  # trimming is counted where it is reported
            self.metrics.errors.labels(pipeline, exc.kind).inc()
        if event is Event.FAILED_RENEW:
            log.info("%s: %s; new iterator from checkpoint", self.name, exc)
        elif event is Event.FAILED_RETRY:
            log.warning("%s: %s (retrying)", self.name, exc)

    async def _read(self) -> Event:
        page = await self.reader.next_page()
        if page is None:
            return Event.STOP
        records = self._skip_before_start(page)
        if records:
            await self._hand_over(records, page.hold)
        else:
            self.reader.give_back(page.hold)
        if page.next_iterator is None:
            await self._settle()
            await self.checkpointer.flush(finished=True)
            log.info("%s read to its end", self.name)
            return Event.END
        if page.records:
            return Event.PAGE
        if self.reader.trimmed_edge(page):
            return Event.TRIMMED_EDGE
        await self.checkpointer.flush()
        pipeline = self.source.role
        self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, page.behind_s)
        # Caught up, or (Kinesis) behind by what MillisBehindLatest says.
        self.metrics.set_pending(self.pair, pipeline, self.shard_id,
                                 time.time() - page.behind_s if page.behind_s else None)
        return Event.EMPTY

    async def _paused(self) -> Event:
        """While paused: read nothing, but look every `shard_refresh_s` at the first record after
        the checkpoint, so that the time to data loss stays true."""
        assert self.running is not None
        try:
            await self.reader.peek_pending()
        except ReplicatorError as exc:
            log.debug("%s: paused, cannot look at the next record: %s", self.name, exc)
        waiters = [asyncio.ensure_future(self.running.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.tuning.shard_refresh_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.stop.is_set():
            return Event.STOP
        return Event.RESUME if self.running.is_set() else Event.PAUSE

    def _skip_before_start(self, page: Page) -> list[dict[str, Any]]:
        """A pipeline that starts at `latest` skips what was written before its start (records
        are in order: what is kept is the end of the page); if nothing is kept, its position
        moves past the page."""
        records = page.records
        since = latest_since(self.held.lease.checkpoint)
        if since is None or self.checkpointer.position is not None or not records:
            return records
        kept = [r for r in records if self.source.created_s(r) >= since]
        if not kept:
            last = records[-1]
            self.checkpointer.delivered(self.source.sequence_number(last), self.source.created_s(last))
        return kept

    async def _shard_gone(self) -> bool:
        """The shard was refused as unknown: if the stream no longer lists it, it left the stream
        (retention) before it was read to its end. Report what was lost, finish its lease so that
        its children start, and return True. False if it is still listed (try again)."""
        if any(shard.id == self.shard_id for shard in await self.source.list_shards()):
            return False
        lease = self.held.lease
        since = _when(lease.checkpoint_at) if lease.checkpoint_at else "its start"
        self.metrics.lost_to_retention(self.pair, self.source.role)
        log.error("%s left the stream before it was read to its end: its records after checkpoint %s (written "
                  "%s) were lost to the stream's retention; verify the pair and backfill from then ('replicatord "
                  "verify --repair', 'replicatord backfill'). Its children start now.", self.name,
                  lease.checkpoint or "(none)", since)
        await self.checkpointer.finish()
        return True

    # -- delivery ----------------------------------------------------------------------------------

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

    async def _deliver(self, records: list[dict[str, Any]], previous: asyncio.Task[None] | None = None,
                       hold: Hold | None = None) -> None:
        """Process a page until it succeeds, then (once `previous`, the page before, is
        delivered) checkpoint past it. Abandon it on stop. Its `hold` is given back at the end."""
        try:
            await self._process(records)
            if previous is not None:
                await previous  # positions advance in page order
            newest = self.source.created_s(records[-1])
            pipeline = self.source.role
            self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, time.time() - newest)
            # The next record, if any, is no older than this one: an upper bound of its age.
            self.metrics.set_pending(self.pair, pipeline, self.shard_id, newest)
            self.checkpointer.delivered(self.source.sequence_number(records[-1]), newest)
            await self.checkpointer.due()
        finally:
            if hold is not None:
                self.reader.give_back(hold)

    async def _process(self, records: list[dict[str, Any]]) -> None:
        """The processor on the page until it succeeds: it handles every record's failure itself,
        so what reaches here failed outside any record (a bug): the page runs again."""
        pipeline = self.source.role
        self.metrics.records_read.labels(self.pair, pipeline).inc(len(records))
        oldest = self.source.created_s(records[0])
        self.metrics.set_pending(self.pair, pipeline, self.shard_id, oldest)
        attempt = 0
        while True:
            # While a page is retried its first record keeps ageing: the gauge shows a stall.
            self.metrics.set_iterator_age(self.pair, pipeline, self.shard_id, time.time() - oldest)
            try:
                await self.processor.process(self.shard_id, records)
                return
            except (LeaseLost, Abandoned):
                raise
            except Exception as exc:  # noqa: BLE001 - records fail one by one inside; this is a bug
                attempt += 1
                kind = exc.kind if isinstance(exc, ReplicatorError) else "internal_error"
                self.metrics.errors.labels(pipeline, kind).inc()
                log.error(  # noqa: TRY400 - a traceback only for what is not an AWS error
                    "%s: page of %d records failed: %s (retry %d)", self.name, len(records), exc, attempt,
                    exc_info=not isinstance(exc, ReplicatorError))
                if await sleep_or_stop(self.stop, backoff_s(attempt, self.tuning)):
                    raise Abandoned from None
