"""Per-record isolation (issue 7): one record's failure never stops a page, never re-runs it.

The applier and the forwarder run against a fake AWS at the client seam (`Aws.call`): it records
every call, fails the calls it is told to, and holds no table logic (conditions are tested against
the emulator elsewhere). What matters here is which calls happen, and how often.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

import replicatord.applier as applier_module
from replicatord.applier import Applier
from replicatord.config import Conflict, Tuning
from replicatord.conflict import PUT, Version
from replicatord.dlq import DeadLetterQueue
from replicatord.errors import (
    AccessDenied,
    Contended,
    InvalidRequest,
    NotFound,
    ReplicatorError,
    Throttled,
    Transient,
    Unclassified,
    Unreachable,
    classify,
)
from replicatord.forwarder import Forwarder
from replicatord.metrics import Metrics
from replicatord.provenance import Provenance
from replicatord.records import Probe, RecordError, ReplicationRecord, encode_probe, encode_record
from replicatord.retry import Abandoned, Verdict, verdict
from replicatord.tombstones import TombstoneTable
from tests.conftest import replication_put, until
from tests.conftest import stream_record as any_stream_record

TUNING = Tuning(backoff_base_ms=1, backoff_max_ms=2, max_record_attempts=3)
CONFLICT = Conflict()
CN, SG = "cn-north-1", "ap-southeast-1"
NOW = time.time()


# --- the verdict ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "attempts", "age_s", "tuning", "expected"),
    [
        (RecordError("bad"), 1, 0, TUNING, Verdict.DEAD_LETTER),
        (InvalidRequest("ValidationException"), 1, 0, TUNING, Verdict.DEAD_LETTER),
        (KeyError("bug"), 1, 0, TUNING, Verdict.DEAD_LETTER),
        (RecursionError(), 1, 0, TUNING, Verdict.DEAD_LETTER),
        (Throttled("slow down"), 1000, 10**6, TUNING, Verdict.RETRY),
        (Transient("500"), 1000, 10**6, TUNING, Verdict.RETRY),
        (Unreachable("timeout"), 1000, 10**6, TUNING, Verdict.RETRY),
        (Unclassified("SomeFutureException"), 1, 0, TUNING, Verdict.RETRY),
        (Unclassified("SomeFutureException"), 2, 0, TUNING, Verdict.RETRY),
        (Unclassified("SomeFutureException"), 3, 0, TUNING, Verdict.DEAD_LETTER),
        (AccessDenied("denied"), 2, 0, TUNING, Verdict.RETRY),
        (AccessDenied("denied"), 3, 0, TUNING, Verdict.DEAD_LETTER),
        (NotFound("table"), 3, 0, TUNING, Verdict.DEAD_LETTER),
        (Contended("kept changing"), 3, 0, TUNING, Verdict.DEAD_LETTER),
        (Unclassified("x"), 1, 59, Tuning(max_record_attempts=10, max_record_age_s=60), Verdict.RETRY),
        (Unclassified("x"), 1, 60, Tuning(max_record_attempts=10, max_record_age_s=60), Verdict.DEAD_LETTER),
        (Throttled("x"), 1, 600, Tuning(max_record_attempts=10, max_record_age_s=60), Verdict.RETRY),
    ],
)
def test_verdict(error: BaseException, attempts: int, age_s: float, tuning: Tuning, expected: Verdict) -> None:
    assert verdict(error, attempts, age_s, tuning) is expected


# --- a fake AWS at the client seam ---------------------------------------------------------


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "Op")  # type: ignore[arg-type]


Fault = Callable[[str, dict[str, Any]], ReplicatorError | None]


@dataclass
class FakeAws:
    """Records calls; `faults` decide, per call, whether it raises (as `Aws.call` would)."""

    settings: Any = field(default_factory=lambda: SimpleNamespace(region=SG))
    peers: dict[str, Any] = field(default_factory=lambda: {CN: object()})
    refreshed: int = 0
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # every attempt
    accepted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # those that succeeded
    faults: list[Fault] = field(default_factory=list)
    put_records_answers: list[Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = field(default_factory=list)

    async def call(self, service: str, operation: str, *, client: Any = None, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        self.calls.append((operation, kwargs))
        for fault in self.faults:
            error = fault(operation, kwargs)
            if error is not None:
                raise error
        self.accepted.append((operation, kwargs))
        if operation == "batch_get_item":
            return {"Responses": {}}
        if operation == "put_records":
            answer = self.put_records_answers.pop(0) if self.put_records_answers else None
            records = kwargs["Records"]
            return {"Records": answer(records) if answer else [{"SequenceNumber": "1"}] * len(records)}
        return {}

    async def refresh_peer(self, peer: str) -> bool:
        self.refreshed += 1
        return False

    def count(self, operation: str, pk: str | None = None) -> int:
        return sum(1 for op, kw in self.calls if op == operation and (pk is None or _pk(kw) == pk))

    def dead_letters(self) -> list[dict[str, Any]]:
        """Whole dead letters (parts joined), in the order sent."""
        partial: dict[str, list[dict[str, Any]]] = {}
        out = []
        sent = [json.loads(kw["MessageBody"]) for op, kw in self.accepted if op == "send_message"]
        sent += [json.loads(entry["MessageBody"]) for op, kw in self.accepted if op == "send_message_batch"
                 for entry in kw["Entries"]]
        for body in sorted(sent, key=lambda b: float(b["time"])):
            parts = partial.setdefault(body["letter_id"], [])
            parts.append(body)
            if len(parts) == body["parts"]:  # a record sent twice has the same id: two letters
                del partial[body["letter_id"]]
                joined = "".join(p["payload"] for p in sorted(parts, key=lambda p: p["part"]))
                out.append({**body, "payload": base64.b64decode(joined) if body["encoding"] == "base64" else joined})
        return out


def _pk(kwargs: dict[str, Any]) -> str | None:
    for source in (kwargs.get("Item"), kwargs.get("Key")):
        if source and "PK" in source:
            return str(source["PK"].get("S"))
    return None


def fail(operation: str, pk: str | None, error: ReplicatorError, times: int | None = None) -> Fault:
    """Fail `operation` (of item `pk`, if given) with `error`, `times` times or always."""
    left = [times]

    def fault(op: str, kwargs: dict[str, Any]) -> ReplicatorError | None:
        if op != operation or (pk is not None and _pk(kwargs) != pk) or left[0] == 0:
            return None
        if left[0] is not None:
            left[0] -= 1
        return error

    return fault


def put(pk: str, ts: str = "1700000000", region: str = CN, **extra: Any) -> ReplicationRecord:
    return replication_put(pk, ts, region, created_s=NOW, **extra)


def kinesis_page(payloads: list[bytes]) -> list[dict[str, Any]]:
    return [{"Data": data, "SequenceNumber": str(i), "PartitionKey": "k",
             "ApproximateArrivalTimestamp": datetime.fromtimestamp(NOW, UTC)} for i, data in enumerate(payloads)]


def applier(aws: FakeAws, stop: asyncio.Event | None = None, tuning: Tuning = TUNING,
            provenance: Provenance | None = None) -> Applier:
    metrics = Metrics()
    dlq = DeadLetterQueue(aws, "queue", metrics)  # type: ignore[arg-type]
    return Applier(aws, "user", "user-sg", "replicator_stats", TombstoneTable(aws, "tombs", 3600),  # type: ignore[arg-type]
                   CONFLICT, tuning, dlq, metrics, stop or asyncio.Event(), provenance)


# --- the applier ---------------------------------------------------------------------------


async def test_a_failing_record_is_retried_alone_and_the_page_goes_on() -> None:
    """Throttled, refused, unknown and stats failures in one page: each good write happens once."""
    aws = FakeAws(faults=[
        fail("put_item", "throttled", classify(client_error("ProvisionedThroughputExceededException")), times=4),
        fail("put_item", "refused", classify(client_error("ValidationException"))),
        fail("put_item", "unknown", classify(client_error("SomeFutureException"))),
        fail("update_item", None, classify(client_error("InternalServerError", 500)), times=1),
    ])
    names = ["ok-1", "throttled", "ok-2", "refused", "unknown", "ok-3"]
    payloads = [encode_record(put(name)) for name in names]
    target = applier(aws)
    await target.process("shard", kinesis_page(payloads))

    assert {name: aws.count("put_item", name) for name in names} == {
        "ok-1": 1, "ok-2": 1, "ok-3": 1,
        "throttled": 5,  # four throttles, then it lands: retried until the service lets it
        "refused": 1,  # ValidationException: dead-lettered at once
        "unknown": TUNING.max_record_attempts,  # an unknown code: bounded, then dead-lettered
    }
    letters = aws.dead_letters()
    assert [(letter["reason"], letter["payload"]) for letter in letters] == [
        ("rejected", payloads[3]), ("unknown", payloads[4])]
    assert "after 3 attempts" in letters[1]["detail"]
    # The stats counter is written at most every STATS_INTERVAL_S, not per page. It failed
    # once: the page was not run again, the count waits for the next report.
    assert aws.count("update_item") == 0 and target.unreported == 4
    await target.flush_stats()
    assert aws.count("update_item") == 1 and target.unreported == 4
    await target.process("shard", kinesis_page([encode_record(put("ok-4"))]))
    await target.flush_stats()
    assert aws.calls[-1][1]["ExpressionAttributeValues"] == {":n": {"N": "5"}}
    assert target.unreported == 0


async def test_a_dead_letter_the_queue_refuses_holds_the_page_until_it_is_taken() -> None:
    aws = FakeAws(faults=[fail("send_message_batch", None, classify(client_error("ServiceUnavailable", 503)),
                               times=3)])
    await applier(aws).process("shard", kinesis_page([b"{not json", encode_record(put("ok"))]))
    assert aws.count("send_message_batch") == 4  # three refusals, then accepted
    assert aws.count("put_item", "ok") == 1
    assert [letter["payload"] for letter in aws.dead_letters()] == [b"{not json"]


async def test_stopping_abandons_a_record_still_failing() -> None:
    stop = asyncio.Event()
    throttled = fail("put_item", "stuck", classify(client_error("ThrottlingException")))

    def stop_on_second_attempt(op: str, kwargs: dict[str, Any]) -> ReplicatorError | None:
        if op == "put_item" and aws.count("put_item") == 2:
            stop.set()  # shutdown arrives while the record waits for its third attempt
        return throttled(op, kwargs)

    aws = FakeAws(faults=[stop_on_second_attempt])
    target = applier(aws, stop, Tuning(backoff_base_ms=50, backoff_max_ms=50))
    with pytest.raises(Abandoned):
        await asyncio.wait_for(target.process("shard", kinesis_page([encode_record(put("stuck"))])), 30)
    assert aws.count("put_item") == 2
    assert aws.dead_letters() == []  # not given up: replayed from the checkpoint later


async def test_pages_are_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB record takes tens of milliseconds to check; the event loop must not wait for it."""
    import threading

    import replicatord.applier as applier_module

    threads: list[int] = []
    real = applier_module.decode_payload

    def spy(data: bytes) -> ReplicationRecord | Probe:
        threads.append(threading.get_ident())
        return real(data)

    monkeypatch.setattr(applier_module, "decode_payload", spy)
    await applier(FakeAws()).process("shard", kinesis_page([encode_record(put("a"))]))
    assert threads and threading.get_ident() not in threads


