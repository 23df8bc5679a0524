"""What the forwarder does with each local stream record, and which shards a pipeline reads next."""

from __future__ import annotations

import functools
import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from replicatord.backoff import backoff_s
from replicatord.config import Conflict, Tuning
from replicatord.conflict import DELETE, PUT, Version, delete_version
from replicatord.forwarder import Skip, change_time, plan_forward, plan_repair, plan_restore, stream_keys
from replicatord.records import ReplicationRecord, creation_seconds, decode_record, encode_record
from tests.conftest import stream_record as any_stream_record

CONFLICT = Conflict()
TS = CONFLICT.timestamp_attribute
RG = CONFLICT.region_attribute
MARKER = CONFLICT.marker_attribute
CN = "cn-north-1"
SG = "ap-southeast-1"
PAIR = "user"
CREATED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
CREATED_S = Decimal(str(CREATED.timestamp()))
KEYS = {"PK": {"S": "user#1"}}


def item(ts: str | None = "1714564800.5", region: str | None = CN, **extra: Any) -> dict[str, Any]:
    image: dict[str, Any] = {
        "PK": {"S": "user#1"},
        "email": {"S": "ann@example.com"},
        "score": {"N": "123456789012345678901234567890.123"},
        "avatar": {"B": b"\x89PNG\x00\xff"},
        "tags": {"SS": ["a", "b"]},
        "profile": {"M": {"city": {"S": "北京"}, "zip": {"N": "100000"}, "bin": {"BS": [b"\x00"]}}},
        "history": {"L": [{"N": "1"}, {"NULL": True}, {"BOOL": False}]},
    }
    if ts is not None:
        image[TS] = {"N": ts}
    if region is not None:
        image[RG] = {"S": region}
    image.update(extra)
    return image


# A DynamoDB stream record of item KEYS, as botocore returns it (the shared builder).
stream_record = functools.partial(any_stream_record, keys=KEYS, created=CREATED)


# --- INSERT / MODIFY -------------------------------------------------------------------------


@pytest.mark.parametrize("event", ["INSERT", "MODIFY"])
def test_local_change_is_forwarded_unchanged(event: str) -> None:
    new = item()
    old = item("1714564700", SG) if event == "MODIFY" else None
    planned = plan_forward(stream_record(event, new, old), PAIR, CN, CONFLICT)
    assert planned == ReplicationRecord(
        op="PUT",
        pair=PAIR,
        keys=KEYS,
        image=item(),
        version=Version(Decimal("1714564800.5"), PUT, CN),
        origin=CN,
        sequence_number="100",
        # The stream's second, refined by the item's timestamp within it (change_time).
        created_s=1714564800.5,
    )
    assert isinstance(planned, ReplicationRecord)
    assert planned.image is new  # passed through, not rebuilt or converted


def test_forwarded_record_survives_the_wire() -> None:
    planned = plan_forward(stream_record("INSERT", item()), PAIR, CN, CONFLICT)
    assert isinstance(planned, ReplicationRecord)
    decoded = decode_record(encode_record(planned))
    assert decoded == planned
    assert decoded.image == item()


@pytest.mark.parametrize("event", ["INSERT", "MODIFY"])
@pytest.mark.parametrize("origin", [SG, "us-east-1", ""])
def test_replicated_change_is_not_forwarded(event: str, origin: str) -> None:
    assert plan_forward(stream_record(event, item(region=origin)), PAIR, CN, CONFLICT) == Skip("replicated")


@pytest.mark.parametrize("event", ["INSERT", "MODIFY"])
@pytest.mark.parametrize("region", [CN, SG])
def test_marked_image_is_not_forwarded(event: str, region: str) -> None:
    # The delete's version is not older than the item: the item is on its way out.
    for marker in ('["1714564800.5","DELETE","a"]', '["1714564801","DELETE","x"]', "not a version"):
        marked = item(region=region, **{MARKER: {"S": marker}})
        assert plan_forward(stream_record(event, marked), PAIR, CN, CONFLICT) == Skip("delete_marker")


