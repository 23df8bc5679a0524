"""Last writer wins (docs/design.md §4): version order, the apply decision and its DynamoDB conditions."""

from __future__ import annotations

import itertools
import re
from decimal import Decimal
from typing import Any

import pytest

from replicatord.config import Conflict
from replicatord.conflict import (
    DELETE,
    PUT,
    Version,
    WriteCondition,
    decide_apply,
    delete_condition,
    delete_version,
    mark_condition,
    put_condition,
    stamp_condition,
    version_of,
)

CONFLICT = Conflict()
TS = CONFLICT.timestamp_attribute
RG = CONFLICT.region_attribute
CN = "cn-north-1"
SG = "ap-southeast-1"
KEYS = {"PK": {"S": "user#1"}}


def v(ts: str, op: int = PUT, region: str = CN) -> Version:
    return Version(Decimal(ts), op, region)


def image(ts: str | None = "100", region: str | None = CN, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"PK": {"S": "user#1"}, "name": {"S": "Ann"}}
    if ts is not None:
        item[TS] = {"N": ts}
    if region is not None:
        item[RG] = {"S": region}
    item.update(extra)
    return item


# --- ordering ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        # timestamp is a number, not a string ("10" < "9.5" as text)
        (v("9.5"), v("10")),
        (v("9"), v("10")),
        (v("-1"), v("0")),
        (v("999.999"), v("1e3")),
        (v("1e3"), v("1000.0000001")),
        # beyond float precision
        (v("12345678901234567890"), v("12345678901234567890.000000000000000001")),
        # timestamp first: an older DELETE loses to a newer PUT, whatever the regions
        (v("5", DELETE, "zz"), v("6", PUT, "aa")),
        # then DELETE above PUT
        (v("5", PUT, "zz"), v("5", DELETE, "aa")),
        # then region as a string
        (v("5", PUT, SG), v("5", PUT, CN)),
        (v("5", DELETE, SG), v("5", DELETE, CN)),
    ],
    ids=lambda x: f"{x.timestamp}/{x.op}/{x.region}",
)
def test_version_order(lower: Version, higher: Version) -> None:
    assert lower < higher
    assert higher > lower
    assert lower != higher


@pytest.mark.parametrize(
    ("a", "b"),
    [("1e3", "1000"), ("1000.000", "1000"), ("0.10", "0.1"), ("-0", "0"), ("1E+3", "1000")],
)
def test_equal_numbers_are_equal_versions(a: str, b: str) -> None:
    assert v(a) == v(b)
    assert not v(a) < v(b)
    assert not v(b) < v(a)


def test_encode_is_canonical_json() -> None:
    assert v("1700000000.5", DELETE, CN).encode() == '["1700000000.5","DELETE","cn-north-1"]'
    assert v("7", PUT, SG).encode() == '["7","PUT","ap-southeast-1"]'


# --- version_of ----------------------------------------------------------------------------


def test_version_of_reads_the_configured_attributes() -> None:
    assert version_of(image("1700000000.123456789", SG), CONFLICT) == Version(
        Decimal("1700000000.123456789"), PUT, SG
    )


def test_version_of_custom_attribute_names() -> None:
    conflict = Conflict(timestamp_attribute="ts", region_attribute="rg")
    item = {"PK": {"S": "a"}, "ts": {"N": "42"}, "rg": {"S": SG}}
    assert version_of(item, conflict) == v("42", PUT, SG)
    # the default names mean nothing under a custom config
    assert version_of(image(), conflict) is None


def test_version_of_keeps_exact_decimal() -> None:
    got = version_of(image("123456789012345678901234567890.123"), CONFLICT)
    assert got is not None
    assert got.timestamp == Decimal("123456789012345678901234567890.123")
    assert str(got.timestamp) == "123456789012345678901234567890.123"