RULES = Provenance(SG, frozenset({CN}), (("PK", "S"),), CONFLICT)


async def test_forged_records_are_dead_lettered_with_their_reason_and_the_rest_applied() -> None:
    aws = FakeAws()
    target = applier(aws, provenance=RULES)
    forged = {
        "forged_origin": put("self", region=SG),
        "version_mismatch": ReplicationRecord("PUT", "user", {"PK": {"S": "mismatch"}}, {
            "PK": {"S": "mismatch"}, CONFLICT.timestamp_attribute: {"N": "1700000001"},
            CONFLICT.region_attribute: {"S": CN}}, Version(Decimal("1700000000"), PUT, CN), CN, "1", NOW),
        "key_schema": ReplicationRecord("PUT", "user", {"other": {"S": "k"}}, {
            "other": {"S": "k"}, CONFLICT.timestamp_attribute: {"N": "1700000000"},
            CONFLICT.region_attribute: {"S": CN}}, Version(Decimal("1700000000"), PUT, CN), CN, "1", NOW),
        "future_version": put("future", ts=str(int(NOW + 60 * 365 * 86400))),
    }
    await target.process("shard", kinesis_page([encode_record(put("good-1")), *map(encode_record, forged.values()),
                                                encode_record(put("good-2"))]))
    assert [w["Item"]["PK"]["S"] for op, w in aws.accepted if op == "put_item"] == ["good-1", "good-2"]
    letters = aws.dead_letters()
    assert sorted(letter["reason"] for letter in letters) == sorted(forged)
    for reason in forged:
        assert target.metrics.registry.get_sample_value(
            "replicatord_records_refused_total", {"pair": "user", "reason": reason}) == 1


