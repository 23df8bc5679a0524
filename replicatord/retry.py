"""When one record fails: retry it or dead-letter it, and never stop the pipeline for it.

Both pipelines run every per-record step (an apply, a repair, a stamp, a tombstone) through
`RecordRetry.run`, and `verdict` judges whatever the step raised:

- the record itself is refused (a RecordError, a request DynamoDB calls invalid, an exception of
  our own code that this record triggers): dead-lettered at once, with the reason;
- the service is passing through trouble (throttling, 5xx, unreachable), or this host's clock is
  too far off for AWS to accept its signatures (clock skew): retried with capped
  backoff for as long as it lasts. The record is not at fault, and the stall shows in
  `replicatord_iterator_age_seconds` and `replicatord_errors_total`;
- anything else (an unknown error code, access denied, a missing resource, an item that keeps
  changing under a delete): retried up to `tuning.max_record_attempts` times (and, if
  `tuning.max_record_age_s` is set, only while the record is younger), then dead-lettered.

A dead letter is sent until the queue accepts it, and only then does `run` return: a checkpoint
never passes a record that is neither done nor in the queue. Only the failed step is retried;
what succeeded before it is not done again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from replicatord.backoff import backoff_s, sleep_or_stop
from replicatord.config import Tuning
from replicatord.dlq import DeadLetterQueue, Outgoing, stream_record_text
from replicatord.errors import InvalidRequest, LeaseLost, RecordAction, ReplicatorError
from replicatord.metrics import Metrics
from replicatord.records import RecordError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Abandoned(Exception):
    """Shutdown came while a record was still failing: it is left to be replayed from the checkpoint."""


class Verdict(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


def verdict(error: BaseException, attempts: int, age_s: float, tuning: Tuning) -> Verdict:
    """What to do with a record whose step raised `error` for the `attempts`-th time; `age_s` is
    how long ago the record entered its stream. The error's class says (errors.RecordAction)."""
    if isinstance(error, RecordError) or not isinstance(error, ReplicatorError):
        # Refused by the decoder, or our own code fails on this record: it would the same again.
        return Verdict.DEAD_LETTER
    if error.record is RecordAction.DEAD_LETTER:
        return Verdict.DEAD_LETTER  # the record is refused: no retry can change that
    if error.record is RecordAction.RETRY:
        # The service's trouble (or this host's clock), not the record's: wait until it passes.
        return Verdict.RETRY
    if attempts >= tuning.max_record_attempts:
        return Verdict.DEAD_LETTER
    if tuning.max_record_age_s is not None and age_s >= tuning.max_record_age_s:
        return Verdict.DEAD_LETTER
    return Verdict.RETRY


def reason_of(error: BaseException) -> str:
    """The dead-letter reason and metric label for an error (bounded set of values)."""
    if isinstance(error, RecordError):
        return "bad_record"
    if isinstance(error, InvalidRequest):
        return "rejected"
    if isinstance(error, ReplicatorError):
        return error.kind
    return "internal_error"


class GaveUp(enum.Enum):
    GAVE_UP = "gave up"


GAVE_UP: Literal[GaveUp.GAVE_UP] = GaveUp.GAVE_UP


@dataclass(frozen=True)
class Arrival:
    """A record as it arrived, and when it entered its stream: what goes to the dead-letter queue
    if the record is given up. `source` is a Kinesis payload (bytes) or a DynamoDB stream
    record; the latter is rendered as JSON text only if it is ever sent."""

    source: bytes | dict[str, Any]
    created_s: float

    @property
    def content(self) -> str:
        return "replication_record" if isinstance(self.source, bytes) else "stream_record"

    def payload(self) -> bytes | str:
        return self.source if isinstance(self.source, bytes) else stream_record_text(self.source)