@pytest.mark.parametrize(
    "item",
    [
        None,
        {},
        image(ts=None),
        image(region=None),
        image(ts=None, region=None),
        {**image(), TS: {"S": "100"}},  # timestamp stored as a string
        {**image(), TS: "100"},  # not a DynamoDB attribute value at all
        {**image(), TS: {"N": "100"}, RG: {"N": "1"}},  # region stored as a number
        {**image(), RG: {"SS": [CN]}},
        {**image(), RG: None},
        image("NaN"),
        image("-NaN"),
        image("sNaN"),
        image("Infinity"),
        image("-Infinity"),
        image("inf"),
        image("abc"),
        image(""),
        image("1.2.3"),
    ],
    ids=[
        "none",
        "empty",
        "no_ts",
        "no_region",
        "neither",
        "ts_as_S",
        "ts_raw",
        "region_as_N",
        "region_as_SS",
        "region_none",
        "nan",
        "neg_nan",
        "snan",
        "inf",
        "neg_inf",
        "inf_short",
        "abc",
        "empty_number",
        "two_dots",
    ],
)
def test_version_of_unversioned_is_none(item: dict[str, Any] | None) -> None:
    assert version_of(item, CONFLICT) is None


@pytest.mark.parametrize("bad", [None, [1, 2], {"x": 1}], ids=["none", "list", "dict"])
def test_version_of_ill_typed_number_payload_is_none(bad: Any) -> None:
    assert version_of({**image(), TS: {"N": bad}}, CONFLICT) is None


def test_version_of_ill_typed_region_payload_is_none() -> None:
    assert version_of({**image(), RG: {"S": 5}}, CONFLICT) is None


# --- delete_version ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("removed", "approx", "expected_ts"),
    [
        (image("100", SG), "90", "100"),  # the removed image is newer than the stream's clock
        (image("100", SG), "110", "110"),
        (image("100", SG), "100", "100"),
        (image("100.5", SG), "100", "100.5"),
        (None, "110", "110"),
        ({}, "110", "110"),
        (image(ts=None), "110", "110"),
        (image("NaN"), "110", "110"),
    ],
)
def test_delete_version(removed: dict[str, Any] | None, approx: str, expected_ts: str) -> None:
    got = delete_version(removed, Decimal(approx), CN, CONFLICT)
    assert got == Version(Decimal(expected_ts), DELETE, CN)


@pytest.mark.parametrize("approx", ["0", "99", "100", "101"])
@pytest.mark.parametrize("removed_region", [CN, SG, "zz-last-1", "aa-first-1"])
def test_delete_beats_the_version_it_removed(approx: str, removed_region: str) -> None:
    removed = image("100", removed_region)
    removed_version = version_of(removed, CONFLICT)
    assert removed_version is not None
    deleting = delete_version(removed, Decimal(approx), CN, CONFLICT)
    assert deleting.region == CN
    assert removed_version < deleting
    assert decide_apply(removed_version, True, deleting)


# --- decide_apply --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "exists", "incoming", "applies"),
    [
        # absent item: PUT lands, DELETE is a no-op
        (None, False, v("1"), True),
        (None, False, v("1", DELETE), False),
        # present but unversioned: any versioned change beats it
        (None, True, v("1"), True),
        (None, True, v("1", DELETE), True),
        # present and versioned, PUT incoming
        (v("10"), True, v("11"), True),
        (v("10"), True, v("9"), False),
        (v("10"), True, v("10"), False),  # same change again: no-op
        (v("9.5"), True, v("10"), True),  # numeric, not textual
        (v("10", PUT, SG), True, v("10", PUT, CN), True),  # same time: higher region wins
        (v("10", PUT, CN), True, v("10", PUT, SG), False),
        # present and versioned, DELETE incoming: applies iff local timestamp <= delete's
        (v("10"), True, v("11", DELETE), True),
        (v("10", PUT, CN), True, v("10", DELETE, SG), True),  # DELETE outranks PUT at the same time
        (v("10", PUT, SG), True, v("10", DELETE, CN), True),
        (v("11"), True, v("10", DELETE), False),
    ],
)
def test_decide_apply(local: Version | None, exists: bool, incoming: Version, applies: bool) -> None:
    assert decide_apply(local, exists, incoming) is applies


SAME_TIME = [
    v("10", PUT, CN),
    v("10", PUT, SG),
    v("10", PUT, "us-east-1"),
    v("10", DELETE, CN),
    v("10", DELETE, SG),
    v("1e1", PUT, "eu-west-1"),
]


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(SAME_TIME, 2)))
def test_same_timestamp_resolves_identically_from_both_sides(a: Version, b: Version) -> None:
    # region A holds a and receives b; region B holds b and receives a: exactly one replaces.
    assert decide_apply(a, True, b) != decide_apply(b, True, a)