async def test_a_flood_of_junk_goes_to_the_queue_in_batches_beside_the_good_records() -> None:
    aws = FakeAws()
    target = applier(aws, provenance=RULES)
    page = [b"{}"] * 5000 + [encode_record(put(f"good-{i}")) for i in range(20)]
    await target.process("shard", kinesis_page(page))
    assert len(aws.dead_letters()) == 5000
    assert aws.count("send_message") == 0 and aws.count("send_message_batch") == 500  # ten a call
    assert aws.count("put_item") == 20
    assert target.metrics.registry.get_sample_value(
        "replicatord_records_refused_total", {"pair": "user", "reason": "bad_record"}) == 5000


async def test_a_preflight_probe_is_counted_and_changes_nothing() -> None:
    aws = FakeAws()
    target = applier(aws)
    page = [encode_probe(Probe("user", CN, NOW)), encode_record(put("a")), encode_probe(Probe("other", CN, NOW))]
    await target.process("shard", kinesis_page(page))
    assert target.metrics.registry.get_sample_value("replicatord_preflight_probes_total", {"pair": "user"}) == 1
    writes = [kwargs for operation, kwargs in aws.accepted if operation == "put_item"]
    assert [w["Item"]["PK"] for w in writes] == [{"S": "a"}]  # the record, and nothing for the probes
    letters = aws.dead_letters()
    assert len(letters) == 1 and "of pair 'other'" in letters[0]["detail"]  # a probe of another pair