@pytest.mark.parametrize("event", ["INSERT", "MODIFY"])
def test_newer_write_over_a_stale_marker_is_forwarded_without_it(event: str) -> None:
    """An UpdateItem newer than a pending delete keeps the marker attribute; it is still a write."""
    marked = item(**{MARKER: {"S": '["1714564800","DELETE","ap-southeast-1"]'}})
    planned = plan_forward(stream_record(event, marked), PAIR, CN, CONFLICT)
    assert isinstance(planned, ReplicationRecord)
    assert planned.image == item()


@pytest.mark.parametrize(
    "new",
    [
        item(ts=None),
        item(region=None),
        item(ts=None, region=None),
        item(ts="soon"),
        item(ts="NaN"),
        {**item(), TS: {"S": "1714564800"}},
        None,
        {},
    ],
    ids=["no_ts", "no_region", "neither", "ts_text", "ts_nan", "ts_as_S", "no_image", "empty_image"],
)
@pytest.mark.parametrize("event", ["INSERT", "MODIFY"])
def test_unversioned_change_is_reported(event: str, new: dict[str, Any] | None) -> None:
    assert plan_forward(stream_record(event, new), PAIR, CN, CONFLICT) == Skip("no_version")


def test_custom_attribute_names() -> None:
    conflict = Conflict(timestamp_attribute="ts", region_attribute="rg", marker_attribute="aws:rep:deleting")
    new = {"PK": {"S": "user#1"}, "ts": {"N": "5"}, "rg": {"S": CN}}
    planned = plan_forward(stream_record("MODIFY", new), PAIR, CN, conflict)
    assert isinstance(planned, ReplicationRecord)
    assert planned.version == Version(Decimal(5), PUT, CN)
    # the default attribute names mean nothing here
    assert plan_forward(stream_record("MODIFY", item()), PAIR, CN, conflict) == Skip("no_version")
    marked = {**new, "aws:rep:deleting": {"S": "x"}}
    assert plan_forward(stream_record("MODIFY", marked), PAIR, CN, conflict) == Skip("delete_marker")
    assert plan_forward(stream_record("REMOVE", old=marked), PAIR, CN, conflict) == Skip("known_delete")


# --- REMOVE ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "expected_ts"),
    [
        (item("1714564700", CN), CREATED_S),  # the stream's clock is later than the image
        (item("1714564900.25", CN), Decimal("1714564900.25")),  # the image is stamped later
        (item("1714564900", SG), Decimal("1714564900")),  # a replicated item deleted here
        (item(str(CREATED_S), SG), CREATED_S),
        (item(ts=None), CREATED_S),  # unversioned image: the stream's clock
        (None, CREATED_S),  # KEYS_ONLY stream
    ],
    ids=["clock_later", "image_later", "replicated_item", "equal", "unversioned", "no_old_image"],
)
def test_application_delete_is_forwarded(old: dict[str, Any] | None, expected_ts: Decimal) -> None:
    planned = plan_forward(stream_record("REMOVE", old=old), PAIR, CN, CONFLICT)
    assert planned == ReplicationRecord(
        op="DELETE",
        pair=PAIR,
        keys=KEYS,
        image=None,
        version=delete_version(old, creation_seconds(CREATED), CN, CONFLICT),
        origin=CN,
        sequence_number="100",
        created_s=CREATED.timestamp(),
    )
    assert isinstance(planned, ReplicationRecord)
    assert planned.version == Version(expected_ts, DELETE, CN)
    assert decode_record(encode_record(planned)) == planned


def test_delete_with_epoch_number_creation_time() -> None:
    planned = plan_forward(stream_record("REMOVE", old=item("1"), created=1714564800), PAIR, CN, CONFLICT)
    assert isinstance(planned, ReplicationRecord)
    assert planned.version == Version(Decimal(1714564800), DELETE, CN)


@pytest.mark.parametrize("region", [CN, SG])
def test_delete_made_by_replicatord_is_not_forwarded(region: str) -> None:
    old = item(region=region, **{MARKER: {"S": '["1714564800.5","DELETE","ap-southeast-1"]'}})
    assert plan_forward(stream_record("REMOVE", old=old), PAIR, CN, CONFLICT) == Skip("known_delete")


def test_application_delete_of_an_item_with_a_stale_marker_is_forwarded() -> None:
    old = item(**{MARKER: {"S": '["1714564800","DELETE","ap-southeast-1"]'}})
    planned = plan_forward(stream_record("REMOVE", old=old), PAIR, CN, CONFLICT)
    assert isinstance(planned, ReplicationRecord) and planned.op == "DELETE"


