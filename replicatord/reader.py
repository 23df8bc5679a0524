"""Reading one shard: the iterator, the pacing of reads, and the page read ahead (KCL's records
publisher).

The reader starts from the lease's checkpoint (a sequence number, a `latest` start's marker, or
nothing: the oldest record), reads a page no sooner than the shard's read spacing allows, and
while pages come with records reads the next one ahead, within the daemon's page budget
(budget.py). It tells when a Kinesis checkpoint turns out to be trimmed: the oldest record lies
past it, the checkpoint is refused, or empty pages come at the retention's edge
(docs/aws-behaviour.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from replicatord.backoff import sleep_or_stop
from replicatord.budget import ByteBudget, Hold
from replicatord.config import Tuning
from replicatord.errors import InvalidRequest
from replicatord.lease_table import HeldLease
from replicatord.leases import latest_since, shard_of
from replicatord.metrics import Metrics
from replicatord.sources import Page, StreamSource, iterator_after

log = logging.getLogger(__name__)

# Kinesis, from a checkpoint past its retention: GetShardIterator(AFTER_SEQUENCE_NUMBER) succeeds
# and GetRecords answers empty pages with MillisBehindLatest stuck at the retention (reported by
# Kinesis consumers; docs/aws-behaviour.md). An empty page this close to the retention, before
# any record came from the checkpoint, that many times in a row, means the checkpoint was trimmed.
TRIM_EDGE = 0.95
TRIM_EDGE_PAGES = 2
# A shard that found nothing for this long is read every `idle_poll_interval_ms`.
IDLE_AFTER_S = 10.0


def _after(sequence: str, checkpoint: str) -> bool:
    """Whether a sequence number comes after the checkpoint (both numbers in one shard)."""
    try:
        return int(sequence) > int(checkpoint)
    except ValueError:
        return False


def _when(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def dropped(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task whose result will not be used (its failure, if any, is of no interest)."""
    if task is not None:
        task.cancel()
        if task.done() and not task.cancelled():
            task.exception()


