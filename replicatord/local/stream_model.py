"""DynamoDB Streams as AWS has them, in place of moto's single shard (aws_behaviour.py says what):
shards that roll over and age out, whole-second creation times, iterators that expire, read
limits, a stream disabled and enabled again, ListStreams of the disabled ones, TTL sweeps."""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from replicatord.local.aws_state import STATE, _error

# --- DynamoDB Streams ------------------------------------------------------------------------


@dataclass
class StreamShardModel:
    id: str
    parent: str | None
    start_seq: int
    created_at: float
    records: list[tuple[float, Any]] = field(default_factory=list)  # (arrival, moto StreamRecord)
    sequences: list[int] = field(default_factory=list)  # of `records`, for finding a position
    closed_at: float | None = None
    end_seq: int | None = None
    trimmed_through: int | None = None  # highest sequence number trimmed away

    def to_json(self) -> dict[str, Any]:
        seq_range = {"StartingSequenceNumber": str(self.start_seq)}
        if self.end_seq is not None:
            seq_range["EndingSequenceNumber"] = str(self.end_seq)
        out: dict[str, Any] = {"ShardId": self.id, "SequenceNumberRange": seq_range}
        if self.parent:
            out["ParentShardId"] = self.parent
        return out


def _shard_id(now: float) -> str:
    return f"shardId-{int(now * 1000):020d}-{random.getrandbits(32):08x}"


class StreamModel:
    """One DynamoDB stream of a table: shards that roll over and age out. Stands where moto's
    Table keeps its single StreamShard (`table.stream_shard`), so every write reaches `add`."""

    def __init__(self, account_id: str, table: Any) -> None:
        self.account_id = account_id
        self.table = table
        self.label: str = table.latest_stream_label
        self.arn = f"{table.table_arn}/stream/{self.label}"
        self.view_type: str = table.stream_specification["StreamViewType"]
        self.created_on = dt.datetime.now(dt.UTC)
        now = time.time()
        self.next_seq = 100_000_000_000_000_000_000 + int(now * 1000) * 1000
        self.shards = [StreamShardModel(_shard_id(now), None, self.next_seq, now)]
        self.disabled_at: float | None = None
        STATE.streams[table.name, self.label] = self

    # moto's Table calls these --------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.shards[-1].id

    def add(self, old: Any, new: Any) -> None:
        from moto.dynamodb.models.table import StreamRecord

        self.maintain()
        if self.disabled_at is not None:
            return
        event = "INSERT" if old is None else "REMOVE" if new is None else "MODIFY"
        seq = self.next_seq
        self.next_seq += 1 + random.randrange(100)  # increasing, not contiguous, as on AWS
        record = StreamRecord(self.table, self.view_type, event, old, new, seq)
        ddb = record.record["dynamodb"]
        created = dt.datetime.now(dt.UTC)
        if STATE.behaviour.whole_second_timestamps:
            created = created.replace(microsecond=0)
        ddb["ApproximateCreationDateTime"] = created
        record.record["awsRegion"] = self.table.region_name
        if STATE.system_delete and event == "REMOVE":
            record.record["userIdentity"] = {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}
        self.shards[-1].records.append((time.time(), record))
        self.shards[-1].sequences.append(seq)

    # the stream's life ---------------------------------------------------------------------
    def disable(self) -> None:
        self.maintain()
        self._close(self.shards[-1], time.time())
        self.disabled_at = time.time()

    def rollover(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        current = self.shards[-1]
        if current.closed_at is not None:
            return
        self._close(current, now)
        self.shards.append(StreamShardModel(_shard_id(now), current.id, self.next_seq, now))

    def _close(self, shard: StreamShardModel, now: float) -> None:
        if shard.closed_at is None:
            shard.closed_at = now
            # The last sequence number the shard holds; an empty shard ends where it started.
            last = shard.records[-1][1].record["dynamodb"]["SequenceNumber"] if shard.records else shard.start_seq
            shard.end_seq = int(last)

    def maintain(self) -> None:
        """Roll over and age out, as time has passed."""
        b = STATE.behaviour
        now = time.time()
        current = self.shards[-1]
        if (self.disabled_at is None and b.stream_rollover_s is not None
                and now - current.created_at >= b.stream_rollover_s):
            self.rollover(now)
        for shard in self.shards:
            gone = 0
            while gone < len(shard.records) and now - shard.records[gone][0] >= b.stream_retention_s:
                gone += 1
            if gone:
                shard.trimmed_through = shard.sequences[gone - 1]
                del shard.records[:gone], shard.sequences[:gone]
        self.shards = [s for s in self.shards if s.closed_at is None or now - s.closed_at < b.stream_retention_s]

    def shard(self, shard_id: str) -> StreamShardModel:
        self.maintain()
        for shard in self.shards:
            if shard.id == shard_id:
                return shard
        raise _error("ResourceNotFoundException", "Requested resource not found: Shard does not exist")

    def describe(self, limit: int, exclusive_start: str | None) -> dict[str, Any]:
        self.maintain()
        shards = self.shards
        if exclusive_start is not None:
            ids = [s.id for s in shards]
            shards = shards[ids.index(exclusive_start) + 1:] if exclusive_start in ids else []
        page = shards[:limit]
        out: dict[str, Any] = {
            "StreamArn": self.arn,
            "StreamLabel": self.label,
            "StreamStatus": "DISABLED" if self.disabled_at is not None else "ENABLED",
            "StreamViewType": self.view_type,
            "CreationRequestDateTime": self.created_on,
            "TableName": self.table.name,
            "KeySchema": self.table.schema,
            "Shards": [s.to_json() for s in page],
        }
        if len(shards) > limit:
            out["LastEvaluatedShardId"] = page[-1].id
        return out


def list_table_streams(table: str | None, limit: int, exclusive_start: str | None) -> dict[str, Any]:
    """ListStreams: every stream still readable, of `table` or of every table, oldest first."""
    now = time.time()
    retention_s = STATE.behaviour.stream_retention_s
    found = sorted((stream for stream in STATE.streams.values()
                    if (table is None or stream.table.name == table)
                    and (stream.disabled_at is None or now - stream.disabled_at < retention_s)),
                   key=lambda stream: (stream.table.name, stream.label))
    arns = [stream.arn for stream in found]
    if exclusive_start is not None:
        found = found[arns.index(exclusive_start) + 1:] if exclusive_start in arns else []
    page = found[:limit]
    out: dict[str, Any] = {"Streams": [{"StreamArn": s.arn, "TableName": s.table.name, "StreamLabel": s.label}
                                       for s in page]}
    if len(found) > limit:
        out["LastEvaluatedStreamArn"] = page[-1].arn
    return out


def _stream_of(arn: str) -> StreamModel:
    try:
        table = arn.split(":", 6)[5].split("/")[1]
        label = arn.split("/stream/", 1)[1]
        stream: StreamModel = STATE.streams[table, label]
        return stream
    except (IndexError, KeyError):
        raise _error("ResourceNotFoundException", f"Requested resource not found: Stream: {arn} not found") from None


def _iterator(arn: str, shard_id: str, position: int) -> str:
    return "|".join([arn, shard_id, str(position), f"{time.time():.3f}"])


def streams_get_shard_iterator(arn: str, shard_id: str, kind: str, sequence: int | None) -> str:
    stream = _stream_of(arn)
    shard = stream.shard(shard_id)
    if kind == "TRIM_HORIZON":
        position = shard.start_seq if shard.trimmed_through is None else shard.trimmed_through + 1
    elif kind == "LATEST":
        position = stream.next_seq if shard.closed_at is None else (shard.end_seq or shard.start_seq) + 1
    elif sequence is None:
        raise _error("ValidationException", "SequenceNumber is required for AT_/AFTER_SEQUENCE_NUMBER")
    else:
        position = sequence if kind == "AT_SEQUENCE_NUMBER" else sequence + 1
        if shard.trimmed_through is not None and position <= shard.trimmed_through:
            raise _error("TrimmedDataAccessException",
                         f"Sequence number {sequence} is before the trim horizon of shard {shard_id}")
    return _iterator(stream.arn, shard.id, position)


def _stream_json(value: Any) -> Any:
    """What JSON holds for a stream record's datetimes (epoch seconds) and binary values (base64)."""
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} in a stream record")