@pytest.mark.parametrize("version", SAME_TIME)
def test_equal_version_is_a_noop(version: Version) -> None:
    assert not decide_apply(version, True, version)
    assert not decide_apply(version, True, Version(version.timestamp, version.op, version.region))


def test_decide_apply_is_a_strict_total_order_over_present_items() -> None:
    versions = [v(ts, op, r) for ts in ("1", "1.0", "2") for op in (PUT, DELETE) for r in (CN, SG)]
    for a, b in itertools.product(versions, repeat=2):
        forward, backward = decide_apply(a, True, b), decide_apply(b, True, a)
        if a == b:
            assert not forward and not backward
        else:
            assert forward != backward


# --- condition expressions -----------------------------------------------------------------

_NAME = re.compile(r"#[A-Za-z0-9_]+")
_VALUE = re.compile(r":[A-Za-z0-9_]+")


def placeholders(expression: str) -> tuple[set[str], set[str]]:
    return set(_NAME.findall(expression)), set(_VALUE.findall(expression))


def test_put_condition_names_and_values_match() -> None:
    cond = put_condition(KEYS, v("1700000000.5", PUT, SG), CONFLICT)
    names, values = placeholders(cond.expression)
    assert names == set(cond.names)
    assert values == set(cond.values)
    assert cond.names == {"#k": "PK", "#ts": TS, "#rg": RG}
    assert cond.values == {":ts": {"N": "1700000000.5"}, ":rg": {"S": SG}, ":n": {"S": "N"}, ":s": {"S": "S"}}


def test_mark_condition_defines_the_marker_for_the_update() -> None:
    incoming = v("1700000000.5", DELETE, SG)
    cond = mark_condition(KEYS, incoming, CONFLICT)
    names, values = placeholders(cond.expression)
    # #m / :m are not in the condition: they serve the caller's `SET #m = :m`
    assert "#m" not in names
    assert ":m" not in values
    assert names | {"#m"} == set(cond.names)
    assert values | {":m"} == set(cond.values)
    update_names, update_values = placeholders("SET #m = :m")
    assert (names | update_names) == set(cond.names)
    assert (values | update_values) == set(cond.values)
    assert cond.names["#m"] == CONFLICT.marker_attribute == "replicatord:deleting"
    assert cond.values[":m"] == {"S": incoming.encode()}
    assert cond.values[":ts"] == {"N": "1700000000.5"}


def test_delete_condition_matches_the_marker_it_set() -> None:
    incoming = v("42", DELETE, CN)
    cond = delete_condition(incoming, CONFLICT)
    names, values = placeholders(cond.expression)
    assert names == set(cond.names)
    assert values == set(cond.values)
    mark = mark_condition(KEYS, incoming, CONFLICT)
    assert cond.names["#m"] == mark.names["#m"]
    assert cond.values[":m"] == mark.values[":m"]
    # another delete's version does not match the marker
    assert delete_condition(v("42", DELETE, SG), CONFLICT).values[":m"] != mark.values[":m"]


def test_conditions_use_custom_attribute_names() -> None:
    conflict = Conflict(timestamp_attribute="ts", region_attribute="rg", marker_attribute="aws:rep:deleting")
    keys = {"PK": {"S": "a"}, "SK": {"N": "1"}}
    put = put_condition(keys, v("1"), conflict)
    mark = mark_condition(keys, v("1", DELETE), conflict)
    remove = delete_condition(v("1", DELETE), conflict)
    assert put.names["#ts"] == mark.names["#ts"] == "ts"
    assert put.names["#rg"] == "rg"
    assert put.names["#k"] in keys and mark.names["#k"] in keys
    assert mark.names["#m"] == remove.names["#m"] == "aws:rep:deleting"


# A small evaluator for the condition grammar these builders use, with DynamoDB's semantics:
# N compares as a number, S by code point (= UTF-8 byte order), a missing attribute or a type
# mismatch makes a comparison false.

_TOKEN = re.compile(
    r"\s*(attribute_not_exists|attribute_exists|attribute_type|NOT|AND|OR|<=|<|=|,|\(|\)|#\w+|:\w+)"
)


