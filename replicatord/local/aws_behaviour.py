"""AWS behaviour for the local regions: what AWS does and moto 5.2 does not (docs/design.md §7).

Installed into an emulator process (`emulators.serve --behaviour JSON`), in-process: moto's
backends are Python, so the DynamoDB stream model is replaced and the Kinesis backend wrapped;
a WSGI layer in front of moto adds faults, revoked keys and a control API. Every duration is a
setting, so tests scale AWS's hours down to seconds. What each setting does, as AWS does it:

DynamoDB Streams (https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_streams_GetRecords.html)
- `ApproximateCreationDateTime` rounded down to the second;
- shard rollover every `stream_rollover_s` (about 4 h on AWS): the closed shard gets an
  `EndingSequenceNumber`, its last page has no `NextShardIterator`, and `DescribeStream`
  lists the child with its `ParentShardId` (shards in creation order, paginated);
- retention `stream_retention_s` (24 h): a record older than that is trimmed
  (`TrimmedDataAccessException` for an iterator at or before it), a closed shard leaves
  `DescribeStream` that long after it closed (`ResourceNotFoundException` from then on);
- iterators expire after `stream_iterator_expiry_s` (15 min): `ExpiredIteratorException`;
- at most `stream_reads_per_shard_s` GetRecords per second per shard: `LimitExceededException`;
- a stream disabled and enabled again: the old stream's shards close and it stays readable
  for the retention; the table's `LatestStreamArn` names a new stream;
- TTL deletes (`ttl_sweep`): REMOVE records with `userIdentity` {Type: Service,
  PrincipalId: dynamodb.amazonaws.com}.
Kinesis (https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetRecords.html)
- at most `kinesis_reads_per_shard_s` GetRecords per second per shard for all consumers
  together (`ProvisionedThroughputExceededException`; the iterator stays valid);
- a share `kinesis_put_throttle_rate` of PutRecords entries refused per entry with
  `ProvisionedThroughputExceededException`;
- iterators expire after `kinesis_iterator_expiry_s` (5 min): `ExpiredIteratorException`;
- retention `kinesis_retention_s` (24 h): older records are trimmed, and an iterator from a
  sequence number before the trim point reads on from the oldest record left, without an
  error (what AWS does: observed in harlow/kinesis-consumer#125, and what AWS's own DynamoDB
  Streams adapter says of Kinesis; no TrimmedDataAccessException).
Every service
- `throttle_rate`, `error_rate` (HTTP 500 before the call) and `error_after_rate` (HTTP 500
  after the call took effect) on calls whose User-Agent contains `faults_user_agent` (the
  daemons' aiobotocore; tests' own boto3 calls are spared unless it is set to "");
- a revoked access key (`revoke`) gets `UnrecognizedClientException` (HTTP 400), as a deleted
  or deactivated IAM key does;
- the region's clock is `clock_offset_s` ahead of the host's: it is every response's `Date`, and
  a request signed further than `signature_window_s` from it (Kinesis and SSM: 5 min, not 15) is
  refused as AWS refuses it; with `iam_record` each request's IAM authorizations are counted per
  access key, and a key given policies in `iam_policies` is refused what they do not allow
  (the answers, and where they come from: local/iam_recorder.py).

Control API, on the emulator's own port: POST /_replicatord/behaviour (JSON: settings to
change), /_replicatord/revoke and /unrevoke ({"access_key_id"}), /_replicatord/ttl-sweep
({"table", "attribute"?}), /_replicatord/rollover ({"table"}), GET /_replicatord/stats (calls
per operation, of all clients and of aiobotocore's (the daemons'), and faults injected),
POST /_replicatord/stats/reset, /_replicatord/iam-calls and /iam-calls/reset. `Control` is its
client (over https too).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import dataclasses
import datetime as dt
import email.utils
import functools
import json
import os
import random
import ssl
import time
import urllib.request
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from replicatord.iam import Call
from replicatord.local import iam_recorder

CONTROL_PREFIX = "/_replicatord/"


@dataclass
class Behaviour:
    """AWS's limits and failures, with time scaled as a test wants. None switches one off."""

    whole_second_timestamps: bool = True
    stream_rollover_s: float | None = 4 * 3600
    stream_retention_s: float = 24 * 3600
    stream_iterator_expiry_s: float = 15 * 60
    stream_reads_per_shard_s: float | None = 5
    kinesis_reads_per_shard_s: float | None = 5
    kinesis_iterator_expiry_s: float = 5 * 60
    kinesis_retention_s: float = 24 * 3600
    kinesis_put_throttle_rate: float = 0.0
    throttle_rate: float = 0.0
    error_rate: float = 0.0
    error_after_rate: float = 0.0
    faults_user_agent: str = "aiobotocore"
    seed: int | None = None
    iam_record: bool = False
    iam_policies: dict[str, Any] = field(default_factory=dict)  # access key id -> policy document(s)
    # Refuse every access key but those of `iam_policies` and the tests' own (LOCAL_CREDENTIALS), as
    # AWS refuses a key it does not know: UnrecognizedClientException.
    iam_known_keys_only: bool = False
    clock_offset_s: float = 0.0  # the region's clock is this far ahead of the host's
    signature_window_s: float = 15 * 60
    signature_window_by_service_s: dict[str, float] = field(
        default_factory=lambda: {"kinesis": 5 * 60.0, "ssm": 5 * 60.0})

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown behaviour settings: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self, name, value)


