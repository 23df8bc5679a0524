"""What a legitimate peer could have sent (provenance.refusal), as table tests and as a property:
every forgery of every kind is refused, every record a forwarder makes is accepted."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicatord.config import Conflict
from replicatord.conflict import DELETE, PUT, Version
from replicatord.forwarder import plan_forward
from replicatord.provenance import MAX_RECORD_AGE_S, Provenance, future_beyond_bound, refusal
from replicatord.records import ReplicationRecord, decode_record, encode_record

SG, CN, NX, FRA = "ap-southeast-1", "cn-north-1", "cn-northwest-1", "eu-central-1"
NOW = 1_796_600_000.0
CONFLICT = Conflict()
RULES = Provenance(SG, frozenset({CN, NX}), (("PK", "S"), ("SK", "N")), CONFLICT)
KEYS = {"PK": {"S": "user-1"}, "SK": {"N": "7"}}


def image(ts: str = "1796599999.5", region: str = CN, **extra: Any) -> dict[str, Any]:
    return {**KEYS, "last_update_timestamp": {"N": ts}, "last_updater_region": {"S": region}, **extra}


def put(ts: str = "1796599999.5", region: str = CN, origin: str | None = None, keys: Any = None,
        img: Any = None, created: float = NOW - 1) -> ReplicationRecord:
    return ReplicationRecord("PUT", "user", keys or KEYS, img if img is not None else image(ts, region),
                             Version(Decimal(ts), PUT, region), origin or region, "1", created)


def delete(ts: str = "1796599999.5", region: str = CN, origin: str | None = None) -> ReplicationRecord:
    return ReplicationRecord("DELETE", "user", KEYS, None, Version(Decimal(ts), DELETE, region), origin or region,
                             "1", NOW - 1)


@pytest.mark.parametrize(("record", "reason"), [
    (put(), None),
    (put(region=NX), None),
    (delete(), None),
    # A change claiming to come from this region itself: applied, then forwarded on as our own.
    (put(region=SG), "forged_origin"),
    (delete(region=SG), "forged_origin"),
    (put(region=FRA), "forged_origin"),  # not a peer of this region in the topology
    (put(region=CN, origin=NX), "forged_origin"),  # a peer sends only its own region's changes
    # The version claimed is not the one the image carries.
    (put(img=image("1796599000")), "version_mismatch"),
    (put(img=image(region=NX)), "version_mismatch"),
    (put(img={**KEYS, "last_updater_region": {"S": CN}}), "version_mismatch"),
    (put(img=image(**{"replicatord:deleting": {"S": "x"}})), "forged_marker"),
    # Keys that are not the table's key schema.
    (put(keys={"PK": {"S": "user-1"}}, img=image()), "key_schema"),
    (put(keys={"PK": {"S": "user-1"}, "other": {"N": "7"}}, img=image(other={"N": "7"})), "key_schema"),
    (put(keys={"PK": {"S": "user-1"}, "SK": {"S": "7"}}, img={**image(), "SK": {"S": "7"}}), "key_schema"),
    # Versions from the future win every conflict for ever.
    (put(ts=str(int(NOW + 60 * 365 * 86400))), "future_version"),
    (delete(ts=str(int(NOW + 60 * 365 * 86400))), "future_version"),
    (put(ts=str(int(NOW + 86400 + 5))), "future_version"),
    (put(ts=str(int(NOW + 86400 - 5))), None),  # within conflict.max_future_s
    (put(created=NOW - MAX_RECORD_AGE_S - 1), "bad_created"),
    (put(created=NOW + 2 * 86400), "bad_created"),
])
def test_what_a_peer_could_have_sent(record: ReplicationRecord, reason: str | None) -> None:
    found = refusal(record, RULES, NOW)
    assert (found[0] if found else None) == reason, found


def test_the_rules_come_from_describe_table_hash_key_first() -> None:
    described = {"KeySchema": [{"AttributeName": "SK", "KeyType": "RANGE"}, {"AttributeName": "PK", "KeyType": "HASH"}],
                 "AttributeDefinitions": [{"AttributeName": "PK", "AttributeType": "S"},
                                          {"AttributeName": "SK", "AttributeType": "N"}]}
    assert Provenance.from_table(SG, [CN, NX], described, CONFLICT) == RULES


def test_an_operator_command_sees_a_version_beyond_the_bound() -> None:
    assert future_beyond_bound(Decimal(NOW + 86401), CONFLICT, NOW)
    assert not future_beyond_bound(Decimal(NOW + 86399), CONFLICT, NOW)
    assert not future_beyond_bound(Decimal(NOW + 86401), Conflict(max_future_s=7 * 86400), NOW)


# --- the property ---------------------------------------------------------------------------------

regions = st.sampled_from([CN, NX, SG, FRA, "", "x" * 40])
timestamps = st.one_of(st.decimals(min_value=0, max_value=10**12, places=3, allow_nan=False),
                       st.sampled_from([Decimal(NOW), Decimal(NOW + 86400 * 2), Decimal(10**20)]))


def legitimate(record: ReplicationRecord) -> bool:
    """What a forwarder in `record.origin` sends (independent of provenance.py's code)."""
    version = record.version
    if record.origin not in (CN, NX) or version.region != record.origin:
        return False
    if version.timestamp > Decimal(NOW + CONFLICT.max_future_s):
        return False
    if not NOW - MAX_RECORD_AGE_S <= record.created_s <= NOW + CONFLICT.max_future_s:
        return False
    if sorted((n, next(iter(v))) for n, v in record.keys.items()) != [("PK", "S"), ("SK", "N")]:
        return False
    if record.op == "PUT":
        assert record.image is not None
        if CONFLICT.marker_attribute in record.image:
            return False
        return (record.image.get("last_update_timestamp") == {"N": str(version.timestamp)}
                and record.image.get("last_updater_region") == {"S": version.region})
    return True


@st.composite
def records(draw: st.DrawFn) -> ReplicationRecord:
    op = draw(st.sampled_from(["PUT", "DELETE"]))
    version = Version(draw(timestamps), PUT if op == "PUT" else DELETE, draw(regions))
    origin = draw(st.one_of(st.just(version.region), regions))
    keys = draw(st.sampled_from([KEYS, {"PK": {"S": "a"}}, {"PK": {"N": "1"}, "SK": {"N": "2"}},
                                 {"PK": {"S": "a"}, "SK": {"N": "2"}, "X": {"S": "b"}}]))
    created = draw(st.sampled_from([NOW - 1, NOW - MAX_RECORD_AGE_S - 10, NOW + 10 * 86400, 0.0]))
    img = None
    if op == "PUT":
        img = {**keys,
               "last_update_timestamp": {"N": str(draw(st.one_of(st.just(version.timestamp), timestamps)))},
               "last_updater_region": {"S": draw(st.one_of(st.just(version.region), regions))}}
        if draw(st.booleans()) and draw(st.booleans()):
            img[CONFLICT.marker_attribute] = {"S": "forged"}
    return ReplicationRecord(op, "user", keys, img, version, origin, "1", created)  # type: ignore[arg-type]


@given(records())
def test_every_forgery_is_refused_and_every_legitimate_record_accepted(record: ReplicationRecord) -> None:
    assert (refusal(record, RULES, NOW) is None) == legitimate(record)


@given(st.sampled_from([CN, NX]), st.decimals(min_value=1_600_000_000, max_value=NOW, places=3))
def test_what_a_peer_forwarder_sends_is_accepted(region: str, ts: Decimal) -> None:
    stream_record = {"eventName": "MODIFY", "dynamodb": {"Keys": KEYS, "NewImage": image(str(ts), region),
                                                         "SequenceNumber": "1", "ApproximateCreationDateTime": NOW - 1}}
    planned = plan_forward(stream_record, "user", region, CONFLICT)
    assert isinstance(planned, ReplicationRecord)
    assert refusal(decode_record(encode_record(planned)), RULES, NOW) is None
