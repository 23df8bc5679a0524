"""Last writer wins (docs/design.md §4): versions, the apply decision and its DynamoDB conditions.

A version is (timestamp, operation, region), compared in that order: the application's
timestamp as a number, then DELETE above PUT, then the region name. Equal versions are the
same change, so applying one twice is a no-op. The condition expressions below are the
DynamoDB form of `decide_apply`; tests check that both agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from replicatord.config import Conflict

PUT = 0
DELETE = 1
OP_NAMES = {PUT: "PUT", DELETE: "DELETE"}
OPS = {name: op for op, name in OP_NAMES.items()}

Item = dict[str, Any]
"""An item or key in DynamoDB JSON as botocore gives it ({"PK": {"S": "x"}}, B as bytes)."""


class Version(NamedTuple):
    timestamp: Decimal
    op: int
    region: str

    def encode(self) -> str:
        """Canonical text form, used as the delete marker's value."""
        return json.dumps([str(self.timestamp), OP_NAMES[self.op], self.region], separators=(",", ":"))


# DynamoDB number syntax (stricter than Decimal(), which also takes "1_000" or " 5 "). Each string
# has one way to match, so matching is linear in its length (a pattern like "\d+\.?\d*" makes the
# engine try every split of a long digit run: quadratic).
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# DynamoDB numbers: at most 38 significant digits, magnitude 1E-130 to 9.99...E+125, or zero.
MAX_SIGNIFICANT_DIGITS = 38
MIN_ADJUSTED_EXPONENT, MAX_ADJUSTED_EXPONENT = -130, 125
# The longest spelling accepted: 38 digits written out at the smallest exponent need about 170
# characters; anything longer is not a number DynamoDB stores.
MAX_NUMBER_CHARS = 200


def parse_number(value: object) -> Decimal | None:
    """A DynamoDB number (in its string form) as a Decimal, or None if it is not one DynamoDB
    stores: its syntax, at most 38 significant digits, and its range. Linear in the length."""
    if not isinstance(value, str) or len(value) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(value):
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:  # an exponent beyond what Decimal holds
        return None
    if number.is_zero():
        return number
    digits = number.as_tuple().digits
    significant = len(digits)
    while digits[significant - 1] == 0:  # trailing zeros are not significant ("1.50" has 2)
        significant -= 1
    if significant > MAX_SIGNIFICANT_DIGITS:
        return None
    if not MIN_ADJUSTED_EXPONENT <= number.adjusted() <= MAX_ADJUSTED_EXPONENT:
        return None
    return number


def version_of(image: Item | None, conflict: Conflict) -> Version | None:
    """The PUT version an item image carries, or None when it lacks the version attributes."""
    if not image:
        return None
    ts = image.get(conflict.timestamp_attribute)
    region = image.get(conflict.region_attribute)
    if not isinstance(ts, dict) or not isinstance(region, dict) or not isinstance(region.get("S"), str):
        return None
    timestamp = parse_number(ts.get("N"))
    if timestamp is None:
        return None
    return Version(timestamp, PUT, region["S"])


def decode_marker(text: object) -> Version | None:
    """The delete version a marker attribute value carries (see Version.encode)."""
    try:
        ts, op, region = json.loads(text) if isinstance(text, str) else (None, None, None)
    except (ValueError, TypeError):
        return None
    timestamp = parse_number(ts)
    if timestamp is None or op not in OPS or not isinstance(region, str):
        return None
    return Version(timestamp, OPS[op], region)


def being_deleted(image: Item | None, conflict: Conflict) -> bool:
    """Whether replicatord marked this image for a delete that still beats it.

    An application write that updated a marked item (UpdateItem keeps other attributes) with a
    newer version is not being deleted: its marker is stale and the write must be forwarded.
    """
    if not image or conflict.marker_attribute not in image:
        return False
    marker = decode_marker(image[conflict.marker_attribute].get("S"))
    version = version_of(image, conflict)
    return marker is None or version is None or version < marker


