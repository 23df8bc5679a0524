"""Load generator: writes fake user profiles into a table, like the original sample's load_items.py.

Items have the shape the original sample's ``load_items.py`` wrote (string ``PK`` from uuid4, a
faker user profile, ``last_update_timestamp`` and ``last_updater_region``), so the replicator sees
the same traffic. Progress is kept in the ``loader_stats`` table, item ``PK=loaded_count``,
attribute ``cnt``, as in the original sample, so a live display can follow it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import multiprocessing
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from faker import Faker

# Re-exported: the flags moved to load_args so that the CLI can build its parser without faker.
from replicatord.local.load_args import add_arguments as add_arguments

# The original updated loader_stats every 100 items; so does a chunk here.
CHUNK_ITEMS = 100
LOADED_COUNT_KEY = "loaded_count"

# The original retried throttling itself with 2**n s sleeps; botocore's standard mode does the
# same (capped, jittered) for PutItem, BatchWriteItem and UpdateItem.
_BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 10})


class LoadError(Exception):
    """A load failed for a reason the user can act on (missing table, no credentials, ...)."""


def make_item(fake: Faker, region: str, now: float) -> dict[str, Any]:
    """Return one user item in boto3 resource form: strings, and Decimal for numbers (no floats).

    Same attributes as the original ``item_gen``: ``PK`` (a uuid4 string), first_name, last_name,
    email, sex, street_address, state, city, zipcode, country, govid, then
    ``last_update_timestamp`` = ``now`` (epoch seconds, kept to the millisecond) and
    ``last_updater_region`` = ``region``.
    """
    item: dict[str, Any] = {
        "PK": str(uuid.uuid4()),
        "first_name": fake.first_name(),
        "last_name": fake.last_name(),
        # fake.profile() is slow; the original only took these two fields from it, and they
        # come from the same providers.
        "email": fake.free_email(),
        "sex": fake.random_element(("F", "M")),
        "street_address": fake.street_address(),
        "state": fake.state(),
        "city": fake.city(),
        "zipcode": fake.zipcode(),
        "country": fake.country(),
        "govid": fake.ssn(),
    }
    item = {name: _plain(value) for name, value in item.items()}
    item["last_update_timestamp"] = Decimal(f"{now:.3f}")
    item["last_updater_region"] = region
    return item


def _plain(value: Any) -> Any:
    """Make a faker value storable: dates as ISO strings, floats as exact Decimals."""
    if isinstance(value, dt.date):  # datetime is a date too
        return value.isoformat()
    if isinstance(value, float):
        return Decimal(str(value))
    return value


@dataclass(frozen=True)
class _Target:
    table: str
    region: str
    batched: bool
    endpoint_url: str | None
    loader_stats_table: str


class _Writer:
    """Writes chunks of generated items and counts each one in loader_stats. One per process."""

    def __init__(self, target: _Target) -> None:
        self._target = target
        session = boto3.session.Session(region_name=target.region)
        dynamodb = session.resource("dynamodb", endpoint_url=target.endpoint_url, config=_BOTO_CONFIG)
        self._table = dynamodb.Table(target.table)
        self._stats = dynamodb.Table(target.loader_stats_table)
        self._fake = Faker()

    def count_loaded(self, n: int) -> None:
        """Atomically add ``n`` to loader_stats ``cnt`` (creating the item at ``n``)."""
        with _aws_errors(self._target.loader_stats_table, self._target.region):
            self._stats.update_item(
                Key={"PK": LOADED_COUNT_KEY},
                UpdateExpression="ADD cnt :n",
                ExpressionAttributeValues={":n": n},
            )

    def write_chunk(self, n: int) -> int:
        """Write ``n`` new items (all stored when this returns), count them, return ``n``."""
        target = self._target
        items = [make_item(self._fake, target.region, time.time()) for _ in range(n)]
        with _aws_errors(target.table, target.region):
            if target.batched:
                # Leaving the batch writer flushes, resending UnprocessedItems until none are left.
                with self._table.batch_writer() as batch:
                    for item in items:
                        batch.put_item(Item=item)
            else:
                for item in items:
                    self._table.put_item(Item=item)
        self.count_loaded(n)
        return n


@contextlib.contextmanager
def _aws_errors(table: str, region: str) -> Iterator[None]:
    """Turn AWS failures into one-line LoadErrors naming the table involved."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        if code == "ResourceNotFoundException":
            raise LoadError(f"table {table!r} not found in {region}") from exc
        raise LoadError(f"{table!r} in {region}: {code}: {error.get('Message', '')}") from exc
    except BotoCoreError as exc:  # no credentials, endpoint unreachable, ...
        raise LoadError(f"{table!r} in {region}: {exc}") from exc


