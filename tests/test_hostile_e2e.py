"""End to end (issue 7): hostile records and writes DynamoDB refuses, put straight onto a region's
Kinesis stream between normal traffic. The daemon keeps running (same process), the normal
traffic converges, and every one of those records is in the dead-letter queue, as it arrived,
with its reason.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from replicatord.conflict import DELETE, PUT, Version
from replicatord.local.world import REGIONS, metric_sum, wait_for
from replicatord.records import ReplicationRecord, encode_record
from tests.conftest import LocalRegions, assert_identical
from tests.test_e2e import STREAMS, TABLES, Loads, _drained
from tests.unit.test_hostile_records import HOSTILE

pytestmark = pytest.mark.e2e

CN, SG = REGIONS

# The review's dozen, and more: each of these used to end the daemon or block its shard.
CHOSEN = ["created_5000_digit_int", "v_5000_digit_int", "B_non_ascii", "BS_non_ascii", "M_nested_400",
          "S_lone_surrogate", "name_lone_surrogate", "N_quadratic_pattern", "created_nan", "utf16_json",
          "invalid_utf8", "NS_duplicates", "array_bomb", "kind_huge", "image_over_400_kb"]


def refused_writes() -> dict[str, bytes]:
    """Valid records whose writes DynamoDB refuses (ValidationException), or that no peer sends
    (a key of another type than the table's: refused before any write)."""
    def record(keys: dict[str, Any], **extra: Any) -> bytes:
        ts = str(int(time.time()))
        image = {**keys, "last_update_timestamp": {"N": ts}, "last_updater_region": {"S": CN}, **extra}
        version = Version(Decimal(ts), PUT, CN)
        return encode_record(ReplicationRecord("PUT", "user", keys, image, version, CN, "1", time.time()))

    return {
        "key_of_the_wrong_type": record({"PK": {"N": "42"}}),
        "empty_key_string": record({"PK": {"S": ""}}),
        # Over 400 KB with its numbers: the decoder's size floor counts them (refused before any write).
        "item_just_over_400_kb": record({"PK": {"S": "too-big"}}, blob={"S": "x" * 409_000},
                                        **{f"n{i}": {"N": "1" * 38} for i in range(100)}),
    }
    # Not here: a DELETE whose key has the wrong type. AWS refuses its conditional update with a
    # ValidationException; moto 5.2.5 does not check key types on UpdateItem (the condition just
    # fails), so the emulator cannot show it. tests/unit/test_isolation.py covers refused writes.


def read_dead_letters(sqs: Any, url: str, wanted: int) -> list[dict[str, Any]]:
    """Receive until `wanted` whole letters (parts joined by letter id) are in."""
    parts: dict[str, dict[int, dict[str, Any]]] = {}

    def whole() -> list[dict[str, Any]]:
        out = []
        for by_part in parts.values():
            first = by_part[min(by_part)]
            if len(by_part) == first["parts"]:
                joined = "".join(by_part[n]["payload"] for n in sorted(by_part))
                out.append({**first, "payload": base64.b64decode(joined) if first["encoding"] == "base64"
                            else joined.encode()})
        return out

    def received() -> bool:
        for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
            body = json.loads(message["Body"])
            parts.setdefault(body["letter_id"], {})[body["part"]] = body
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return len(whole()) >= wanted

    wait_for(received, 180, f"{wanted} dead letters", interval_s=0.5)
    return whole()


def test_hostile_records_between_normal_traffic_are_dead_lettered_and_replication_goes_on(
        regions: LocalRegions) -> None:
    regions.provision()
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready()
    pid = daemons[SG].process.pid  # type: ignore[union-attr]

    hostile = {name: HOSTILE[name] for name in CHOSEN} | refused_writes()
    kinesis = regions.client("kinesis", SG)
    errors: list[BaseException] = []

    def inject() -> None:
        try:
            for n, payload in enumerate(hostile.values()):
                kinesis.put_record(StreamName=STREAMS[SG], Data=payload, PartitionKey=f"hostile-{n}")
                time.sleep(0.2)  # spread among the load, not a synchronisation
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    started = time.monotonic()
    loads = Loads(regions, 600, processes=1)
    injector = threading.Thread(target=inject)
    injector.start()
    injector.join(timeout=120)
    loads.join()
    assert not errors, errors
    _drained(regions)
    drained_s = time.monotonic() - started

    assert daemons[SG].alive() and daemons[SG].process.pid == pid  # type: ignore[union-attr]
    diff = assert_identical(regions, TABLES)
    assert diff.counts == {CN: 1200, SG: 1200}

    sqs = regions.client("sqs", SG)
    url = sqs.get_queue_url(QueueName="ddbreplicatorsg")["QueueUrl"]
    letters = read_dead_letters(sqs, url, len(hostile))
    by_payload = {letter["payload"]: letter for letter in letters}
    for name, payload in hostile.items():
        assert payload in by_payload, f"{name} is not in the dead-letter queue as it arrived"
        letter = by_payload[payload]
        expected = {"key_of_the_wrong_type": "key_schema", "empty_key_string": "rejected"}.get(name, "bad_record")
        assert (letter["reason"], letter["pipeline"]) == (expected, "applier"), (name, letter["detail"])
        assert letter["detail"]
    metrics = daemons[SG].metrics()
    assert metric_sum(metrics, "replicatord_dlq_sent_total", reason="bad_record") == len(CHOSEN) + 1
    assert metric_sum(metrics, "replicatord_dlq_sent_total", reason="rejected") == 1
    assert metric_sum(metrics, "replicatord_dlq_sent_total", reason="key_schema") == 1
    log = daemons[SG].log_path.read_text()
    assert "Traceback" not in log
    print(f"\n{len(hostile)} hostile records among 1,200 items: drained {drained_s:.1f}s after the load began; "
          f"{len(letters)} dead letters, daemon pid {pid} unchanged")
    for daemon in daemons.values():
        assert daemon.terminate() == 0


def test_the_five_forgeries_of_a_key_holder_are_refused_and_the_tables_stay_one(regions: LocalRegions) -> None:
    """Issue 17's five forged records, put on Singapore's stream as whoever holds the peer-writer
    key could: none is applied, each is dead-lettered with its reason, and the application's later
    writes of the same keys win in both regions."""
    regions.provision()
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready()
    now = time.time()
    far = Decimal(int(now + 60 * 365 * 86400))
    own = Decimal(int(now))

    def record(op: str, pk: str, version: Version, origin: str, image: dict[str, Any] | None = None,
               keys: dict[str, Any] | None = None) -> bytes:
        keys = keys or {"PK": {"S": pk}}
        if op == "PUT" and image is None:
            image = {**keys, "last_update_timestamp": {"N": str(version.timestamp)},
                     "last_updater_region": {"S": version.region}, "forgery": {"BOOL": True}}
        return encode_record(ReplicationRecord(op, "user", keys, image, version, origin, "1", now))  # type: ignore[arg-type]

    forged = {
        "forged_origin": record("PUT", "self", Version(own, PUT, SG), SG),
        "version_mismatch": record("PUT", "mismatch", Version(own, PUT, CN), CN, image={
            "PK": {"S": "mismatch"}, "last_update_timestamp": {"N": str(own + 5)},
            "last_updater_region": {"S": CN}}),
        "key_schema": record("PUT", "", Version(own, PUT, CN), CN, keys={"forged": {"S": "k"}}),
        "future_version": record("PUT", "future", Version(far, PUT, CN), CN),
        "future_version ": record("DELETE", "future-delete", Version(far, DELETE, CN), CN),
    }
    kinesis = regions.client("kinesis", SG)
    for n, payload in enumerate(forged.values()):
        kinesis.put_record(StreamName=STREAMS[SG], Data=payload, PartitionKey=f"forged-{n}")
    wait_for(lambda: metric_sum(daemons[SG].metrics(), "replicatord_records_refused_total") >= len(forged), 60,
             "the forged records to be refused")
    # The application's own writes of those keys, after the forgeries.
    ddb_sg = regions.client("dynamodb", SG)
    for pk in ("self", "mismatch", "future", "future-delete"):
        ddb_sg.put_item(TableName="user-sg", Item={
            "PK": {"S": pk}, "last_update_timestamp": {"N": f"{time.time():.3f}"}, "last_updater_region": {"S": SG},
            "app": {"BOOL": True}})
    _drained(regions)
    diff = assert_identical(regions, TABLES)
    for region in REGIONS:
        ddb = regions.client("dynamodb", region)
        for pk in ("self", "mismatch", "future", "future-delete"):
            item = ddb.get_item(TableName=f"user-{'cn' if region == CN else 'sg'}", Key={"PK": {"S": pk}},
                                ConsistentRead=True).get("Item")
            assert item is not None and "app" in item and "forgery" not in item, (region, pk, item)
    metrics = daemons[SG].metrics()
    for reason in ("forged_origin", "version_mismatch", "key_schema"):
        assert metric_sum(metrics, "replicatord_records_refused_total", reason=reason) == 1, reason
    assert metric_sum(metrics, "replicatord_records_refused_total", reason="future_version") == 2
    assert metric_sum(metrics, "replicatord_dlq_sent_total") == len(forged)
    assert metric_sum(daemons[CN].metrics(), "replicatord_records_applied_total") == 4  # the app's, not the forgery
    sqs = regions.client("sqs", SG)
    letters = read_dead_letters(sqs, sqs.get_queue_url(QueueName="ddbreplicatorsg")["QueueUrl"], len(forged))
    assert sorted(letter["reason"] for letter in letters) == sorted(r.strip() for r in forged)
    print(f"\nfive forgeries: all refused and dead-lettered ({', '.join(sorted(set(r.strip() for r in forged)))}); "
          f"the application's later writes kept in both regions; {diff.counts} items")


def test_a_flood_of_junk_does_not_hold_up_the_good_records_behind_it(regions: LocalRegions) -> None:
    """5,000 records of `{}` put at once on Singapore's stream (what Kinesis takes in 5 s from
    anyone with the key), then 20 normal writes in Beijing: they arrive within seconds, and every
    piece of junk is in the dead-letter queue."""
    regions.provision()
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready()
    kinesis = regions.client("kinesis", SG)
    started = time.monotonic()
    for batch in range(10):
        entries = [{"Data": b"{}", "PartitionKey": f"junk-{batch}-{i}"} for i in range(500)]
        while entries:  # the local Kinesis refuses a share of entries, as AWS does under load
            result = kinesis.put_records(StreamName=STREAMS[SG], Records=entries)
            entries = [e for e, r in zip(entries, result["Records"], strict=True) if r.get("ErrorCode")]
    flooded_s = time.monotonic() - started
    ddb_cn, ddb_sg = regions.client("dynamodb", CN), regions.client("dynamodb", SG)
    for i in range(20):
        ddb_cn.put_item(TableName="user-cn", Item={"PK": {"S": f"behind-{i}"}, "last_update_timestamp": {
            "N": f"{time.time():.3f}"}, "last_updater_region": {"S": CN}})
    written = time.monotonic()

    def arrived() -> bool:
        return all("Item" in ddb_sg.get_item(TableName="user-sg", Key={"PK": {"S": f"behind-{i}"}})
                   for i in range(20))

    wait_for(arrived, 120, "the good records behind the junk")
    good_s = time.monotonic() - written
    wait_for(lambda: metric_sum(daemons[SG].metrics(), "replicatord_dlq_sent_total", reason="bad_record") == 5000,
             120, "every piece of junk to be in the dead-letter queue")
    junk_s = time.monotonic() - started
    metrics = daemons[SG].metrics()
    assert metric_sum(metrics, "replicatord_records_refused_total", reason="bad_record") == 5000
    assert regions.control(SG).stats()["daemon_calls"].get("sqs.SendMessage", 0) == 0  # batches only
    print(f"\na flood of 5,000 junk records (put in {flooded_s:.1f}s): the 20 good records behind it arrived "
          f"{good_s:.1f}s after they were written; all 5,000 dead-lettered {junk_s:.1f}s after the flood began "
          f"({regions.control(SG).stats()['daemon_calls'].get('sqs.SendMessageBatch', 0)} SendMessageBatch calls)")
