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

from replicatord.conflict import PUT, Version
from replicatord.local.world import REGIONS, metric_sum, wait_for
from replicatord.records import ReplicationRecord, encode_record
from tests.test_e2e import STREAMS, Loads, _assert_identical, _drained
from tests.unit.test_hostile_records import HOSTILE

pytestmark = pytest.mark.e2e

CN, SG = REGIONS

# The review's dozen, and more: each of these used to end the daemon or block its shard.
CHOSEN = ["created_5000_digit_int", "v_5000_digit_int", "B_non_ascii", "BS_non_ascii", "M_nested_400",
          "S_lone_surrogate", "name_lone_surrogate", "N_quadratic_pattern", "created_nan", "utf16_json",
          "invalid_utf8", "NS_duplicates", "array_bomb", "kind_huge", "image_over_400_kb"]


def refused_writes() -> dict[str, bytes]:
    """Valid records whose writes DynamoDB refuses (ValidationException)."""
    def record(keys: dict[str, Any], **extra: Any) -> bytes:
        image = {**keys, "last_update_timestamp": {"N": "1800000000"}, "last_updater_region": {"S": CN}, **extra}
        version = Version(Decimal("1800000000"), PUT, CN)
        return encode_record(ReplicationRecord("PUT", "user", keys, image, version, CN, "1", time.time()))

    return {
        "key_of_the_wrong_type": record({"PK": {"N": "42"}}),
        "empty_key_string": record({"PK": {"S": ""}}),
        # Under the decoder's floor (names, strings, binaries) but over 400 KB with the rest.
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


def test_hostile_records_between_normal_traffic_are_dead_lettered_and_replication_goes_on(regions: Any) -> None:
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
    diff = _assert_identical(regions)
    assert diff.counts == {CN: 1200, SG: 1200}

    sqs = regions.client("sqs", SG)
    url = sqs.get_queue_url(QueueName="ddbreplicatorsg")["QueueUrl"]
    letters = read_dead_letters(sqs, url, len(hostile))
    by_payload = {letter["payload"]: letter for letter in letters}
    for name, payload in hostile.items():
        assert payload in by_payload, f"{name} is not in the dead-letter queue as it arrived"
        letter = by_payload[payload]
        expected = "rejected" if name in refused_writes() else "bad_record"
        assert (letter["reason"], letter["pipeline"]) == (expected, "applier"), (name, letter["detail"])
        assert letter["detail"]
    metrics = daemons[SG].metrics()
    assert metric_sum(metrics, "replicatord_dlq_sent_total", reason="bad_record") == len(CHOSEN)
    assert metric_sum(metrics, "replicatord_dlq_sent_total", reason="rejected") == len(refused_writes())
    log = daemons[SG].log_path.read_text()
    assert "Traceback" not in log
    print(f"\n{len(hostile)} hostile records among 1,200 items: drained {drained_s:.1f}s after the load began; "
          f"{len(letters)} dead letters, daemon pid {pid} unchanged")
    for daemon in daemons.values():
        assert daemon.terminate() == 0
