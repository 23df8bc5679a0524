"""The streams a shard consumer reads: DynamoDB Streams and Kinesis behind one interface.

A source lists a stream's shards, gives iterators (from a checkpoint, from the oldest record, or
from a time) and pages of records, and says what a page holds and how fast a shard may be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from replicatord.aws import Aws
from replicatord.budget import Hold
from replicatord.config import Tuning
from replicatord.errors import ReplicatorError
from replicatord.leases import ACTIVE, Lease, latest_since, shard_of
from replicatord.records import creation_seconds


@dataclass(frozen=True)
class Shard:
    id: str
    parent_ids: tuple[str, ...]
    closed: bool = False  # it has an ending sequence number: no record will be added


# The roles of a pipeline: it reads a table's stream and forwards, reads the Kinesis stream peers
# write to and applies, or reads a peer's outbox and ships (one role per peer: shipper_role).
FORWARDER = "forwarder"
APPLIER = "applier"
SHIPPER = "shipper"


def shipper_role(peer: str) -> str:
    """The role of the pipeline that ships `peer`'s outbox: its lease keys, metrics and letters."""
    return f"{SHIPPER}:{peer}"


@dataclass(frozen=True)
class Page:
    records: list[dict[str, Any]]
    next_iterator: str | None
    behind_s: float = 0.0  # Kinesis MillisBehindLatest, when the page is empty
    hold: Hold = field(default_factory=Hold)  # its bytes in the daemon's page budget


class StreamSource(Protocol):
    role: str
    # Names this incarnation of the stream in lease keys: a stream that is deleted and created
    # again (or a DynamoDB stream disabled and enabled again) starts with fresh leases.
    incarnation: str
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
    role = FORWARDER
    silent_trim = False
    retention_s = 24 * 3600.0  # fixed for DynamoDB Streams
    max_page_bytes = 1024 * 1024  # GetRecords answers 1 MB at most

    def page_bytes(self, records: list[dict[str, Any]]) -> int:
        # Parsed by botocore already; an item is 400 KB at most, and the page 1 MB.
        return min(self.max_page_bytes, 2048 * len(records))

    def __init__(self, aws: Aws, table: str, stream_arn: str) -> None:
        self.aws = aws
        self.incarnation = f"{table}@{stream_arn.rsplit('/', 1)[-1]}"
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
    role = APPLIER
    silent_trim = True
    max_page_bytes = 10 * 1024 * 1024  # GetRecords answers 10 MiB at most

    def page_bytes(self, records: list[dict[str, Any]]) -> int:
        return sum(len(r.get("Data", b"")) + 128 for r in records)

    def __init__(self, aws: Aws, stream: str, created: str, retention_s: float = 24 * 3600.0,
                 role: str = APPLIER) -> None:
        self.role = role  # an outbox's: shipper_role(peer)
        self.aws = aws
        self.name = stream
        self.incarnation = f"{stream}@{created}"
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


async def oldest_unprocessed(source: StreamSource, leases: list[Lease], now: float) -> float | None:
    """Age of the oldest record after any active lease's checkpoint (None: nothing waits)."""
    ages = []
    for lease in leases:
        if lease.state != ACTIVE:
            continue
        checkpoint = lease.checkpoint
        try:
            iterator = await iterator_after(source, shard_of(lease.key), checkpoint)
            page = await source.get_records(iterator, 1)
        except ReplicatorError:
            continue
        if page.records:
            ages.append(now - source.created_s(page.records[0]))
    return max(ages, default=None)