class ShardReader:
    def __init__(self, pair: str, source: StreamSource, held: HeldLease, tuning: Tuning, metrics: Metrics,
                 stop: asyncio.Event, budget: ByteBudget) -> None:
        self.pair = pair
        self.source = source
        self.held = held
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop
        self.budget = budget
        self.shard_id = shard_of(held.lease.key)
        self.iterator: str | None = None
        self._ahead: asyncio.Task[Page | None] | None = None
        self._holds: set[Hold] = set()
        self._last_read = -float("inf")
        self._empty_since: float | None = None  # monotonic time of the first empty page in a row
        self._min_read_ms = source.min_read_interval_ms(tuning)
        # Reading from a Kinesis checkpoint not known to be in the stream still: empty pages at
        # the retention's edge, counted (TRIM_EDGE), until a record comes.
        self._edge_pages: int | None = None

    @property
    def name(self) -> str:
        return f"{self.source.role} {self.pair}: shard {self.shard_id}"

    # -- where reading starts ------------------------------------------------------------------

    async def start(self) -> None:
        """An iterator from the checkpoint. Where a trimmed position silently reads on from the
        oldest record left (Kinesis), look first: if the oldest record left is past the
        checkpoint, the checkpoint's record and maybe others after it were trimmed."""
        self.drop_ahead()
        checkpoint = self.held.lease.checkpoint
        self._edge_pages = None
        since = latest_since(checkpoint)
        if since is not None:
            self.iterator = await self.source.get_iterator_since(self.shard_id, since)
            return
        if checkpoint is None or not self.source.silent_trim:
            self.iterator = await self.source.get_iterator(self.shard_id, checkpoint)
            return
        oldest = await self.source.get_iterator(self.shard_id, None)
        page = await self.source.get_records(oldest, 1)
        if page.records and _after(self.source.sequence_number(page.records[0]), checkpoint):
            self.report_trimmed(self.source.created_s(page.records[0]))
            self.iterator = oldest  # an iterator may be used again: it reads from the oldest record
            return
        # The oldest record is at or before the checkpoint (it is still in the stream), or the
        # probe found nothing, which Kinesis allows: then the pages say it (trimmed_edge).
        self._edge_pages = None if page.records else 0
        try:
            self.iterator = await self.source.get_iterator(self.shard_id, checkpoint)
        except InvalidRequest as exc:
            if "StartingSequenceNumber" not in str(exc):
                raise
            # Some Kinesis consumers report this answer for a trimmed checkpoint instead.
            self._edge_pages = None
            self.report_trimmed(self.source.created_s(page.records[0]) if page.records else None)
            self.iterator = oldest

    async def from_oldest(self) -> None:
        """The position was trimmed: report the loss and read on from the oldest record left."""
        self.drop_ahead()
        oldest = await self.source.get_iterator(self.shard_id, None)
        page = await self.source.get_records(oldest, 1)
        self.report_trimmed(self.source.created_s(page.records[0]) if page.records else None)
        self.held.lease = replace(self.held.lease, checkpoint=None)
        self._edge_pages = None
        self.iterator = oldest

    def report_trimmed(self, oldest_left_s: float | None) -> None:
        """One error line naming the shard and the time range whose records may be lost."""
        lease = self.held.lease
        since = _when(lease.checkpoint_at) if lease.checkpoint_at else "the shard's start"
        until = _when(oldest_left_s) if oldest_left_s is not None else "now"
        self.metrics.lost_to_retention(self.pair, self.source.role)
        log.error("%s: the records after checkpoint %s (written %s) up to %s were trimmed by the stream's "
                  "retention before they were read; verify the pair and backfill that range ('replicatord "
                  "verify --repair', 'replicatord backfill'). Reading on from the oldest record left.",
                  self.name, lease.checkpoint or "(none)", since, until)

    # -- pages -----------------------------------------------------------------------------------

    async def next_page(self) -> Page | None:
        """The next page (the one read ahead, if any), at the shard's read spacing; while pages
        come with records the one after is read ahead, within the page budget. None if stopping.
        The page holds its bytes in the budget until `give_back(page.hold)`."""
        assert self.iterator is not None
        if self._ahead is not None:
            task, self._ahead = self._ahead, None
            page = await task
        else:
            page = await self._read(self.iterator, self._gap_s(), self._hold(None))
        if page is None:
            return None
        if page.records and page.next_iterator is not None:
            room = self._hold(self.source.max_page_bytes)
            if room is not None:
                self._ahead = asyncio.create_task(self._read(page.next_iterator, self._min_read_ms / 1000, room),
                                                  name=f"read ahead {self.shard_id}")
        if page.next_iterator is not None:
            self.iterator = page.next_iterator
        if page.records:
            self._empty_since = self._edge_pages = None
        else:
            self._empty_since = self._empty_since or time.monotonic()
        return page

    def trimmed_edge(self, page: Page) -> bool:
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
        log.warning("%s: empty pages %.0fs behind the stream's tip, at its retention (%.0fs), reading from "
                    "checkpoint %s: the checkpoint was trimmed", self.name, page.behind_s, self.source.retention_s,
                    self.held.lease.checkpoint)
        return True

    async def peek_pending(self) -> None:
        """While paused: look at the first record after the checkpoint, so that the time to data
        loss stays true."""
        iterator = await iterator_after(self.source, self.shard_id, self.held.lease.checkpoint)
        page = await self.source.get_records(iterator, 1)
        self.metrics.set_pending(self.pair, self.source.role, self.shard_id,
                                 self.source.created_s(page.records[0]) if page.records else None)

    def _gap_s(self) -> float:
        """How far apart this shard's reads are: the source's least interval while records come
        (`min_read_interval_ms` for Kinesis, `stream_read_interval_ms` for DynamoDB Streams),
        `poll_interval_ms` after a page that found nothing, and `idle_poll_interval_ms` once
        nothing came for IDLE_AFTER_S."""
        if self._empty_since is None:
            return self._min_read_ms / 1000
        gap_ms = self.tuning.poll_interval_ms
        if time.monotonic() - self._empty_since >= IDLE_AFTER_S:
            gap_ms = self.tuning.idle_poll_interval_ms or gap_ms
        return max(self._min_read_ms, gap_ms) / 1000

    async def _read(self, iterator: str, gap_s: float, hold: Hold | None) -> Page | None:
        """GetRecords, no sooner than `gap_s` after this shard's previous read (the per-shard
        read limits are shared with every other consumer of the stream); None if stopping. The
        page holds what it is worth in the budget through `hold` (given back on any failure)."""
        assert hold is not None
        try:
            wait_s = self._last_read + gap_s - time.monotonic()
            if wait_s > 0 and await sleep_or_stop(self.stop, wait_s):
                self.give_back(hold)
                return None
            self._last_read = time.monotonic()
            page = await self.source.get_records(iterator, self.tuning.get_records_limit)
        except BaseException:
            self.give_back(hold)
            raise
        self.budget.resize(hold, self.source.page_bytes(page.records))
        return replace(page, hold=hold)

    # -- the page budget -------------------------------------------------------------------------

    def _hold(self, nbytes: int | None) -> Hold | None:
        """A hold in the page budget: for a page that must be read (`nbytes` None: always, sized
        once read), or for one read ahead (room for `nbytes`, else None)."""
        hold = self.budget.hold(0) if nbytes is None else self.budget.try_hold(nbytes)
        if hold is not None:
            self._holds.add(hold)
        return hold

    def give_back(self, hold: Hold) -> None:
        self.budget.release(hold)
        self._holds.discard(hold)

    def drop_ahead(self) -> None:
        """Cancel the read ahead: it read on from a position given up (a page it read gives its
        bytes back)."""
        task, self._ahead = self._ahead, None
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            page = task.result()
            if page is not None:
                self.give_back(page.hold)
        dropped(task)

    def close(self) -> None:
        """The worker ends: the read ahead is cancelled and every hold given back."""
        self.drop_ahead()
        for hold in list(self._holds):
            self.give_back(hold)
