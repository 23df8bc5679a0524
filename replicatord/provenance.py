"""What a legitimate peer could have sent: the applier's trust boundary.

Whoever holds a peer-writer key can put anything on this region's Kinesis stream. The decoder
checks that a payload is a well-formed record (records.py); `refusal` checks that it is one a
peer's forwarder could have produced, since a forwarder only ever sends its own region's
application changes (forwarder.plan_forward):

- `origin` is a peer of this region in the topology, never this region, and the version's
  region is the origin (a forwarder sends only what was stamped in its own region);
- a PUT's image carries that very version in its timestamp and region attributes, and no
  delete marker (a forwarder strips it; on an item it would hide the item's next delete);
- the key attributes are the table's key schema, names and types (read at startup);
- the version is no further in the future than `conflict.max_future_s`, and the record was
  created at a sane time: a version from the future wins every conflict, for ever.

Each refusal is a reason (the dead letter's and the metric's label) and a detail line.
docs/trust.md has the attacks these stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from replicatord.config import Conflict
from replicatord.conflict import PUT, version_of
from replicatord.records import ReplicationRecord, shown

# A record cannot have been created before this much time before now: Kinesis keeps records a
# year at most, a DynamoDB stream a day; past it, a `created` is forged (and would put decades
# into the latency histogram).
MAX_RECORD_AGE_S = 400 * 24 * 3600.0


@dataclass(frozen=True)
class Provenance:
    """The rules for one pair in one region."""

    region: str
    peers: frozenset[str]
    key_schema: tuple[tuple[str, str], ...]  # (attribute name, type S/N/B), hash key first
    conflict: Conflict

    @classmethod
    def from_table(cls, region: str, peers: Sequence[str], description: Mapping[str, Any],
                   conflict: Conflict) -> Provenance:
        """From DescribeTable's `Table`: its KeySchema and AttributeDefinitions."""
        types = {a["AttributeName"]: a["AttributeType"] for a in description.get("AttributeDefinitions", [])}
        ordered = sorted(description.get("KeySchema", []), key=lambda k: k.get("KeyType") != "HASH")
        schema = tuple((str(k["AttributeName"]), str(types.get(k["AttributeName"], "S"))) for k in ordered)
        return cls(region, frozenset(peers), schema, conflict)


def refusal(record: ReplicationRecord, rules: Provenance, now: float) -> tuple[str, str] | None:
    """(reason, detail) if no peer's forwarder could have sent `record`; None if one could."""
    return (_origin(record, rules) or _keys(record, rules) or _image(record, rules)
            or _times(record, rules, now))


def _origin(record: ReplicationRecord, rules: Provenance) -> tuple[str, str] | None:
    if record.origin == rules.region:
        return "forged_origin", f"claims to come from {rules.region}, this region itself"
    if record.origin not in rules.peers:
        return "forged_origin", f"origin {shown(record.origin)} is not a peer of {rules.region}"
    if record.version.region != record.origin:
        return "forged_origin", (f"version of region {shown(record.version.region)} sent from "
                                 f"{shown(record.origin)}: a peer sends only its own region's changes")
    return None


def _keys(record: ReplicationRecord, rules: Provenance) -> tuple[str, str] | None:
    got = tuple((name, next(iter(value))) for name, value in record.keys.items()
                if isinstance(value, dict) and len(value) == 1)
    if len(got) != len(record.keys) or sorted(got) != sorted(rules.key_schema):
        want = ", ".join(f"{name} ({kind})" for name, kind in rules.key_schema)
        have = ", ".join(f"{shown(name)} ({kind})" for name, kind in got) or "none"
        return "key_schema", f"keys {have} are not the table's key {want}"
    return None


def _image(record: ReplicationRecord, rules: Provenance) -> tuple[str, str] | None:
    if record.op != "PUT" or record.image is None:
        return None
    conflict = rules.conflict
    if conflict.marker_attribute in record.image:
        return "forged_marker", f"the image carries the delete marker {shown(conflict.marker_attribute)}"
    carried = version_of(record.image, conflict)
    expected = record.version._replace(op=PUT)
    if carried != expected:
        return "version_mismatch", (f"the image's version {_shown_version(carried)} is not the record's "
                                    f"{_shown_version(expected)}")
    return None


def _times(record: ReplicationRecord, rules: Provenance, now: float) -> tuple[str, str] | None:
    bound = Decimal(str(now + rules.conflict.max_future_s))
    if record.version.timestamp > bound:
        return "future_version", (f"version timestamp {record.version.timestamp} is more than "
                                  f"conflict.max_future_s ({rules.conflict.max_future_s:g}s) ahead of now")
    created = record.created_s
    if not now - MAX_RECORD_AGE_S <= created <= now + rules.conflict.max_future_s:
        return "bad_created", f"created {created:.0f} is not a time such a record was made"
    return None


def _shown_version(version: Any) -> str:
    return "none" if version is None else f"({version.timestamp}, {version.region})"


def future_beyond_bound(timestamp: Decimal, conflict: Conflict, now: float) -> bool:
    """Whether a version timestamp is further ahead than `conflict.max_future_s` (operator
    commands report such an item instead of spreading it)."""
    return timestamp > Decimal(str(now + conflict.max_future_s))

