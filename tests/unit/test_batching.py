"""PutRecords batching within Kinesis limits: 500 records and 5 MiB per call, 1 MiB per record."""

from __future__ import annotations

import random

import pytest

from replicatord.records import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MAX_RECORD_BYTES,
    Entry,
    oversized,
    plan_batches,
    same_key_runs,
)

MIB = 1024 * 1024


def entry(size: int, key: str = "k", tag: int = 0) -> Entry:
    """An entry whose Kinesis size (data + partition key bytes) is exactly `size`."""
    key_bytes = len(key.encode())
    assert size >= key_bytes
    prefix = str(tag).encode()[: size - key_bytes]
    return Entry(prefix + b"x" * (size - key_bytes - len(prefix)), key)


def tagged(n: int, size: int = 10) -> list[Entry]:
    return [entry(size, key=f"k{i:04d}", tag=i) for i in range(n)]


def check_batches(entries: list[Entry], batches: list[list[Entry]], max_records: int, max_bytes: int) -> None:
    assert all(batches), "no empty batch"
    assert [e for batch in batches for e in batch] == entries, "every entry once, in order"
    for batch in batches:
        assert len(batch) <= max_records
        assert sum(e.size for e in batch) <= max_bytes


def test_limits_are_kinesis_limits() -> None:
    assert MAX_BATCH_RECORDS == 500
    assert MAX_BATCH_BYTES == 5 * MIB
    assert MAX_RECORD_BYTES == MIB


def test_entry_size_counts_data_and_partition_key_bytes() -> None:
    assert Entry(b"abc", "k").size == 4
    assert Entry(b"abc", "é").size == 5  # UTF-8 bytes, not characters
    assert Entry(b"", "0" * 256).size == 256


def test_no_entries_no_batches() -> None:
    assert list(plan_batches([])) == []


@pytest.mark.parametrize(
    ("count", "sizes"),
    [
        (1, [1]),
        (499, [499]),
        (500, [500]),
        (501, [500, 1]),
        (999, [500, 499]),
        (1000, [500, 500]),
        (1001, [500, 500, 1]),
    ],
)
def test_record_count_boundary(count: int, sizes: list[int]) -> None:
    entries = tagged(count)
    batches = list(plan_batches(entries))
    assert [len(b) for b in batches] == sizes
    check_batches(entries, batches, MAX_BATCH_RECORDS, MAX_BATCH_BYTES)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([MIB] * 5, [5]),  # exactly 5 MiB fits
        ([MIB] * 6, [5, 1]),
        ([MIB] * 5 + [1], [5, 1]),  # one byte over starts a new batch
        ([MIB - 1] * 5 + [5], [6]),  # 5 MiB - 5 + 5 = exactly 5 MiB
        ([MIB - 1] * 5 + [6], [5, 1]),
        ([1, MIB, MIB, MIB, MIB, MIB], [5, 1]),
        ([3 * MIB, 2 * MIB, 1], [2, 1]),
    ],
    ids=["exact_5MiB", "six_MiB", "one_byte_over", "exact_with_small", "small_over", "front_byte", "big"],
)
def test_byte_boundary(sizes: list[int], expected: list[int]) -> None:
    entries = [entry(s, tag=i) for i, s in enumerate(sizes)]
    batches = list(plan_batches(entries))
    assert [len(b) for b in batches] == expected
    check_batches(entries, batches, MAX_BATCH_RECORDS, MAX_BATCH_BYTES)


def test_partition_key_bytes_count_toward_the_batch_limit() -> None:
    # Data alone sums to exactly 5 MiB; the partition keys push it over.
    key = "p" * 256
    entries = [Entry(b"x" * MIB, key) for _ in range(5)]
    assert sum(len(e.data) for e in entries) == MAX_BATCH_BYTES
    batches = list(plan_batches(entries))
    assert [len(b) for b in batches] == [4, 1]
    check_batches(entries, batches, MAX_BATCH_RECORDS, MAX_BATCH_BYTES)


def test_both_limits_at_once() -> None:
    # 600 records of 10 KiB: 500 would be 5000 KiB < 5 MiB, so the count limit cuts first.
    entries = tagged(600, size=10 * 1024)
    assert [len(b) for b in plan_batches(entries)] == [500, 100]
    # 600 records of 20 KiB: the byte limit cuts at 256 records (5 MiB / 20 KiB).
    entries = tagged(600, size=20 * 1024)
    assert [len(b) for b in plan_batches(entries)] == [256, 256, 88]


@pytest.mark.parametrize(
    ("max_records", "max_bytes", "sizes", "expected"),
    [
        (3, 1000, [1] * 7, [3, 3, 1]),
        (1, 1000, [1] * 3, [1, 1, 1]),
        (100, 10, [4] * 5, [2, 2, 1]),
        (100, 10, [5] * 4, [2, 2]),
        (100, 10, [10, 1, 9, 10], [1, 2, 1]),
        (2, 10, [3, 3, 3, 3, 3], [2, 2, 1]),
    ],
)
def test_custom_limits(max_records: int, max_bytes: int, sizes: list[int], expected: list[int]) -> None:
    entries = [entry(s) for s in sizes]
    batches = list(plan_batches(entries, max_records=max_records, max_bytes=max_bytes))
    assert [len(b) for b in batches] == expected
    check_batches(entries, batches, max_records, max_bytes)


def test_entry_larger_than_batch_limit_goes_alone() -> None:
    # Precondition violated (filter with `oversized` first), but no empty batch and order kept.
    entries = [entry(2), entry(20), entry(2)]
    batches = list(plan_batches(entries, max_bytes=10))
    assert batches == [[entries[0]], [entries[1]], [entries[2]]]


@pytest.mark.parametrize("seed", range(20))
def test_random_streams_stay_within_limits(seed: int) -> None:
    rng = random.Random(seed)
    max_records = rng.choice([1, 2, 7, 50, 500])
    max_bytes = rng.choice([64, 1000, 50_000, MAX_BATCH_BYTES])
    upper = min(max_bytes, 40_000)
    entries = [entry(rng.randint(1, upper), tag=i) for i in range(rng.randint(0, 400))]
    batches = list(plan_batches(iter(entries), max_records=max_records, max_bytes=max_bytes))
    check_batches(entries, batches, max_records, max_bytes)
    # greedy: each batch but the last was cut because the next entry did not fit
    for batch, nxt in zip(batches, batches[1:], strict=False):
        assert len(batch) == max_records or sum(e.size for e in batch) + nxt[0].size > max_bytes


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1, False), (MIB - 1, False), (MIB, False), (MIB + 1, True), (5 * MIB, True)],
)
def test_oversized(size: int, expected: bool) -> None:
    assert oversized(entry(size)) is expected


def test_oversized_counts_the_partition_key() -> None:
    assert not oversized(Entry(b"x" * (MIB - 64), "k" * 64))
    assert oversized(Entry(b"x" * (MIB - 63), "k" * 64))


def test_same_key_runs_keep_each_key_in_order() -> None:
    runs = same_key_runs([("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5), ("a", 6)])
    assert runs == {"a": [1, 3, 6], "b": [2, 5], "c": [4]}
    assert list(runs) == ["a", "b", "c"]