def streams_get_records(iterator: str, limit: int) -> dict[str, Any]:
    try:
        arn, shard_id, position_text, issued_text = iterator.split("|")
        position, issued = int(position_text), float(issued_text)
    except ValueError:
        raise _error("ValidationException", "Invalid ShardIterator") from None
    b = STATE.behaviour
    if time.time() - issued >= b.stream_iterator_expiry_s:
        raise _error("ExpiredIteratorException", "Iterator expired")
    stream = _stream_of(arn)
    shard = stream.shard(shard_id)
    if STATE.over_read_limit((arn, shard_id), b.stream_reads_per_shard_s):
        STATE.faults["dynamodbstreams.read_limit"] += 1
        raise _error("LimitExceededException", f"Rate exceeded for shard {shard_id}")
    if shard.trimmed_through is not None and position <= shard.trimmed_through:
        raise _error("TrimmedDataAccessException", f"Records of shard {shard_id} were trimmed past the iterator")
    first = bisect.bisect_left(shard.sequences, position)
    page = [r for _, r in shard.records[first:first + limit]]
    out: dict[str, Any] = {"Records": [r.to_json() for r in page]}
    next_position = int(page[-1].record["dynamodb"]["SequenceNumber"]) + 1 if page else position
    # A closed shard ends with the page that holds its last record (or an empty page, if none
    # are left after the iterator's position).
    ended = shard.closed_at is not None and all(seq < next_position for seq in shard.sequences[-1:])
    if not ended:
        out["NextShardIterator"] = _iterator(arn, shard_id, next_position)
    return out