def evaluate(cond: WriteCondition, item: dict[str, Any] | None) -> bool:
    tokens = []
    pos = 0
    text = cond.expression
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        assert match, f"cannot tokenize {text[pos:]!r}"
        tokens.append(match.group(1))
        pos = match.end()
    attrs = item or {}

    def operand(tok: str) -> Any:
        return attrs.get(cond.names[tok]) if tok.startswith("#") else cond.values[tok]

    def compare(a: Any, op: str, b: Any) -> bool:
        if a is None or b is None or a.keys() != b.keys():
            return False
        (kind,) = a.keys()
        if kind == "N":
            x, y = Decimal(a["N"]), Decimal(b["N"])
        elif kind == "S":
            x, y = a["S"], b["S"]
        else:
            return False
        return {"<": x < y, "<=": x <= y, "=": x == y}[op]

    def parse_or(i: int) -> tuple[bool, int]:
        result, i = parse_and(i)
        while i < len(tokens) and tokens[i] == "OR":
            right, i = parse_and(i + 1)
            result = result or right
        return result, i

    def parse_and(i: int) -> tuple[bool, int]:
        result, i = parse_atom(i)
        while i < len(tokens) and tokens[i] == "AND":
            right, i = parse_atom(i + 1)
            result = result and right
        return result, i

    def parse_atom(i: int) -> tuple[bool, int]:
        tok = tokens[i]
        if tok == "NOT":
            result, i = parse_atom(i + 1)
            return not result, i
        if tok == "attribute_type":
            assert tokens[i + 1] == "(" and tokens[i + 3] == "," and tokens[i + 5] == ")"
            value = operand(tokens[i + 2])
            wanted = operand(tokens[i + 4])["S"]
            return value is not None and wanted in value, i + 6
        if tok == "(":
            result, i = parse_or(i + 1)
            assert tokens[i] == ")"
            return result, i + 1
        if tok in ("attribute_exists", "attribute_not_exists"):
            assert tokens[i + 1] == "(" and tokens[i + 3] == ")"
            present = operand(tokens[i + 2]) is not None
            return (present if tok == "attribute_exists" else not present), i + 4
        return compare(operand(tok), tokens[i + 1], operand(tokens[i + 2])), i + 3

    result, end = parse_or(0)
    assert end == len(tokens)
    return result


LOCAL_ITEMS = [
    None, image(ts=None, region=None),
    image(region=None, **{TS: {"S": "10"}, RG: {"S": CN}}),  # a timestamp that is not a number
    image(ts="10", region=None, **{RG: {"N": "1"}}),  # a region that is not a string
] + [
    image(ts, region) for ts in ("9", "10", "10.0", "11") for region in (CN, SG)
]
INCOMING = [v(ts, op, region) for ts in ("9.5", "10", "1e1") for op in (PUT, DELETE) for region in (CN, SG)]


@pytest.mark.parametrize("local", LOCAL_ITEMS, ids=lambda i: "absent" if i is None else str(i.get(TS)))
@pytest.mark.parametrize("incoming", INCOMING, ids=str)
def test_conditions_agree_with_decide_apply(local: dict[str, Any] | None, incoming: Version) -> None:
    expected = decide_apply(version_of(local, CONFLICT), local is not None, incoming)
    if incoming.op == PUT:
        assert evaluate(put_condition(KEYS, incoming, CONFLICT), local) is expected
    else:
        marked = evaluate(mark_condition(KEYS, incoming, CONFLICT), local)
        assert marked is expected
        if marked:
            assert local is not None
            after_mark = {**local, CONFLICT.marker_attribute: {"S": incoming.encode()}}
            assert evaluate(delete_condition(incoming, CONFLICT), after_mark)


@pytest.mark.parametrize("local", LOCAL_ITEMS, ids=lambda i: "absent" if i is None else str(i.get(TS)))
def test_stamp_condition_holds_for_present_unversioned_items(local: dict[str, Any] | None) -> None:
    expected = local is not None and version_of(local, CONFLICT) is None
    assert evaluate(stamp_condition(KEYS, CONFLICT), local) is expected


@pytest.mark.parametrize("op", [PUT, DELETE], ids=["put", "delete"])
def test_conditions_agree_with_decide_apply_on_partially_versioned_items(op: int) -> None:
    local = image("11", region=None)
    incoming = v("10", op, CN)
    assert decide_apply(version_of(local, CONFLICT), True, incoming)
    build = put_condition if op == PUT else mark_condition
    assert evaluate(build(KEYS, incoming, CONFLICT), local)