TESTS_KEY = "testing"  # the access key of the tests' own clients (emulators.LOCAL_CREDENTIALS)

# The end-to-end tests' world: AWS's behaviour with hours made seconds, and a little of every
# failure. Rollover every few seconds, retention long enough that only the tests about it see it.
TEST_BEHAVIOUR: dict[str, Any] = {
    "stream_rollover_s": 4.0,
    "stream_retention_s": 600.0,
    "stream_iterator_expiry_s": 20.0,
    "kinesis_iterator_expiry_s": 10.0,
    "kinesis_retention_s": 600.0,
    "kinesis_put_throttle_rate": 0.01,
    "throttle_rate": 0.005,
    "error_rate": 0.003,
    "error_after_rate": 0.003,
    "iam_record": True,
}


class State:
    """Everything the layer holds in one emulator process (which serves one request at a time)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.random = random.Random(behaviour.seed)
        self.revoked: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.daemon_calls: Counter[str] = Counter()  # calls made with aiobotocore: the daemons' (or the sample's)
        self.faults: Counter[str] = Counter()
        self.iam_calls: Counter[tuple[str, Call]] = Counter()  # (access key, iam.Call) -> requests
        self.busy_s: defaultdict[str, float] = defaultdict(float)  # time spent serving each operation (all callers)
        self.reads: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self.streams: dict[tuple[str, str], StreamModel] = {}  # (table, stream label) -> stream
        self.system_delete = False  # set while a TTL sweep deletes

    def over_read_limit(self, key: tuple[str, str], per_s: float | None) -> bool:
        """Count a GetRecords on a shard; True if it is over `per_s` in the last second."""
        if per_s is None:
            return False
        now = time.monotonic()
        window = self.reads[key]
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= per_s:
            return True
        window.append(now)
        return False


STATE = State(Behaviour())


def _error(code: str, message: str) -> Exception:
    from moto.core.exceptions import JsonRESTError

    return JsonRESTError(code, message)


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
        return STATE.streams[table, label]
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


# --- Kinesis -----------------------------------------------------------------------------------


def _kinesis_trim(stream: Any) -> None:
    cutoff = time.time() - STATE.behaviour.kinesis_retention_s
    for shard in stream.shards.values():
        while shard.records:
            first = next(iter(shard.records))
            if shard.records[first].created_at > cutoff:
                break
            del shard.records[first]


def _wrap(iterator: str) -> str:
    return f"{iterator}~{time.time():.3f}"


def _unwrap(iterator: str) -> str:
    inner, sep, issued = iterator.rpartition("~")
    if not sep:
        raise _error("InvalidArgumentException", "Invalid ShardIterator")
    if time.time() - float(issued) >= STATE.behaviour.kinesis_iterator_expiry_s:
        raise _error("ExpiredIteratorException", "Iterator expired. The iterator was created too long ago.")
    return inner


def _install_kinesis() -> None:
    from moto.kinesis.models import KinesisBackend
    from moto.kinesis.utils import decompose_shard_iterator

    get_shard_iterator = KinesisBackend.get_shard_iterator
    get_records = KinesisBackend.get_records
    put_records = KinesisBackend.put_records

    def patched_get_shard_iterator(self: Any, stream_arn: Any, stream_name: Any, *args: Any) -> str:
        _kinesis_trim(self.describe_stream(stream_arn=stream_arn, stream_name=stream_name))
        return _wrap(get_shard_iterator(self, stream_arn, stream_name, *args))

    def patched_get_records(self: Any, stream_arn: Any, shard_iterator: str, limit: Any) -> Any:
        inner = _unwrap(shard_iterator)
        stream_name, shard_id, _ = decompose_shard_iterator(inner)
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        if STATE.over_read_limit((stream.stream_name, shard_id), STATE.behaviour.kinesis_reads_per_shard_s):
            STATE.faults["kinesis.read_limit"] += 1
            raise _error("ProvisionedThroughputExceededException",
                         f"Rate exceeded for shard {shard_id} in stream {stream.stream_name}")
        _kinesis_trim(stream)
        next_iterator, records, behind = get_records(self, stream_arn, inner, limit)
        return _wrap(next_iterator), records, behind

    def patched_put_records(self: Any, stream_arn: Any, stream_name: Any, records: list[dict[str, Any]]) -> Any:
        rate = STATE.behaviour.kinesis_put_throttle_rate
        refused = {i for i in range(len(records)) if rate and STATE.random.random() < rate}
        kept = [r for i, r in enumerate(records) if i not in refused]
        result = put_records(self, stream_arn, stream_name, kept) if kept else {"Records": []}
        accepted = iter(result["Records"])
        merged = []
        for i in range(len(records)):
            if i in refused:
                STATE.faults["kinesis.put_entry_throttled"] += 1
                merged.append({"ErrorCode": "ProvisionedThroughputExceededException",
                               "ErrorMessage": "Rate exceeded for shard in stream"})
            else:
                merged.append(next(accepted))
        return {"FailedRecordCount": sum(1 for r in merged if "ErrorCode" in r), "Records": merged}

    _speed_up_kinesis_shards()
    KinesisBackend.get_shard_iterator = patched_get_shard_iterator  # type: ignore[method-assign,assignment]
    KinesisBackend.get_records = patched_get_records  # type: ignore[method-assign]
    KinesisBackend.put_records = patched_put_records  # type: ignore[method-assign]


def _speed_up_kinesis_shards() -> None:
    """moto's Kinesis shard finds its last sequence number by listing every record (on each put)
    and pages by walking from the first record: a stream holding many records slows every call.
    Its sequence numbers are consecutive integers, trimmed only from the front (`_kinesis_trim`):
    the same answers by index. Falls back to moto's walk if that ever does not hold."""
    from moto.kinesis.models import Shard

    walk = Shard.get_records

    def last_sequence(self: Any) -> int:
        return next(reversed(self.records)) if self.records else 0

    def get_records(self: Any, last_sequence_id: str, limit: int | None) -> Any:
        if not self.records:
            return walk(self, last_sequence_id, limit)
        first, last = next(iter(self.records)), next(reversed(self.records))
        if last - first + 1 != len(self.records):
            return walk(self, last_sequence_id, limit)
        start = max(int(last_sequence_id) + 1, first)
        stop = last if limit is None else min(last, start + limit - 1)
        results = [self.records[n] for n in range(start, stop + 1)]
        if not results:
            return [], int(last_sequence_id), 0
        behind_s = self.records[last].created_at - results[-1].created_at
        return results, results[-1].sequence_number, int(behind_s * 1000)

    Shard.get_max_sequence_number = last_sequence  # type: ignore[method-assign]
    Shard.get_records = get_records  # type: ignore[method-assign]