# The fuzzed page: valid records, hostile payloads and writes DynamoDB refuses, in any order.
valid_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
hostile = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"{not json", b"[" * 5000, b'{"v": 1}', b'{"v": 1e999}', b"\xff\xfe",
                     encode_record(put("x")).replace(b'"v":1', b'"v":' + b"1" * 5000)]),
)


@settings(deadline=None)
@given(st.lists(st.one_of(
    st.builds(lambda n: ("ok", n), valid_names),
    st.builds(lambda b: ("hostile", b), hostile),
    st.builds(lambda n: ("refused", n), valid_names),
), max_size=12))
def test_fuzzed_pages_end_with_every_record_applied_or_dead_lettered(page: list[tuple[str, Any]]) -> None:
    aws = FakeAws(faults=[lambda op, kw: (classify(client_error("ValidationException"))
                                          if op == "put_item" and "refuse" in kw["Item"] else None)])
    payloads = []
    for kind, value in page:
        if kind == "hostile":
            payloads.append(value)
        else:
            extra = {"refuse": {"BOOL": True}} if kind == "refused" else {}
            payloads.append(encode_record(put(f"{kind}-{value}", **extra)))
    asyncio.run(applier(aws).process("shard", kinesis_page(payloads)))
    letters = aws.dead_letters()
    written = Counter(_pk(kw) for op, kw in aws.calls if op == "put_item")
    # Every record is accounted for: written (the refused ones once, then dead-lettered) or dead-lettered.
    expected_letters = Counter(p for (kind, _), p in zip(page, payloads, strict=True) if kind != "ok")
    assert Counter(letter["payload"] for letter in letters) == expected_letters
    assert all(letter["reason"] in ("bad_record", "rejected") and letter["detail"] for letter in letters)
    assert written == Counter(f"{kind}-{value}" for kind, value in page if kind != "hostile")


