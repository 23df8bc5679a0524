"""Hostile and malformed replication records (issue 7): every payload decodes to a valid record or
raises RecordError with a reason, in time linear in its size, and what decodes encodes again.

The Hypothesis profile sets the volume (tests/conftest.py): `HYPOTHESIS_PROFILE=fuzz`
(scripts/fuzz.sh) runs many more examples than CI's default.
"""

from __future__ import annotations

import base64
import json
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicatord.conflict import PUT, Version, parse_number
from replicatord.records import (
    MAX_RECORD_BYTES,
    RecordError,
    ReplicationRecord,
    decode_record,
    encode_record,
)

# A generous bound per input: the decoder takes about a millisecond per 100 KB. The quadratic number
# pattern it replaced took 44 s on 40,000 digits; what the bound guards is the complexity class.
DECODE_BOUND_S = 2.0


def valid_doc() -> dict[str, Any]:
    keys = {"PK": {"S": "user#1"}}
    image = {**keys, "last_update_timestamp": {"N": "1700000000.25"}, "last_updater_region": {"S": "cn-north-1"}}
    record = ReplicationRecord("PUT", "user", keys, image, Version(Decimal("1700000000.25"), PUT, "cn-north-1"),
                               "cn-north-1", "4900000000000000000000123", 1700000000.0)
    doc: dict[str, Any] = json.loads(encode_record(record))
    return doc


def raw(path: str, text: str) -> bytes:
    """The valid payload with the JSON at a dotted path replaced by `text` exactly as written."""
    doc = valid_doc()
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target[part]
    target[last] = "@@RAW@@"
    return json.dumps(doc).replace('"@@RAW@@"', text).encode()


def nested_map(depth: int) -> str:
    return '{"M": {"a": ' * depth + '{"S": "x"}' + "}}" * depth


HOSTILE = {
    # Python's int() refuses over 4,300 digits with a ValueError, not a RecordError.
    "created_5000_digit_int": raw("created", "1" * 5000),
    "v_5000_digit_int": raw("v", "1" * 5000),
    "created_nan": raw("created", "NaN"),
    "created_infinity": raw("created", "Infinity"),
    "created_minus_infinity": raw("created", "-Infinity"),
    "created_overflowing_float": raw("created", "1e999"),
    "created_negative": raw("created", "-5"),
    # b64decode raises ValueError (not binascii.Error) for non-ASCII text.
    "B_non_ascii": raw("image.b", '{"B": "\u00fc\u00fc\u00fc\u00fc"}'),
    "BS_non_ascii": raw("image.bs", '{"BS": ["QUJD", "\u4eac"]}'),
    "B_not_canonical": raw("image.b", '{"B": "QR=="}'),
    # 400 levels of M in 5.8 KB: the recursive walk ran out of stack (RecursionError).
    "M_nested_400": raw("image.deep", nested_map(400)),
    "M_nested_33": raw("image.deep", nested_map(33)),
    "L_nested_33": raw("image.deep", '{"L": [' * 33 + '{"NULL": true}' + "]}" * 33),
    # Decodes in Python, then no UTF-8 encoder takes it (DynamoDB, SQS, encode_record).
    "S_lone_surrogate": raw("image.s", '{"S": "ok \\ud800 then"}'),
    "SS_lone_surrogate": raw("image.ss", '{"SS": ["a", "\\udfff"]}'),
    "name_lone_surrogate": raw("image", '{"PK": {"S": "user#1"}, "\\ud800": {"S": "x"}}'),
    "pair_lone_surrogate": raw("pair", '"\\udbff"'),
    "region_lone_surrogate": raw("version.region", '"cn\\udc00"'),
    "invalid_utf8": json.dumps(valid_doc()).encode().replace(b"user#1", b"user\xff1"),
    "utf16_json": json.dumps(valid_doc()).encode("utf-16"),
    "N_5000_digits": raw("image.n", '{"N": "' + "1" * 5000 + '"}'),
    "N_quadratic_pattern": raw("image.n", '{"N": "' + "1" * 40_000 + 'x"}'),
    "N_39_significant_digits": raw("image.n", '{"N": "' + "1" * 39 + '"}'),
    "N_exponent_too_large": raw("image.n", '{"N": "1E+126"}'),
    "N_exponent_too_small": raw("image.n", '{"N": "1E-131"}'),
    "N_exponent_beyond_decimal": raw("image.n", '{"N": "1e' + "9" * 150 + '"}'),
    "NS_quadratic_member": raw("image.ns", '{"NS": ["1", "' + "9" * 40_000 + '."]}'),
    "version_ts_quadratic": raw("version.ts", '"' + "1" * 40_000 + 'x"'),
    "SS_empty": raw("image.ss", '{"SS": []}'),
    "SS_duplicates": raw("image.ss", '{"SS": ["a", "a"]}'),
    "NS_duplicates": raw("image.ns", '{"NS": ["1", "1.0"]}'),
    "name_empty": raw("image", '{"PK": {"S": "user#1"}, "": {"S": "x"}}'),
    "kind_huge": raw("image.x", '{"' + "Q" * 100_000 + '": 1}'),
    "op_huge": raw("op", '"' + "P" * 200_000 + '"'),
    "v_deep_list": raw("v", "[" * 900 + "]" * 900),
    "oversized": raw("image.big", '{"S": "' + "x" * MAX_RECORD_BYTES + '"}'),
    # DynamoDB refuses it anyway: refused before a request is built for it.
    "image_over_400_kb": raw("image.big", '{"B": "' + base64.b64encode(b"\x00" * 420_000).decode() + '"}'),
    "array_bomb": b"[" * MAX_RECORD_BYTES,
    "seq_empty": raw("seq", '""'),
    "pair_too_long": raw("pair", '"' + "p" * 10_000 + '"'),
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_payload_is_a_record_error_with_a_bounded_reason(payload: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(RecordError) as raised:
        decode_record(payload)
    elapsed = time.perf_counter() - started
    assert elapsed < DECODE_BOUND_S, elapsed
    reason = str(raised.value)
    assert 0 < len(reason) <= 500, reason[:600]
    reason.encode("utf-8")  # a reason goes into logs and SQS: it must be valid text


def test_limits_are_dynamodbs_own() -> None:
    assert parse_number("9" * 38) is not None
    assert parse_number("9" * 38 + "0" * 88) is not None  # 9.99..E+125, trailing zeros are not digits
    assert parse_number("1E+125") is not None and parse_number("1E-130") is not None
    assert parse_number("0." + "0" * 129 + "1") is not None  # 1E-130 written out
    assert parse_number("-0") == 0 and parse_number("0E+999") == 0
    ok = json.loads(raw("image.deep", nested_map(32)))
    assert decode_record(json.dumps(ok).encode()).image is not None


# --- property-based ------------------------------------------------------------------------

# Text with everything JSON can carry: control characters, astral planes and lone surrogates.
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40)
json_leaf = st.one_of(
    st.none(), st.booleans(), any_text,
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
)
any_json = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(any_text, inner, max_size=5)), max_leaves=30)

