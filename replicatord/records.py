"""The replication record (DESIGN.md §3): the JSON payload on the peer's Kinesis stream.

Keys and images pass through in DynamoDB JSON exactly as the stream gave them: numbers stay
strings; binary is base64 in the payload and bytes again once decoded, as botocore wants it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from replicatord.conflict import OP_NAMES, OPS, Item, Version, parse_timestamp

SCHEMA_VERSION = 1

# Kinesis PutRecords limits.
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024

Op = Literal["PUT", "DELETE"]


class RecordError(ValueError):
    """A payload that is not a valid replication record; the message is the reason."""


@dataclass(frozen=True)
class ReplicationRecord:
    op: Op
    pair: str
    keys: Item
    image: Item | None  # the new image for PUT, None for DELETE
    version: Version
    origin: str  # region where the application made the change
    sequence_number: str  # of the source DynamoDB stream record
    approximate_creation_time: float  # of the source stream record, epoch seconds


# --- DynamoDB JSON <-> plain JSON ---------------------------------------------------------

_SCALAR_STR = ("S", "N")


def _value_to_json(value: Any, path: str) -> Any:
    if not isinstance(value, dict) or len(value) != 1:
        raise RecordError(f"{path}: not a DynamoDB attribute value")
    (kind, inner), = value.items()
    if kind in _SCALAR_STR:
        return {kind: inner}
    if kind == "B":
        return {"B": base64.b64encode(inner).decode("ascii")}
    if kind in ("SS", "NS"):
        return {kind: list(inner)}
    if kind == "BS":
        return {"BS": [base64.b64encode(b).decode("ascii") for b in inner]}
    if kind in ("BOOL", "NULL"):
        return {kind: inner}
    if kind == "L":
        return {"L": [_value_to_json(v, f"{path}[{i}]") for i, v in enumerate(inner)]}
    if kind == "M":
        return {"M": item_to_json(inner, path)}
    raise RecordError(f"{path}: unknown attribute type {kind!r}")


def item_to_json(item: Item, path: str = "item") -> dict[str, Any]:
    return {name: _value_to_json(value, f"{path}.{name}") for name, value in item.items()}


def _b64(text: Any, path: str) -> bytes:
    if not isinstance(text, str):
        raise RecordError(f"{path}: binary must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise RecordError(f"{path}: invalid base64") from None


def _str_list(inner: Any, path: str) -> list[str]:
    if not isinstance(inner, list) or not all(isinstance(s, str) for s in inner):
        raise RecordError(f"{path}: expected a list of strings")
    return inner


def _value_from_json(value: Any, path: str) -> Any:
    if not isinstance(value, dict) or len(value) != 1:
        raise RecordError(f"{path}: not a DynamoDB attribute value")
    (kind, inner), = value.items()
    if kind == "S":
        if not isinstance(inner, str):
            raise RecordError(f"{path}: S must be a string")
        return {"S": inner}
    if kind == "N":
        if parse_timestamp(inner) is None:
            raise RecordError(f"{path}: N must be a number in a string")
        return {"N": inner}
    if kind == "B":
        return {"B": _b64(inner, path)}
    if kind == "SS":
        return {kind: _str_list(inner, path)}
    if kind == "NS":
        numbers = _str_list(inner, path)
        if any(parse_timestamp(n) is None for n in numbers):
            raise RecordError(f"{path}: NS members must be numbers in strings")
        return {kind: numbers}
    if kind == "BS":
        return {"BS": [_b64(b, path) for b in _str_list(inner, path)]}
    if kind == "BOOL":
        if not isinstance(inner, bool):
            raise RecordError(f"{path}: BOOL must be true or false")
        return {"BOOL": inner}
    if kind == "NULL":
        if inner is not True:
            raise RecordError(f"{path}: NULL must be true")
        return {"NULL": True}
    if kind == "L":
        if not isinstance(inner, list):
            raise RecordError(f"{path}: L must be a list")
        return {"L": [_value_from_json(v, f"{path}[{i}]") for i, v in enumerate(inner)]}
    if kind == "M":
        return {"M": item_from_json(inner, path)}
    raise RecordError(f"{path}: unknown attribute type {kind!r}")


def item_from_json(data: Any, path: str = "item") -> Item:
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected an attribute map")
    return {str(name): _value_from_json(value, f"{path}.{name}") for name, value in data.items()}


# --- records ------------------------------------------------------------------------------


def encode_record(record: ReplicationRecord) -> bytes:
    doc = {
        "v": SCHEMA_VERSION,
        "op": record.op,
        "pair": record.pair,
        "keys": item_to_json(record.keys, "keys"),
        "image": None if record.image is None else item_to_json(record.image, "image"),
        "version": {
            "ts": str(record.version.timestamp),
            "op": OP_NAMES[record.version.op],
            "region": record.version.region,
        },
        "origin": record.origin,
        "seq": record.sequence_number,
        "created": record.approximate_creation_time,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in doc:
        raise RecordError(f"missing field {name!r}")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RecordError(f"field {name!r} has the wrong type")
    return value


def decode_record(data: bytes) -> ReplicationRecord:
    """Parse and validate a payload; raise RecordError with the reason if it is not one."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    except RecursionError:
        raise RecordError("not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise RecordError("not a JSON object")
    if type(doc.get("v")) is not int or doc.get("v") != SCHEMA_VERSION:
        raise RecordError(f"unsupported record version {doc.get('v')!r}")
    op = _field(doc, "op", str)
    if op not in OPS:
        raise RecordError(f"unknown op {op!r}")
    keys = item_from_json(_field(doc, "keys", dict), "keys")
    if not keys:
        raise RecordError("keys: empty")
    image = None
    if op == "PUT":
        image = item_from_json(_field(doc, "image", dict), "image")
        for name, value in keys.items():
            if image.get(name) != value:
                raise RecordError(f"image: key attribute {name!r} missing or different")
    version = _field(doc, "version", dict)
    ts = parse_timestamp(_field(version, "ts", str))
    if ts is None:
        raise RecordError("version.ts: not a number")
    vop = _field(version, "op", str)
    if vop != op:
        raise RecordError("version.op does not match op")
    created = _field(doc, "created", (int, float))
    return ReplicationRecord(
        op=op,
        pair=_field(doc, "pair", str),
        keys=keys,
        image=image,
        version=Version(ts, OPS[vop], _field(version, "region", str)),
        origin=_field(doc, "origin", str),
        sequence_number=_field(doc, "seq", str),
        approximate_creation_time=float(created),
    )


def partition_key(keys: Item) -> str:
    """Canonical, bounded encoding of an item's key: every change of one item hits one shard."""
    canonical = json.dumps(item_to_json(keys, "keys"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def creation_seconds(value: Any) -> Decimal:
    """ApproximateCreationDateTime (a datetime from botocore, or epoch seconds) as Decimal."""
    if hasattr(value, "timestamp"):
        return Decimal(str(value.timestamp()))
    return Decimal(str(value))


# --- batching within Kinesis limits -------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    data: bytes
    partition_key: str

    @property
    def size(self) -> int:
        return len(self.data) + len(self.partition_key.encode())


def plan_batches(
    entries: Iterable[Entry],
    max_records: int = MAX_BATCH_RECORDS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[Entry]]:
    """Split entries, in order, into PutRecords batches within the count and size limits.

    Entries larger than MAX_RECORD_BYTES must be filtered out before (see `oversized`).
    """
    batch: list[Entry] = []
    size = 0
    for entry in entries:
        if batch and (len(batch) == max_records or size + entry.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        yield batch


def oversized(entry: Entry) -> bool:
    return entry.size > MAX_RECORD_BYTES


def same_key_runs(records: Sequence[tuple[str, Any]]) -> dict[str, list[Any]]:
    """Group (partition key, record) pairs by key, keeping each key's records in order."""
    groups: dict[str, list[Any]] = {}
    for key, record in records:
        groups.setdefault(key, []).append(record)
    return groups