# --- the forwarder -------------------------------------------------------------------------


def stream_record(pk: str, event: str = "INSERT", ts: str = "1700000000", seq: int = 1) -> dict[str, Any]:
    image = {"PK": {"S": pk}, CONFLICT.timestamp_attribute: {"N": ts}, CONFLICT.region_attribute: {"S": SG}}
    removed = event == "REMOVE"
    return any_stream_record(event, None if removed else image, image if removed else None,
                             datetime.fromtimestamp(NOW, UTC), {"PK": {"S": pk}}, seq)
class Repairs:
    def __init__(self) -> None:
        self.applied: list[ReplicationRecord] = []

    async def apply(self, record: ReplicationRecord) -> bool:
        self.applied.append(record)
        return True

    async def stamp(self, keys: dict[str, Any], timestamp: Decimal) -> bool:
        return True


def forwarder(aws: FakeAws, peers: tuple[str, ...] = (CN,)) -> Forwarder:
    metrics = Metrics()
    dlq = DeadLetterQueue(aws, "queue", metrics)  # type: ignore[arg-type]
    return Forwarder(aws, "user", {p: f"stream-{p}" for p in peers},  # type: ignore[arg-type]
                     TombstoneTable(aws, "tombs", 3600), CONFLICT, TUNING, dlq, Repairs(), metrics,  # type: ignore[arg-type]
                     asyncio.Event())


def sent_keys(aws: FakeAws) -> Counter[str]:
    """How often each record reached a peer's stream (accepted entries only)."""
    out: Counter[str] = Counter()
    for op, kw in aws.calls:
        if op == "put_records":
            for entry in kw["Records"]:
                out[json.loads(entry["Data"])["keys"]["PK"]["S"]] += 1
    return out


async def test_accepted_entries_are_never_sent_again() -> None:
    """PutRecords accepts some entries: only the rest go again. A failing tombstone write after
    forwarding is retried alone: nothing is forwarded twice."""
    def throttle_odd(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"ErrorCode": "ProvisionedThroughputExceededException"} if i % 2 else {"SequenceNumber": "1"}
                for i in range(len(records))]

    aws = FakeAws(put_records_answers=[throttle_odd, throttle_odd],
                  faults=[fail("update_item", None, classify(client_error("InternalServerError", 500)), times=2)])
    records = [stream_record(f"k{i}", seq=i) for i in range(6)] + [stream_record("gone", "REMOVE", seq=6)]
    await forwarder(aws).process("shard", records)
    calls = [kw["Records"] for op, kw in aws.calls if op == "put_records"]
    assert [len(c) for c in calls] == [7, 3, 1]  # all, then the three refused, then the last one
    assert aws.count("update_item") == 3  # the delete's tombstone: failed twice, then written once
    assert aws.dead_letters() == []


async def test_a_batch_the_peer_refuses_is_split_and_only_the_bad_entry_is_dead_lettered() -> None:
    def refuse_big(op: str, kw: dict[str, Any]) -> ReplicatorError | None:
        if op == "put_records" and any(b"poison" in r["Data"] for r in kw["Records"]):
            return classify(client_error("ValidationException"))
        return None

    aws = FakeAws(faults=[refuse_big])
    records = [stream_record("a"), stream_record("poison"), stream_record("b")]
    await forwarder(aws).process("shard", records)
    assert sent_keys(aws) == Counter({"a": 2, "b": 2, "poison": 2})  # the batch, then one by one
    letters = aws.dead_letters()
    assert [(letter["reason"], letter["content"]) for letter in letters] == [("rejected", "stream_record")]
    assert json.loads(letters[0]["payload"])["dynamodb"]["Keys"] == {"PK": {"S": "poison"}}