def without_marker(image: Item, conflict: Conflict) -> Item:
    if conflict.marker_attribute not in image:
        return image
    return {name: value for name, value in image.items() if name != conflict.marker_attribute}


def delete_version(removed: Item | None, approximate_time: Decimal, region: str, conflict: Conflict) -> Version:
    """Version of an application delete: it beats the version it removed (docs/design.md §4)."""
    removed_version = version_of(removed, conflict)
    timestamp = approximate_time
    if removed_version is not None and removed_version.timestamp > timestamp:
        timestamp = removed_version.timestamp
    return Version(timestamp, DELETE, region)


def decide_apply(local: Version | None, local_exists: bool, incoming: Version) -> bool:
    """Whether an incoming change replaces the local item.

    `local` is the local item's version (None when it has no version attributes: any
    versioned change beats it). A PUT applies iff the item is absent or older; a DELETE
    applies iff the item is present and not newer (a delete of an absent item is a no-op).
    """
    if not local_exists:
        return incoming.op == PUT
    if local is None:
        return True
    return local < incoming


@dataclass(frozen=True)
class WriteCondition:
    expression: str
    names: dict[str, str]
    values: Item


# An item without a usable version (version_of is None): either attribute missing, or of the
# wrong type. Any versioned change beats it.
_UNVERSIONED = ("attribute_not_exists(#ts) OR attribute_not_exists(#rg)"
                " OR NOT attribute_type(#ts, :n) OR NOT attribute_type(#rg, :s)")
_TYPES = {":n": {"S": "N"}, ":s": {"S": "S"}}


def _version_names(conflict: Conflict) -> dict[str, str]:
    return {"#ts": conflict.timestamp_attribute, "#rg": conflict.region_attribute}


def put_condition(keys: Item, incoming: Version, conflict: Conflict) -> WriteCondition:
    """Condition for a replicated PUT: absent, unversioned, older, or same time and lower region."""
    return WriteCondition(
        f"attribute_not_exists(#k) OR {_UNVERSIONED} OR #ts < :ts OR (#ts = :ts AND #rg < :rg)",
        {"#k": next(iter(keys)), **_version_names(conflict)},
        {":ts": {"N": str(incoming.timestamp)}, ":rg": {"S": incoming.region}, **_TYPES},
    )


def stamp_condition(keys: Item, conflict: Conflict) -> WriteCondition:
    """Condition to stamp a version on an item (`missing_version: stamp`): present, unversioned."""
    return WriteCondition(f"attribute_exists(#k) AND ({_UNVERSIONED})",
                          {"#k": next(iter(keys)), **_version_names(conflict)}, dict(_TYPES))


def mark_condition(keys: Item, incoming: Version, conflict: Conflict) -> WriteCondition:
    """Condition to mark an item for a replicated DELETE: present and not newer than the delete.

    Items are PUT versions and DELETE ranks above PUT, so "not newer" is timestamp <= delete's.
    """
    return WriteCondition(
        f"attribute_exists(#k) AND ({_UNVERSIONED} OR #ts <= :ts)",
        {"#k": next(iter(keys)), **_version_names(conflict), "#m": conflict.marker_attribute},
        {":ts": {"N": str(incoming.timestamp)}, ":m": {"S": incoming.encode()}, **_TYPES},
    )


def delete_condition(incoming: Version, conflict: Conflict) -> WriteCondition:
    """Condition to delete an item this daemon marked: the marker is still the delete's, and no
    newer write updated the item since (UpdateItem keeps the marker)."""
    return WriteCondition(
        f"#m = :m AND ({_UNVERSIONED} OR #ts <= :ts)",
        {"#m": conflict.marker_attribute, **_version_names(conflict)},
        {":m": {"S": incoming.encode()}, ":ts": {"N": str(incoming.timestamp)}, **_TYPES},
    )


def unmark_condition(incoming: Version, conflict: Conflict) -> WriteCondition:
    """Condition to remove this delete's marker from an item a newer write kept."""
    return WriteCondition("#m = :m", {"#m": conflict.marker_attribute}, {":m": {"S": incoming.encode()}})