@pytest.mark.parametrize("event", [None, "UPDATE", "remove", "insert", ""])
def test_unknown_event(event: str | None) -> None:
    assert plan_forward(stream_record(event, item(), item()), PAIR, CN, CONFLICT) == Skip("unknown_event")


# --- keys and repairs -------------------------------------------------------------------------


@pytest.mark.parametrize("event", ["INSERT", "MODIFY", "REMOVE"])
def test_binary_key_values_come_from_the_image(event: str) -> None:
    """moto 5 base64-encodes binary `Keys` twice; the image holds the bytes that were written."""
    image = {"BK": {"B": b"\x00\xff"}, "SK": {"N": "1"}, TS: {"N": "1"}, RG: {"S": CN}}
    record = stream_record(event, new=None if event == "REMOVE" else image, old=image if event != "INSERT" else None)
    record["dynamodb"]["Keys"] = {"BK": {"B": b"AP8="}, "SK": {"N": "1"}}
    assert stream_keys(record["dynamodb"]) == {"BK": {"B": b"\x00\xff"}, "SK": {"N": "1"}}
    planned = plan_forward(record, PAIR, CN, CONFLICT)
    assert isinstance(planned, ReplicationRecord) and planned.keys == {"BK": {"B": b"\x00\xff"}, "SK": {"N": "1"}}


def test_keys_without_an_image_are_the_records_keys() -> None:
    assert stream_keys({"Keys": dict(KEYS)}) == KEYS


def test_write_older_than_the_image_it_replaced_restores_that_image() -> None:
    newer = item(ts="200", region=SG)
    repair = plan_repair(stream_record("MODIFY", new=item(ts="100", region=CN), old=newer), PAIR, CN, CONFLICT)
    assert repair is not None
    assert (repair.op, repair.image, repair.origin) == ("PUT", newer, SG)
    assert repair.version == Version(Decimal(200), PUT, SG)


@pytest.mark.parametrize(("new_ts", "new_region"), [("300", CN), ("200", SG), ("200", "zz-last-1")])
def test_write_as_new_or_newer_than_the_replaced_image_needs_no_repair(new_ts: str, new_region: str) -> None:
    record = stream_record("MODIFY", new=item(ts=new_ts, region=new_region), old=item(ts="200", region=SG))
    assert plan_repair(record, PAIR, CN, CONFLICT) is None


def test_no_repair_of_inserts_unversioned_images_or_marked_images() -> None:
    assert plan_repair(stream_record("INSERT", new=item(ts="1")), PAIR, CN, CONFLICT) is None
    assert plan_repair(stream_record("MODIFY", new=item(ts=None), old=item(ts="9")), PAIR, CN, CONFLICT) is None
    assert plan_repair(stream_record("MODIFY", new=item(ts="1"), old=item(ts=None)), PAIR, CN, CONFLICT) is None
    marked = item(ts="9", **{MARKER: {"S": '["10","DELETE","ap-southeast-1"]'}})
    assert plan_repair(stream_record("MODIFY", new=item(ts="1"), old=marked), PAIR, CN, CONFLICT) is None


def test_stamped_version_older_than_the_replaced_image_restores_it() -> None:
    """`missing_version: stamp`: the unversioned write gets the record's creation time, which may be
    older than the item it overwrote."""
    newer = item(ts="4000000000", region=SG)
    ddb = stream_record("MODIFY", new=item(ts=None, region=None), old=newer)["dynamodb"]
    repair = plan_restore(ddb, Version(CREATED_S, PUT, CN), PAIR, CONFLICT)
    assert repair is not None and repair.image == newer
    assert plan_restore(ddb, Version(Decimal(4_000_000_001), PUT, CN), PAIR, CONFLICT) is None


# --- backoff ---------------------------------------------------------------------------------


def expected_cap_s(attempt: int, tuning: Tuning) -> float:
    return min(tuning.backoff_max_ms, tuning.backoff_base_ms * 2**attempt) / 1000