async def test_a_stream_record_that_breaks_planning_is_dead_lettered_as_it_arrived() -> None:
    broken = {"eventName": "INSERT", "dynamodb": {"Keys": {}, "SequenceNumber": "9",
                                                  "ApproximateCreationDateTime": datetime.fromtimestamp(NOW, UTC)}}
    odd = {"eventName": "INSERT", "dynamodb": {"Keys": {"PK": {"S": "odd"}}, "NewImage": "not a map",
                                               "SequenceNumber": "10",
                                               "ApproximateCreationDateTime": datetime.fromtimestamp(NOW, UTC)}}
    aws = FakeAws()
    await forwarder(aws).process("shard", [broken, stream_record("fine"), odd])
    assert sent_keys(aws) == Counter({"fine": 1})
    letters = aws.dead_letters()
    assert [letter["reason"] for letter in letters] == ["bad_record", "internal_error"]
    assert json.loads(letters[0]["payload"])["dynamodb"]["SequenceNumber"] == "9"


async def test_a_peer_outage_is_waited_out_not_dead_lettered() -> None:
    aws = FakeAws(faults=[fail("put_records", None, classify(client_error("UnrecognizedClientException")), times=5),
                          fail("put_records", None, classify(TimeoutError()), times=5)])
    await forwarder(aws).process("shard", [stream_record("a")])
    assert aws.count("put_records") == 11 and aws.dead_letters() == []
    assert aws.refreshed == 5  # a refused key pair: SSM is asked again (rate-limited in Aws.refresh_peer)


async def test_the_replicated_count_is_written_again_after_a_failure_without_another_page(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter goes out on its own timer: a failed write is tried again even when no page
    comes after it (the end of a load)."""
    monkeypatch.setattr(applier_module, "STATS_INTERVAL_S", 0.01)
    aws = FakeAws(faults=[fail("update_item", None, classify(client_error("InternalServerError", 500)), times=1)])
    target = applier(aws)
    reporting = asyncio.create_task(target.report())
    await target.process("shard", kinesis_page([encode_record(put(name)) for name in ("a", "b", "c")]))
    await until(lambda: not target.unreported and aws.count("update_item") >= 2, 5, "the count to be written")
    assert aws.calls[-1][1]["ExpressionAttributeValues"] == {":n": {"N": "3"}}
    target.stop.set()
    await asyncio.wait_for(reporting, 5)


async def test_the_tombstone_read_overlaps_forwarding_and_counts_the_pages_own_deletes() -> None:
    """The page's writes are checked against their tombstones while the page is forwarded (the
    read is not one more call in the way of the next page); a delete earlier in the same page
    still counts: an older application write of its key after it is repaired."""
    read_started = asyncio.Event()

    class Overlapping(FakeAws):
        async def call(self, service: str, operation: str, *, client: Any = None, **kwargs: Any) -> Any:
            if operation == "put_records":
                await read_started.wait()  # forwarding finishes only once the read has begun
            if operation == "batch_get_item":
                read_started.set()
            return await super().call(service, operation, client=client, **kwargs)

    aws = Overlapping()
    target = forwarder(aws)
    page = [stream_record("k", "REMOVE", ts="1900000000", seq=1), stream_record("k", ts="1800000000", seq=2)]
    async with asyncio.timeout(5):
        await target.process("shard", page)
    repairs = target.repairer.applied  # type: ignore[attr-defined]
    assert [(r.op, r.keys, r.version.timestamp) for r in repairs] == [("DELETE", {"PK": {"S": "k"}}, 1900000000)]


def test_a_forwarder_page_names_each_item_it_changes_once_and_a_malformed_page_none() -> None:
    """What the shard worker overlaps pages by: one key per item (a put and a delete of one item
    are the same item; items differing in key are not), and no answer when a record lacks its key."""
    target = forwarder(FakeAws())
    same = target.page_keys([stream_record("a"), stream_record("a", "REMOVE", seq=2)])
    assert same is not None and len(same) == 1
    both = target.page_keys([stream_record("a"), stream_record("b", seq=2)])
    assert both is not None and len(both) == 2 and same <= both
    assert target.page_keys([stream_record("a"), {"eventName": "INSERT"}]) is None


async def test_a_page_of_deletes_only_is_forwarded() -> None:
    """A page with no write to check against tombstones (deletes only) is still sent."""
    aws = FakeAws()
    await forwarder(aws).process("shard", [stream_record("gone", "REMOVE")])
    assert sent_keys(aws) == Counter({"gone": 1})
    assert aws.count("batch_get_item") == 0 and aws.count("update_item") == 1  # no read; the tombstone