class RecordRetry:
    """Per-record retries and dead letters for one pipeline of one pair."""

    def __init__(
        self, pair: str, role: str, dlq: DeadLetterQueue, tuning: Tuning, metrics: Metrics, stop: asyncio.Event
    ) -> None:
        self.pair = pair
        self.role = role
        self.dlq = dlq
        self.tuning = tuning
        self.metrics = metrics
        self.stop = stop

    async def run(self, step: Callable[[], Awaitable[T]], letter: Arrival, what: str) -> T | Literal[GaveUp.GAVE_UP]:
        """Run `step` until it succeeds, or dead-letter `letter` and return GAVE_UP. Raises
        Abandoned if stopping while waiting to retry, LeaseLost if the shard was taken."""
        attempts = 0
        while True:
            try:
                return await step()
            except (LeaseLost, Abandoned):
                raise
            except Exception as exc:  # noqa: BLE001 - whatever one record raises is judged, never fatal
                error = exc
            attempts += 1
            reason = reason_of(error)
            self.metrics.errors.labels(self.role, reason).inc()
            if verdict(error, attempts, time.time() - letter.created_s, self.tuning) is Verdict.DEAD_LETTER:
                if not isinstance(error, ReplicatorError | RecordError):
                    log.error("%s %s: %s failed with an unexpected error; the record goes to the dead-letter "
                              "queue", self.role, self.pair, what, exc_info=error)
                await self.dead_letter(reason, f"{what}: {error}" if attempts == 1 else
                                       f"{what}: {error} (after {attempts} attempts)", letter)
                return GAVE_UP
            log.warning("%s %s: %s failed: %s (attempt %d)", self.role, self.pair, what, error, attempts)
            if await sleep_or_stop(self.stop, backoff_s(attempts, self.tuning)):
                raise Abandoned

    async def dead_letter(self, reason: str, detail: str, letter: Arrival) -> None:
        """Send `letter` with its reason until the queue accepts it (there is nowhere else to put it)."""
        attempts = 0
        while True:
            try:
                await self.dlq.send(self.pair, self.role, reason, detail, letter.payload(), letter.content)
                return
            except ReplicatorError as exc:
                attempts += 1
                self.metrics.errors.labels(self.role, f"dlq_{exc.kind}").inc()
                log.warning("%s %s: cannot send to the dead-letter queue: %s (attempt %d); the record is held",
                            self.role, self.pair, exc, attempts)
            if await sleep_or_stop(self.stop, backoff_s(attempts, self.tuning)):
                raise Abandoned

    async def dead_letter_many(self, letters: Sequence[tuple[str, str, Arrival]]) -> None:
        """Send many records at once, each (reason, detail, letter), in batches, until the queue has
        taken every one (a page's junk: a flood of it costs a tenth of the calls, side by side with
        the page's good records). Raises Abandoned if stopping while the queue refuses them."""
        pending = [Outgoing(self.pair, self.role, reason, detail, letter.payload(), letter.content)
                   for reason, detail, letter in letters]
        attempts = 0
        while pending:
            failed = await self.dlq.send_many(pending)
            pending = [pending[i] for i in failed]
            if not pending:
                return
            attempts += 1
            log.warning("%s %s: %d dead letters not taken by the queue (attempt %d); their records are held",
                        self.role, self.pair, len(pending), attempts)
            if await sleep_or_stop(self.stop, backoff_s(attempts, self.tuning)):
                raise Abandoned

    async def step(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        """A step of a whole page (a batch read of tombstones, say): retried until it succeeds, as
        it concerns no record in particular. Raises Abandoned if stopping."""
        attempts = 0
        while True:
            try:
                return await step()
            except ReplicatorError as exc:
                if isinstance(exc, LeaseLost):
                    raise
                attempts += 1
                self.metrics.errors.labels(self.role, exc.kind).inc()
                log.warning("%s %s: %s failed: %s (attempt %d)", self.role, self.pair, what, exc, attempts)
            if await sleep_or_stop(self.stop, backoff_s(attempts, self.tuning)):
                raise Abandoned