def ttl_sweep(table_name: str, attribute: str | None = None, now: float | None = None) -> int:
    """Delete the table's expired items the way DynamoDB's TTL does: REMOVE records made by the
    service. Returns how many were deleted."""
    from moto.dynamodb.models import dynamodb_backends

    now = time.time() if now is None else now
    deleted = 0
    for backends in dynamodb_backends.values():
        for backend in backends.values():
            table = backend.tables.get(table_name)
            if table is None:
                continue
            name = attribute or table.ttl.get("AttributeName")
            if not name:
                raise ValueError(f"table {table_name} has no TTL attribute (update_time_to_live, or give one)")
            expired = []
            for item in _items(table):
                value = item.attrs.get(name)
                if value is not None and value.type == "N" and float(value.value) <= now:
                    key = {table.hash_key_attr: item.hash_key.to_json()}
                    if table.range_key_attr is not None:
                        key[table.range_key_attr] = item.range_key.to_json()
                    expired.append(key)
            STATE.system_delete = True
            try:
                for key in expired:
                    backend.delete_item(table_name, key)
                    deleted += 1
            finally:
                STATE.system_delete = False
    return deleted


def _items(table: Any) -> Iterator[Any]:
    for value in list(table.items.values()):
        if isinstance(value, dict):
            yield from list(value.values())
        else:
            yield value


def _install_streams() -> None:
    _install_table_streams()
    _install_stream_handlers()


def _install_table_streams() -> None:
    """A table's stream as AWS has it: replaced or disabled streams stay readable, and a new one
    may be enabled once the old is disabled."""
    import moto.dynamodb.models.table as table_module
    from moto.dynamodb.models import DynamoDBBackend

    table_module.StreamShard = StreamModel  # type: ignore[misc,assignment]
    set_stream_specification = table_module.Table.set_stream_specification

    def patched_set_stream_specification(self: Any, streams: dict[str, Any] | None) -> None:
        if self.stream_shard is not None:
            self.stream_shard.disable()  # disabled, or replaced: its shards close, it stays readable
        set_stream_specification(self, streams)
        if not self.stream_specification.get("StreamEnabled"):
            self.stream_shard = None  # moto would keep writing to it

    table_module.Table.set_stream_specification = patched_set_stream_specification  # type: ignore[method-assign]

    def update_table_streams(self: Any, table: Any, stream_specification: dict[str, Any]) -> None:
        # moto refuses to enable a stream on a table that ever had one; AWS refuses only while
        # one is enabled (ValidationException "Table already has an enabled stream").
        enabling = stream_specification.get("StreamEnabled") or stream_specification.get("StreamViewType")
        if enabling and table.stream_shard is not None:
            raise _error("ValidationException", f"Table already has an enabled stream: {table.table_arn}")
        table.set_stream_specification(stream_specification)

    DynamoDBBackend.update_table_streams = update_table_streams  # type: ignore[method-assign]


def _install_stream_handlers() -> None:
    """The DynamoDB Streams API answered from `StreamModel`."""
    from moto.core.responses import ActionResult
    from moto.dynamodbstreams.responses import DynamoDBStreamsHandler

    def describe_stream(handler: Any) -> Any:
        limit = handler._get_param("Limit") or 100
        stream = _stream_of(handler._get_param("StreamArn"))
        description = stream.describe(int(limit), handler._get_param("ExclusiveStartShardId"))
        return ActionResult({"StreamDescription": description})

    def get_shard_iterator(handler: Any) -> Any:
        sequence = handler._get_param("SequenceNumber")
        iterator = streams_get_shard_iterator(
            handler._get_param("StreamArn"), handler._get_param("ShardId"), handler._get_param("ShardIteratorType"),
            int(sequence) if sequence is not None else None)
        return ActionResult({"ShardIterator": iterator})

    def get_records(handler: Any) -> Any:
        page = streams_get_records(handler._get_param("ShardIterator"), int(handler._get_param("Limit") or 1000))
        # The response's JSON directly: moto's model-driven serializer walked every attribute of
        # every image and took a third of the emulator's time under load (py-spy).
        return json.dumps(page, default=_stream_json, separators=(",", ":"))

    def list_streams(handler: Any) -> Any:
        # moto lists only each table's latest stream; AWS lists a disabled one too while its
        # records are readable (24 hours), with StreamStatus DISABLED in DescribeStream.
        return ActionResult(list_table_streams(handler._get_param("TableName"), int(handler._get_param("Limit") or 100),
                                               handler._get_param("ExclusiveStartStreamArn")))

    DynamoDBStreamsHandler.list_streams = list_streams  # type: ignore[method-assign,assignment]
    DynamoDBStreamsHandler.describe_stream = describe_stream  # type: ignore[method-assign,assignment]
    DynamoDBStreamsHandler.get_shard_iterator = get_shard_iterator  # type: ignore[method-assign,assignment]
    DynamoDBStreamsHandler.get_records = get_records  # type: ignore[method-assign,assignment]
