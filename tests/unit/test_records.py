"""The replication record (docs/design.md §3): JSON payload, exact pass-through, strict decoding."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from replicatord.conflict import DELETE, PUT, Version
from replicatord.records import (
    RecordError,
    ReplicationRecord,
    creation_seconds,
    decode_record,
    encode_record,
    item_size_floor,
    partition_key,
)

KEYS = {"PK": {"S": "user#1"}}
BIG_N = "123456789012345678901234567890.123"


def put_record(extra: dict[str, Any] | None = None, keys: dict[str, Any] | None = None) -> ReplicationRecord:
    keys = keys if keys is not None else KEYS
    image = {**keys, "last_update_timestamp": {"N": "1700000000.25"}, "last_updater_region": {"S": "cn"}}
    image.update(extra or {})
    return ReplicationRecord(
        op="PUT",
        pair="user",
        keys=keys,
        image=image,
        version=Version(Decimal("1700000000.25"), PUT, "cn-north-1"),
        origin="cn-north-1",
        sequence_number="4900000000000000000000123",
        created_s=1700000000.0,
    )


def delete_record() -> ReplicationRecord:
    return ReplicationRecord(
        op="DELETE",
        pair="user",
        keys={"PK": {"S": "user#1"}, "SK": {"N": "7"}},
        image=None,
        version=Version(Decimal("1700000001"), DELETE, "ap-southeast-1"),
        origin="ap-southeast-1",
        sequence_number="100",
        created_s=1700000001.5,
    )


# --- round trip ----------------------------------------------------------------------------

ATTRIBUTES = {
    "S": {"S": "hello"},
    "S_empty": {"S": ""},
    "S_unicode": {"S": "北京 — Zürich 🚀 \u0000 \n\"quoted\""},
    "N_int": {"N": "42"},
    "N_negative": {"N": "-0.000001"},
    "N_big": {"N": BIG_N},
    "N_exponent": {"N": "1E+3"},
    "N_trailing_zeros": {"N": "10.500"},
    "B": {"B": b"\x00\x01\xff binary"},
    "B_empty": {"B": b""},
    "SS": {"SS": ["a", "b", "ü"]},
    "NS": {"NS": ["1", "2.50", BIG_N]},
    "BS": {"BS": [b"\x00", b"\xff\xfe", b"abc"]},
    "BOOL_true": {"BOOL": True},
    "BOOL_false": {"BOOL": False},
    "NULL": {"NULL": True},
    "L": {"L": [{"S": "x"}, {"N": "1"}, {"B": b"\x01"}, {"NULL": True}, {"L": []}]},
    "L_empty": {"L": []},
    "M": {
        "M": {
            "inner": {"M": {"deep": {"L": [{"M": {"b": {"BS": [b"\x02"]}, "n": {"N": "0.1"}}}]}}},
            "flag": {"BOOL": False},
            "名前": {"S": "値"},
        }
    },
    "M_empty": {"M": {}},
}


@pytest.mark.parametrize("name", list(ATTRIBUTES))
def test_round_trip_each_attribute_type(name: str) -> None:
    record = put_record({name: ATTRIBUTES[name]})
    decoded = decode_record(encode_record(record))
    assert decoded == record
    assert decoded.image is not None
    assert decoded.image[name] == ATTRIBUTES[name]


def test_round_trip_every_type_in_one_image() -> None:
    record = put_record(dict(ATTRIBUTES))
    assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize(
    "keys",
    [
        {"PK": {"S": "ü-ключ"}},
        {"PK": {"N": BIG_N}},
        {"PK": {"B": b"\x00\xffkey"}},
        {"PK": {"S": "a"}, "SK": {"N": "1"}},
        {"PK": {"S": ""}},
    ],
    ids=["S", "N", "B", "hash_range", "empty_S"],
)
def test_round_trip_key_types(keys: dict[str, Any]) -> None:
    record = put_record(keys=keys)
    assert decode_record(encode_record(record)) == record


def test_round_trip_delete() -> None:
    record = delete_record()
    payload = encode_record(record)
    assert json.loads(payload)["image"] is None
    assert decode_record(payload) == record


def test_payload_shape() -> None:
    doc = json.loads(encode_record(put_record({"n": {"N": BIG_N}, "b": {"B": b"\x00\xff"}})))
    assert doc["v"] == 1
    assert doc["op"] == "PUT"
    assert doc["pair"] == "user"
    assert doc["keys"] == {"PK": {"S": "user#1"}}
    assert doc["version"] == {"ts": "1700000000.25", "op": "PUT", "region": "cn-north-1"}
    assert doc["origin"] == "cn-north-1"
    assert doc["seq"] == "4900000000000000000000123"
    assert doc["created"] == 1700000000.0
    # numbers stay strings exactly, binary is base64 text
    assert doc["image"]["n"] == {"N": BIG_N}
    assert doc["image"]["b"] == {"B": base64.b64encode(b"\x00\xff").decode()}


def test_numbers_never_go_through_float() -> None:
    numbers = [BIG_N, "0.1", "1E+3", "-0", "10.500", "9007199254740993", "1e-130"]
    record = put_record({f"n{i}": {"N": n} for i, n in enumerate(numbers)} | {"ns": {"NS": numbers}})
    payload = encode_record(record)
    doc = json.loads(payload)
    decoded = decode_record(payload)
    assert decoded.image is not None
    for i, n in enumerate(numbers):
        assert doc["image"][f"n{i}"] == {"N": n}
        assert decoded.image[f"n{i}"] == {"N": n}
    assert decoded.image["ns"] == {"NS": numbers}


def test_binary_is_base64_in_payload_and_bytes_again() -> None:
    blobs = [b"\x00", b"\xff" * 7, bytes(range(256))]
    record = put_record({"bs": {"BS": blobs}, "b": {"B": blobs[2]}})
    doc = json.loads(encode_record(record))
    assert doc["image"]["bs"] == {"BS": [base64.b64encode(b).decode() for b in blobs]}
    decoded = decode_record(encode_record(record))
    assert decoded.image is not None
    assert decoded.image["bs"]["BS"] == blobs
    assert isinstance(decoded.image["b"]["B"], bytes)


def test_payload_is_utf8_json_not_escaped() -> None:
    payload = encode_record(put_record({"s": {"S": "北京"}}))
    assert "北京".encode() in payload
    payload.decode("utf-8")


def test_version_timestamp_exact() -> None:
    record = put_record()
    record = ReplicationRecord(
        record.op, record.pair, record.keys, record.image,
        Version(Decimal(BIG_N), PUT, "cn-north-1"), record.origin, record.sequence_number, 1.0,
    )
    decoded = decode_record(encode_record(record))
    assert str(decoded.version.timestamp) == BIG_N


# --- decode rejects ------------------------------------------------------------------------


def valid_doc(op: str = "PUT") -> dict[str, Any]:
    record = put_record() if op == "PUT" else delete_record()
    doc: dict[str, Any] = json.loads(encode_record(record))
    return doc


DROP = object()


def with_(path: str, value: Any, op: str = "PUT") -> bytes:
    """The valid payload with the value at a dotted path replaced (or removed if value is DROP)."""
    doc = valid_doc(op)
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target[part]
    if value is DROP:
        del target[last]
    else:
        target[last] = value
    return json.dumps(doc).encode()


DECODE_CASES = [
    (b"{not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe\xfa", "not JSON"),
    (b'{"v": 1,', "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"record"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"42", "not a JSON object"),
    (with_("v", DROP), "unsupported record version None"),
    (with_("v", 2), "unsupported record version 2"),
    (with_("v", "1"), "unsupported record version '1'"),
    (with_("v", None), "unsupported record version"),
    (with_("op", "UPSERT"), "unknown op 'UPSERT'"),
    (with_("op", "put"), "unknown op 'put'"),
    (with_("op", DROP), "missing field 'op'"),
    (with_("op", 0), "field 'op' has the wrong type"),
    (with_("keys", DROP), "missing field 'keys'"),
    (with_("keys", {}), "keys: empty"),
    (with_("keys", [["PK", "x"]]), "field 'keys' has the wrong type"),
    (with_("keys.PK", {"S": "other"}), "image: key attribute 'PK' missing or different"),
    (with_("image.PK", DROP), "image: key attribute 'PK' missing or different"),
    (with_("image.PK", {"N": "1"}), "image: key attribute 'PK' missing or different"),
    (with_("image", DROP), "missing field 'image'"),
    (with_("image", None), "field 'image' has the wrong type"),
    (with_("image.b", {"B": "not base64!"}), "image.b: invalid base64"),
    (with_("image.b", {"B": "QUJ"}), "image.b: invalid base64"),
    (with_("image.b", {"B": 12}), "image.b: binary must be a base64 string"),
    (with_("image.bs", {"BS": ["QUJD", "%%%"]}), "image.bs: invalid base64"),
    (with_("image.bs", {"BS": "QUJD"}), "image.bs: expected a list of strings"),
    (with_("image.n", {"N": "abc"}), "image.n: N must be a number"),
    (with_("image.n", {"N": "NaN"}), "image.n: N must be a number"),
    (with_("image.n", {"N": "Infinity"}), "image.n: N must be a number"),
    (with_("image.n", {"N": ""}), "image.n: N must be a number"),
    (with_("image.n", {"N": 5}), "image.n: N must be a number"),
    (with_("image.n", {"N": 5.5}), "image.n: N must be a number"),
    (with_("image.x", {"X": "1"}), "image.x: unknown attribute type 'X'"),
    (with_("image.x", {"s": "lowercase tag"}), "image.x: unknown attribute type 's'"),
    (with_("image.x", {"S": "a", "N": "1"}), "image.x: not a DynamoDB attribute value"),
    (with_("image.x", {}), "image.x: not a DynamoDB attribute value"),
    (with_("image.x", "raw"), "image.x: not a DynamoDB attribute value"),
    (with_("image.x", {"S": True}), "image.x: S must be a string"),
    (with_("image.x", {"S": None}), "image.x: S must be a string"),
    (with_("image.x", {"SS": ["a", True]}), "image.x: expected a list of strings"),
    (with_("image.x", {"NS": [1, 2]}), "image.x: expected a list of strings"),
    (with_("image.x", {"BOOL": "true"}), "image.x: BOOL must be true or false"),
    (with_("image.x", {"BOOL": 1}), "image.x: BOOL must be true or false"),
    (with_("image.x", {"NULL": False}), "image.x: NULL must be true"),
    (with_("image.x", {"L": {"S": "a"}}), "image.x: L must be a list"),
    (with_("image.x", {"L": [{"S": "a"}, {"N": "x"}]}), "image.x[1]: N must be a number"),
    (with_("image.x", {"M": [1]}), "image.x: expected an attribute map"),
    (with_("image.x", {"M": {"a": {"M": {"b": {"Q": 1}}}}}), "image.x.a.b: unknown attribute type 'Q'"),
    (with_("keys.PK", {"S": 1}), "keys.PK: S must be a string"),
    (with_("pair", True), "field 'pair' has the wrong type"),
    (with_("pair", DROP), "missing field 'pair'"),
    (with_("origin", 1), "field 'origin' has the wrong type"),
    (with_("seq", 100), "field 'seq' has the wrong type"),
    (with_("seq", DROP), "missing field 'seq'"),
    (with_("created", True), "field 'created' has the wrong type"),
    (with_("created", "1700000000"), "field 'created' has the wrong type"),
    (with_("created", DROP), "missing field 'created'"),
    (with_("version", DROP), "missing field 'version'"),
    (with_("version", "1700000000"), "field 'version' has the wrong type"),
    (with_("version.ts", DROP), "missing field 'ts'"),
    (with_("version.ts", "soon"), "version.ts: not a number"),
    (with_("version.ts", "NaN"), "version.ts: not a number"),
    (with_("version.ts", 1700000000), "field 'ts' has the wrong type"),
    (with_("version.ts", True), "field 'ts' has the wrong type"),
    (with_("version.op", "DELETE"), "version.op does not match op"),
    (with_("version.op", "PUT", op="DELETE"), "version.op does not match op"),
    (with_("version.op", False), "field 'op' has the wrong type"),
    (with_("version.region", DROP), "missing field 'region'"),
    (with_("version.region", ["cn"]), "field 'region' has the wrong type"),
]


@pytest.mark.parametrize(("payload", "reason"), DECODE_CASES, ids=[reason for _, reason in DECODE_CASES])
def test_decode_rejects_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as raised:
        decode_record(payload)
    assert reason in str(raised.value)


def test_valid_doc_decodes() -> None:
    assert decode_record(json.dumps(valid_doc()).encode()) == put_record()
    assert decode_record(json.dumps(valid_doc("DELETE")).encode()) == delete_record()


def test_unknown_extra_fields_are_tolerated() -> None:
    doc = valid_doc()
    doc["trace_id"] = "abc"
    assert decode_record(json.dumps(doc).encode()) == put_record()


def test_integer_created_is_a_float() -> None:
    doc = valid_doc()
    doc["created"] = 1700000000
    decoded = decode_record(json.dumps(doc).encode())
    assert decoded.created_s == 1700000000.0
    assert isinstance(decoded.created_s, float)


@pytest.mark.parametrize("v", [True, 1.0], ids=["true", "float"])
def test_decode_rejects_non_integer_schema_version(v: Any) -> None:
    with pytest.raises(RecordError, match="version"):
        decode_record(with_("v", v))


def test_decode_rejects_non_numeric_number_set() -> None:
    with pytest.raises(RecordError, match="number"):
        decode_record(with_("image.x", {"NS": ["1", "abc"]}))


@pytest.mark.parametrize("number", ["1_000", " 5 "], ids=["underscore", "spaces"])
def test_decode_rejects_python_only_number_spellings(number: str) -> None:
    with pytest.raises(RecordError, match="number"):
        decode_record(with_("image.x", {"N": number}))


def test_decode_rejects_deeply_nested_payload() -> None:
    with pytest.raises(RecordError):
        decode_record(b"[" * 100_000)


# --- partition key -------------------------------------------------------------------------


def test_partition_key_is_deterministic_and_order_independent() -> None:
    a = {"PK": {"S": "user#1"}, "SK": {"N": "7"}}
    b = {"SK": {"N": "7"}, "PK": {"S": "user#1"}}
    assert partition_key(a) == partition_key(b) == partition_key(json.loads(json.dumps(a)))


@pytest.mark.parametrize(
    "keys",
    [
        {"PK": {"S": "user#1"}},
        {"PK": {"S": "user#2"}},
        {"PK": {"N": "1"}},
        {"PK": {"S": "1"}},
        {"PK": {"B": b"1"}},
        {"pk": {"S": "user#1"}},
        {"PK": {"S": "user#1"}, "SK": {"N": "1"}},
        {"PK": {"S": "user#1"}, "SK": {"N": "2"}},
        {"PK": {"S": "user#1"}, "SK": {"S": "1"}},
        {"PK": {"S": "x" * 2048}},
        {"PK": {"S": "北京"}},
    ],
)
def test_partition_key_is_bounded(keys: dict[str, Any]) -> None:
    key = partition_key(keys)
    assert 1 <= len(key) <= 256
    assert len(key.encode()) <= 256


def test_partition_keys_differ_for_different_keys() -> None:
    keys = [
        {"PK": {"S": "user#1"}},
        {"PK": {"S": "user#2"}},
        {"PK": {"N": "1"}},
        {"PK": {"S": "1"}},
        {"PK": {"B": b"1"}},
        {"pk": {"S": "user#1"}},
        {"PK": {"S": "user#1"}, "SK": {"N": "1"}},
        {"PK": {"S": "user#1"}, "SK": {"S": "1"}},
        {"PK": {"S": "a"}, "SK": {"S": "bc"}},
        {"PK": {"S": "ab"}, "SK": {"S": "c"}},
    ]
    assert len({partition_key(k) for k in keys}) == len(keys)


# --- creation time -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2024, 1, 1, tzinfo=UTC), Decimal("1704067200")),
        (datetime(2024, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC), Decimal("1704067200.5")),
        (datetime(2024, 1, 1, 8, tzinfo=timezone(timedelta(hours=8))), Decimal("1704067200")),
        (1704067200, Decimal("1704067200")),
        (1704067200.25, Decimal("1704067200.25")),
        (Decimal("1704067200.123456"), Decimal("1704067200.123456")),
        (0, Decimal(0)),
    ],
    ids=["datetime", "datetime_micro", "datetime_plus8", "int", "float", "decimal", "zero"],
)
def test_creation_seconds(value: Any, expected: Decimal) -> None:
    got = creation_seconds(value)
    assert isinstance(got, Decimal)
    assert got == expected


@pytest.mark.parametrize(("item", "size"), [
    ({"a": {"S": "héllo"}}, 1 + 6),
    ({"a": {"B": b"\x00\x01"}}, 1 + 2),
    ({"a": {"N": "123.4500"}}, 1 + 3),  # 4 significant digits: 2 bytes + 1
    ({"a": {"N": "-0.000001"}}, 1 + 1),
    ({"a": {"BOOL": True}, "b": {"NULL": True}}, 2 + 2),
    ({"a": {"L": [{"NULL": True}] * 3}}, 1 + 3 + 3 * 2),
    ({"a": {"M": {"xy": {"S": "z"}}}}, 1 + 3 + 1 + 2 + 1),
    ({"a": {"NS": ["1", "22"]}, "b": {"SS": ["x"]}}, 1 + (1 + 2) + 1 + 1),
])
def test_the_size_floor_counts_every_type(item: dict[str, Any], size: int) -> None:
    assert item_size_floor(item) == size


def test_a_list_of_nulls_is_counted_not_free() -> None:
    """Issue 17: 65,000 NULLs used to count as 54 bytes."""
    assert item_size_floor({"PK": {"S": "k"}, "l": {"L": [{"NULL": True}] * 65_000}}) > 130_000