number_text = st.one_of(
    st.from_regex(r"[+-]?[0-9]{1,45}(\.[0-9]{0,45})?([eE][+-]?[0-9]{1,4})?", fullmatch=True),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    any_text,
)
b64_text = st.one_of(st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()), any_text)


def attribute_values(depth_leaves: int = 20) -> st.SearchStrategy[Any]:
    """DynamoDB JSON attribute values, mostly well-formed, with adversarial leaves and wrong shapes."""
    leaf = st.one_of(
        st.builds(lambda s: {"S": s}, any_text),
        st.builds(lambda n: {"N": n}, number_text),
        st.builds(lambda b: {"B": b}, b64_text),
        st.builds(lambda m: {"SS": m}, st.lists(any_text, max_size=4)),
        st.builds(lambda m: {"NS": m}, st.lists(number_text, max_size=4)),
        st.builds(lambda m: {"BS": m}, st.lists(b64_text, max_size=4)),
        st.builds(lambda b: {"BOOL": b}, any_json),
        st.builds(lambda b: {"NULL": b}, st.one_of(st.just(True), any_json)),
        any_json,
    )
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda items: {"L": items}, st.lists(inner, max_size=4)),
        st.builds(lambda m: {"M": m}, st.dictionaries(any_text, inner, max_size=4)),
        st.builds(lambda k, v: {k: v}, any_text, inner),
    ), max_leaves=depth_leaves)


def decodes_or_refuses(payload: bytes) -> None:
    """The property: a valid record that survives encode/decode unchanged, or a RecordError."""
    try:
        record = decode_record(payload)
    except RecordError as exc:
        str(exc).encode("utf-8")
        return
    again = encode_record(record)
    again.decode("utf-8")
    assert decode_record(again) == record


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


@given(st.binary(max_size=2048))
@settings(deadline=DECODE_BOUND_S * 1000)
def test_any_bytes(payload: bytes) -> None:
    decodes_or_refuses(payload)


@given(any_json)
@settings(deadline=DECODE_BOUND_S * 1000)
def test_any_json_document(doc: Any) -> None:
    decodes_or_refuses(dumps(doc))


FIELDS = ["v", "op", "pair", "keys", "image", "version", "origin", "seq", "created",
          "version.ts", "version.op", "version.region", "keys.PK", "image.PK", "image.x"]


@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(any_json, attribute_values())), max_size=4))
@settings(deadline=DECODE_BOUND_S * 1000)
def test_valid_record_with_fields_replaced(changes: list[tuple[str, Any]]) -> None:
    doc = valid_doc()
    for path, value in changes:
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[last] = value
    decodes_or_refuses(dumps(doc))


@given(st.dictionaries(any_text, attribute_values(), max_size=6))
@settings(deadline=DECODE_BOUND_S * 1000)
def test_images_of_adversarial_attribute_values(extra: dict[str, Any]) -> None:
    doc = valid_doc()
    doc["image"].update({name: value for name, value in extra.items() if name != "PK"})
    decodes_or_refuses(dumps(doc))
    # The same document as raw UTF-8 with lone surrogates left in: invalid UTF-8 must be refused.
    decodes_or_refuses(json.dumps(doc, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass"))


@given(st.sampled_from(["1", "9.", "[", '{"M":{"a":', '{"L":[', "\\u00e9", "\\ud800"]),
       st.integers(min_value=1, max_value=200_000))
@settings(deadline=DECODE_BOUND_S * 1000)
def test_long_repetitions_stay_linear(unit: str, times: int) -> None:
    """Repeated fragments in every field that has a parser of its own."""
    for path in ("image.n", "created", "version.ts", "image.x", "pair"):
        text = unit * times
        value = json.dumps({"N": text}) if path == "image.n" else f'"{text}"' if path != "created" else text
        decodes_or_refuses(raw(path, value))
