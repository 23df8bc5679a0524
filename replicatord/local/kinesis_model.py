"""Kinesis as AWS has it, around moto's backend (aws_behaviour.py says what): read limits per
shard, entries throttled one by one, iterators that expire, retention."""

from __future__ import annotations

import time
from typing import Any

from replicatord.local.aws_state import STATE, _error

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