def _install_streams() -> None:
    import moto.dynamodb.models.table as table_module
    from moto.core.responses import ActionResult
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodbstreams.responses import DynamoDBStreamsHandler

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


# --- the WSGI layer: faults, revoked keys, control ---------------------------------------------

_THROTTLE = {
    "dynamodb": "ProvisionedThroughputExceededException",
    "dynamodbstreams": "LimitExceededException",
    "kinesis": "ProvisionedThroughputExceededException",
    "ssm": "ThrottlingException",
    "sqs": "ThrottlingException",
}
_INTERNAL = {"kinesis": "InternalFailure", "sqs": "InternalError"}
_TARGETS = {"DynamoDB_20120810": "dynamodb", "DynamoDBStreams_20120810": "dynamodbstreams",
            "Kinesis_20131202": "kinesis", "AmazonSSM": "ssm", "AmazonSQS": "sqs"}

StartResponse = Callable[..., Any]


def _json_error(start_response: StartResponse, status: str, code: str, message: str,
                headers: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    body = json.dumps({"__type": code, "message": message}).encode()
    start_response(status, [("Content-Type", "application/x-amz-json-1.1"),
                            ("x-amzn-ErrorType", code.rpartition("#")[2]), ("x-amzn-RequestId", os.urandom(8).hex()),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


# --- the region's clock ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _http_date(epoch_s: int) -> str:
    return email.utils.formatdate(epoch_s, usegmt=True)  # RFC 7231's IMF-fixdate


def _dated(start_response: StartResponse) -> StartResponse:
    """`start_response` with the region's clock as the response's one Date header (the emulator's
    request handler adds its own only to a response without one)."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        headers = [h for h in headers if h[0].lower() != "date"]
        headers.append(("Date", _http_date(int(time.time() + STATE.behaviour.clock_offset_s))))
        return start_response(status, headers, exc_info)

    return start


class Layer:
    """WSGI middleware in front of moto's application."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response = _dated(start_response)
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX):
            return self.control(path[len(CONTROL_PREFIX):], environ, start_response)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        prefix, _, operation = target.partition(".")
        service = _TARGETS.get(prefix)
        if service is None:
            return self.app(environ, start_response)
        name = f"{service}.{operation}"
        STATE.calls[name] += 1
        if "aiobotocore" in environ.get("HTTP_USER_AGENT", ""):
            STATE.daemon_calls[name] += 1
        started = time.perf_counter()
        try:
            return self._serve(service, operation, environ, start_response)
        finally:
            STATE.busy_s[name] += time.perf_counter() - started

    def _serve(self, service: str, operation: str, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        b = STATE.behaviour
        stamp = environ.get("HTTP_X_AMZ_DATE")
        if stamp:
            window = b.signature_window_by_service_s.get(service, b.signature_window_s)
            refused = iam_recorder.signature_time_refusal(service, stamp, time.time() + b.clock_offset_s, window)
            if refused is not None:
                STATE.faults["signature_time"] += 1
                return _json_error(start_response, refused.status, refused.type, refused.message, refused.headers)
        credential = iam_recorder.credential(environ.get("HTTP_AUTHORIZATION", ""))
        unknown = (b.iam_known_keys_only and credential is not None
                   and credential.access_key not in b.iam_policies and credential.access_key != TESTS_KEY)
        if credential is not None and (credential.access_key in STATE.revoked or unknown):
            STATE.faults["revoked_key" if not unknown else "unknown_key"] += 1
            return _json_error(start_response, "400 Bad Request", "UnrecognizedClientException",
                               "The security token included in the request is invalid.")
        if credential is not None and (b.iam_record or credential.access_key in b.iam_policies):
            record = STATE.iam_calls if b.iam_record else None
            refused = iam_recorder.authorize(service, operation, credential, environ, record, b.iam_policies)
            if refused is not None:
                STATE.faults["iam_denied"] += 1
                return _json_error(start_response, refused.status, refused.type, refused.message, refused.headers)
        if b.faults_user_agent not in environ.get("HTTP_USER_AGENT", ""):
            return self.app(environ, start_response)
        draw = STATE.random.random()
        if draw < b.throttle_rate:
            STATE.faults[f"{service}.throttled"] += 1
            return _json_error(start_response, "400 Bad Request", _THROTTLE[service], "Rate exceeded")
        draw -= b.throttle_rate
        internal = _INTERNAL.get(service, "InternalServerError")
        if draw < b.error_rate:
            STATE.faults[f"{service}.error_before"] += 1
            return _json_error(start_response, "500 Internal Server Error", internal, "Internal server error")
        draw -= b.error_rate
        if draw < b.error_after_rate:
            STATE.faults[f"{service}.error_after"] += 1
            for _ in self.app(environ, lambda *args, **kwargs: None):  # the call takes effect
                pass
            return _json_error(start_response, "500 Internal Server Error", internal, "Internal server error")
        return self.app(environ, start_response)

    def control(self, command: str, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            request = json.loads(environ["wsgi.input"].read(length) or b"{}")
            result = self._command(command, request)
        except (ValueError, KeyError, TypeError) as exc:
            body = json.dumps({"error": str(exc)}).encode()
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [body]
        body = json.dumps(result).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def _command(self, command: str, request: dict[str, Any]) -> Any:
        if command == "behaviour":
            STATE.behaviour.update(request)
            if "seed" in request:
                STATE.random.seed(request["seed"])
            return dataclasses.asdict(STATE.behaviour)
        if command == "revoke":
            STATE.revoked.add(request["access_key_id"])
            return {"revoked": len(STATE.revoked)}
        if command == "unrevoke":
            STATE.revoked.discard(request["access_key_id"])
            return {"revoked": len(STATE.revoked)}
        if command == "ttl-sweep":
            return {"deleted": ttl_sweep(request["table"], request.get("attribute"), request.get("now"))}
        if command == "rollover":
            rolled = 0
            for (table, _), stream in STATE.streams.items():
                if table == request["table"] and stream.disabled_at is None:
                    stream.rollover()
                    rolled += 1
            return {"rolled_over": rolled}
        if command == "stats":
            return {"calls": dict(STATE.calls), "daemon_calls": dict(STATE.daemon_calls), "faults": dict(STATE.faults),
                    "busy_s": {name: round(s, 3) for name, s in STATE.busy_s.items()}}
        if command == "iam-calls":
            return iam_recorder.entries(STATE.iam_calls)
        if command == "iam-calls/reset":
            STATE.iam_calls.clear()
            return {}
        if command == "stats/reset":
            STATE.calls.clear()
            STATE.busy_s.clear()
            STATE.daemon_calls.clear()
            STATE.faults.clear()
            return {}
        raise ValueError(f"unknown command {command!r}")


def install(app: Callable[..., Iterable[bytes]], behaviour: Behaviour) -> Layer:
    """Patch moto in this process and return `app` wrapped in the layer."""
    STATE.behaviour = behaviour
    STATE.random.seed(behaviour.seed)
    _install_streams()
    _install_kinesis()
    return Layer(app)


# --- the client ----------------------------------------------------------------------------------


class Control:
    """Drives the layer of one emulator (one region) from a test or the demo. An https emulator's
    certificate is trusted from `ca_bundle`, else from AWS_CA_BUNDLE (as botocore trusts it)."""

    def __init__(self, endpoint_url: str, ca_bundle: str | None = None) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if self.endpoint_url.startswith("https:"):
            self._ssl = ssl.create_default_context(cafile=ca_bundle or os.environ.get("AWS_CA_BUNDLE") or None)

    def _post(self, command: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.endpoint_url}{CONTROL_PREFIX}{command}", data=json.dumps(body or {}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30, context=self._ssl) as response:  # noqa: S310 - loopback
            return json.loads(response.read())

    def behaviour(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._post("behaviour", changes)
        return result

    def revoke(self, access_key_id: str) -> None:
        self._post("revoke", {"access_key_id": access_key_id})

    def unrevoke(self, access_key_id: str) -> None:
        self._post("unrevoke", {"access_key_id": access_key_id})

    def ttl_sweep(self, table: str, attribute: str | None = None) -> int:
        return int(self._post("ttl-sweep", {"table": table, "attribute": attribute})["deleted"])

    def rollover(self, table: str) -> int:
        return int(self._post("rollover", {"table": table})["rolled_over"])

    def stats(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._post("stats")
        return result

    def reset_stats(self) -> None:
        self._post("stats/reset")

    def iam_calls(self) -> list[dict[str, Any]]:
        """The IAM authorizations recorded (`iam_record`): one entry per access key and
        iam.Call, {access_key, action, resource, context, count} (iam_recorder.call_of makes
        the Call of one)."""
        result: list[dict[str, Any]] = self._post("iam-calls")
        return result

    def reset_iam_calls(self) -> None:
        self._post("iam-calls/reset")

    @contextlib.contextmanager
    def changed(self, **changes: Any) -> Iterator[None]:
        """Change settings for the duration of a block."""
        before = self.behaviour()
        self.behaviour(**changes)
        try:
            yield
        finally:
            self.behaviour(**{name: before[name] for name in changes})