@pytest.mark.parametrize(
    ("attempt", "cap_s"),
    [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.2), (6, 5.0), (7, 5.0), (30, 5.0), (10_000, 5.0)],
)
def test_backoff_bounds(monkeypatch: pytest.MonkeyPatch, attempt: int, cap_s: float) -> None:
    tuning = Tuning(backoff_base_ms=100, backoff_max_ms=5000)
    monkeypatch.setattr(random, "uniform", lambda lo, hi: lo)
    assert backoff_s(attempt, tuning) == pytest.approx(cap_s / 2)
    monkeypatch.setattr(random, "uniform", lambda lo, hi: hi)
    assert backoff_s(attempt, tuning) == pytest.approx(cap_s)


@pytest.mark.parametrize(
    "tuning",
    [Tuning(), Tuning(backoff_base_ms=1, backoff_max_ms=10), Tuning(backoff_base_ms=250, backoff_max_ms=60_000)],
    ids=["defaults", "tiny", "long"],
)
def test_backoff_is_jittered_within_half_cap_and_cap(tuning: Tuning) -> None:
    random.seed(1234)
    previous_cap = 0.0
    for attempt in range(0, 25):
        cap = expected_cap_s(attempt, tuning)
        assert cap >= previous_cap  # grows, then stays at the maximum
        previous_cap = cap
        assert cap <= tuning.backoff_max_ms / 1000
        samples = [backoff_s(attempt, tuning) for _ in range(200)]
        assert all(cap / 2 <= s <= cap for s in samples)
        if cap > 0.002:
            assert len(set(samples)) > 1, "jittered"
    assert previous_cap == tuning.backoff_max_ms / 1000


def test_backoff_max_below_base_is_still_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda lo, hi: hi)
    assert backoff_s(1, Tuning(backoff_base_ms=1000, backoff_max_ms=100)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("created", "timestamp", "expected"),
    [
        ("1714564800", "1714564800.5", "1714564800.5"),  # whole second + the item's ms within it
        ("1714564800", "1714564800", "1714564800"),
        ("1714564800", "1714564801", "1714564800"),  # a timestamp past the second: a clock ahead
        ("1714564800", "1714564799.9", "1714564800"),  # before it: a stale or skewed stamp
        ("1714564800.25", "1714564800.5", "1714564800.25"),  # the stream's own sub-second time wins
    ],
)
def test_change_time_is_never_later_than_the_change(created: str, timestamp: str, expected: str) -> None:
    assert change_time(Decimal(created), Version(Decimal(timestamp), PUT, CN)) == Decimal(expected)
    assert change_time(Decimal(created), None) == Decimal(created)


TTL = {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}


@pytest.mark.parametrize("identity", [TTL, {"type": "Service", "principalId": "dynamodb.amazonaws.com"}])
def test_a_ttl_delete_removes_the_version_it_found_not_the_sweep_time(identity: dict[str, str]) -> None:
    record = {**stream_record("REMOVE", old=item("1714000000.5")), "userIdentity": identity}
    planned = plan_forward(record, PAIR, CN, CONFLICT)  # the sweep ran long after 1714000000.5
    assert isinstance(planned, ReplicationRecord)
    assert planned.version == Version(Decimal("1714000000.5"), DELETE, CN)
    app_delete = plan_forward(stream_record("REMOVE", old=item("1714000000.5")), PAIR, CN, CONFLICT)
    assert isinstance(app_delete, ReplicationRecord)
    assert app_delete.version == Version(CREATED_S, DELETE, CN)  # an application delete: when it was made


def test_ttl_deletes_can_be_skipped_and_unversioned_ones_remove_only_unversioned_copies() -> None:
    record = {**stream_record("REMOVE", old=item(ts=None, region=None)), "userIdentity": TTL}
    planned = plan_forward(record, PAIR, CN, CONFLICT)
    assert isinstance(planned, ReplicationRecord) and planned.version == Version(Decimal(0), DELETE, CN)
    assert plan_forward(record, PAIR, CN, Conflict(ttl_deletes="skip")) == Skip("ttl_delete")
    other_service = {**stream_record("REMOVE", old=item()), "userIdentity": {"Type": "Service", "PrincipalId": "x"}}
    # Not the TTL service: an application delete, max(when it was made, the version it removed).
    assert plan_forward(other_service, PAIR, CN, CONFLICT).version.timestamp == Decimal("1714564800.5")  # type: ignore[union-attr]