def _chunks(count: int) -> Iterator[int]:
    for start in range(0, count, CHUNK_ITEMS):
        yield min(CHUNK_ITEMS, count - start)


# One writer per worker process, built by the pool initializer (its own boto3 session and faker).
_worker: _Writer | None = None


def _init_worker(target: _Target) -> None:
    global _worker
    # Ctrl-C is for the parent, which terminates the pool; workers would only print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = _Writer(target)


def _worker_chunk(n: int) -> int:
    if _worker is None:
        raise RuntimeError("load worker used before its pool initializer ran")
    return _worker.write_chunk(n)


def load(
    table: str,
    region: str,
    count: int,
    *,
    batched: bool,
    processes: int = 1,
    endpoint_url: str | None = None,
    loader_stats_table: str = "loader_stats",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``count`` generated items into ``table`` in ``region``; return how many were written.

    ``batched`` uses BatchWriteItem (boto3's batch writer), otherwise one PutItem per item.
    Items go in chunks of at most 100; after each chunk is stored, ``cnt`` of the
    ``loader_stats_table`` item ``PK=loaded_count`` grows by the chunk size (atomic ``ADD``)
    and ``progress`` is called with the total written so far by this call. With
    ``processes > 1`` the chunks are shared among that many spawned worker processes, each with
    its own boto3 session. Credentials come from the default boto3 chain.

    Raises LoadError (a one-line message) if a table is missing or AWS refuses, before writing
    anything if the stats table is missing; chunks stored before a failure stay counted.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    target = _Target(table, region, batched, endpoint_url, loader_stats_table)
    chunks = list(_chunks(count))
    written = 0

    writer = _Writer(target)
    # Creates the stats item if absent and fails before any item is written if the table is missing.
    writer.count_loaded(0)
    if processes == 1 or len(chunks) <= 1:
        for n in chunks:
            written += writer.write_chunk(n)
            if progress is not None:
                progress(written)
        return written

    context = multiprocessing.get_context("spawn")
    with context.Pool(min(processes, len(chunks)), initializer=_init_worker, initargs=(target,)) as pool:
        for n in pool.imap_unordered(_worker_chunk, chunks):
            written += n
            if progress is not None:
                progress(written)
    return written


def run(args: argparse.Namespace) -> int:
    """Run a load from parsed arguments, print a one-line summary; return the exit status."""
    show_progress = sys.stderr.isatty()

    def progress(written: int) -> None:
        print(f"\rloaded {written}/{args.count}", end="", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        written = load(
            args.table,
            args.region,
            args.count,
            batched=args.batched,
            processes=args.processes,
            endpoint_url=args.endpoint_url,
            loader_stats_table=args.loader_stats_table,
            progress=progress if show_progress else None,
        )
    except LoadError as exc:
        if show_progress:
            print(file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Chunks already written stay written and counted in loader_stats.
        print("\ninterrupted", file=sys.stderr)
        return 130
    elapsed_s = time.monotonic() - started
    if show_progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    rate = written / elapsed_s if elapsed_s > 0 else 0.0
    print(f"loaded {written} items into {args.table} ({args.region}) in {elapsed_s:.1f}s, {rate:.0f} items/s")
    return 0
