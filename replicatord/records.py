"""The replication record (docs/design.md §3): the JSON payload on the peer's Kinesis stream.

Keys and images pass through in DynamoDB JSON exactly as the stream gave them: numbers stay
strings; binary is base64 in the payload and bytes again once decoded, as botocore wants it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import reprlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from replicatord.conflict import OP_NAMES, OPS, Item, Version, parse_number

SCHEMA_VERSION = 1

# Kinesis PutRecords limits.
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024

# Decoding bounds, from DynamoDB's own: M and L nest at most 32 levels, an attribute name is at
# most 64 KB. Text fields (pair, region, origin, sequence number) are short in every valid record.
MAX_DEPTH = 32
MAX_ITEM_BYTES = 400 * 1024
MAX_NAME_CHARS = 65535
MAX_FIELD_CHARS = 256
MAX_INT_DIGITS = 20
MAX_EPOCH_S = 10**11

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
    created_s: float  # of the source stream record, epoch seconds


PROBE = "PROBE"


@dataclass(frozen=True)
class Probe:
    """What `replicatord preflight` puts on a peer's stream to show that the daemon may: an
    applier counts it and changes nothing (a record of no item, so nothing to apply)."""

    pair: str
    origin: str
    created_s: float


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


class _Invalid(Exception):
    """A bad attribute value; the path to it is collected while the walk unwinds (so the
    success path builds no strings)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def record_error(self, root: str) -> RecordError:
        return RecordError(f"{root}{''.join(reversed(self.path))}: {self.reason}")


def shown(value: Any) -> str:
    """A bounded, printable rendering of a value from a record, for reasons and logs."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _name(name: str) -> str:
    return name if len(name) <= 60 and name.isprintable() else shown(name)


def _text(value: str) -> str:
    """`value` if it is valid Unicode: JSON escapes can carry lone surrogates, which no UTF-8
    encoder (DynamoDB's, SQS's, ours) takes."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid("not valid Unicode (lone surrogate)") from None
    return value


def _b64(text: Any) -> bytes:
    """Strict base64: the alphabet, padding, and the one canonical spelling of the bytes."""
    if not isinstance(text, str):
        raise _Invalid("binary must be a base64 string")
    if not text.isascii():
        raise _Invalid("invalid base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise _Invalid("invalid base64") from None
    if base64.b64encode(raw) != text.encode("ascii"):
        raise _Invalid("invalid base64 (not canonical)")
    return raw


def _number(text: Any) -> str:
    if parse_number(text) is None:
        raise _Invalid("N must be a number DynamoDB stores, in a string")
    return str(text)


def _set(inner: Any, member: Callable[[Any], Any], key: Callable[[Any], Any] = lambda m: m) -> list[Any]:
    """A DynamoDB set: a non-empty list without duplicates."""
    if not isinstance(inner, list) or not all(isinstance(m, str) for m in inner):
        raise _Invalid("expected a list of strings")
    if not inner:
        raise _Invalid("a set cannot be empty")
    members = [member(m) for m in inner]
    if len({key(m) for m in members}) != len(members):
        raise _Invalid("a set cannot hold duplicates")
    return members


def _value_from_json(value: Any, depth: int) -> Any:
    if not isinstance(value, dict) or len(value) != 1:
        raise _Invalid("not a DynamoDB attribute value")
    (kind, inner), = value.items()
    if kind == "S":
        if not isinstance(inner, str):
            raise _Invalid("S must be a string")
        return {"S": _text(inner)}
    if kind == "N":
        return {"N": _number(inner)}
    if kind == "B":
        return {"B": _b64(inner)}
    if kind == "SS":
        return {"SS": _set(inner, _text)}
    if kind == "NS":
        return {"NS": _set(inner, _number, key=Decimal)}
    if kind == "BS":
        return {"BS": _set(inner, _b64)}
    if kind == "BOOL":
        if not isinstance(inner, bool):
            raise _Invalid("BOOL must be true or false")
        return {"BOOL": inner}
    if kind == "NULL":
        if inner is not True:
            raise _Invalid("NULL must be true")
        return {"NULL": True}
    if kind in ("L", "M") and depth >= MAX_DEPTH:
        raise _Invalid(f"nested deeper than DynamoDB's {MAX_DEPTH} levels")
    if kind == "L":
        if not isinstance(inner, list):
            raise _Invalid("L must be a list")
        values = []
        for i, member in enumerate(inner):
            try:
                values.append(_value_from_json(member, depth + 1))
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise
        return {"L": values}
    if kind == "M":
        return {"M": _map_from_json(inner, depth + 1)}
    raise _Invalid(f"unknown attribute type {shown(kind)}")


def _map_from_json(data: Any, depth: int) -> Item:
    if not isinstance(data, dict):
        raise _Invalid("expected an attribute map")
    item = {}
    for name, value in data.items():
        try:
            if not name or len(name) > MAX_NAME_CHARS or len(_text(name).encode()) > MAX_NAME_CHARS:
                raise _Invalid(f"attribute names are 1 to {MAX_NAME_CHARS} bytes")
            item[name] = _value_from_json(value, depth)
        except _Invalid as exc:
            exc.path.append(f".{_name(name)}")
            raise
    return item


def item_size_floor(item: Item) -> int:
    """A lower bound of an item's size as DynamoDB counts it (docs: "Item sizes and formats"):
    attribute names and strings in UTF-8 bytes, binaries in bytes, a number one byte per two
    significant digits plus one, a boolean or null one byte, a list or map 3 bytes plus one per
    element and its elements. Never above DynamoDB's count, so an item it accepts is never
    refused by this bound."""
    return sum(len(name.encode()) + _value_size_floor(value) for name, value in item.items())


def _number_size_floor(text: str) -> int:
    mantissa = text.lstrip("+-").split("e")[0].split("E")[0].replace(".", "").strip("0")
    return len(mantissa) // 2 + 1


def _value_size_floor(value: dict[str, Any]) -> int:
    (kind, inner), = value.items()
    if kind == "S":
        return len(inner.encode())
    if kind == "B":
        return len(inner)
    if kind == "N":
        return _number_size_floor(inner)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(m.encode()) for m in inner)
    if kind == "BS":
        return sum(len(m) for m in inner)
    if kind == "NS":
        return sum(_number_size_floor(m) for m in inner)
    if kind == "L":
        return 3 + sum(1 + _value_size_floor(v) for v in inner)
    if kind == "M":
        return 3 + sum(1 + len(n.encode()) + _value_size_floor(v) for n, v in inner.items())
    return 0


def item_from_json(data: Any, path: str = "item") -> Item:
    """An attribute map in the record's JSON form as botocore wants it; RecordError naming the
    path of the first bad value."""
    try:
        return _map_from_json(data, 0)
    except _Invalid as exc:
        raise exc.record_error(path) from None


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
        "created": record.created_s,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in doc:
        raise RecordError(f"missing field {name!r}")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RecordError(f"field {name!r} has the wrong type")
    return value


def _text_field(doc: dict[str, Any], name: str) -> str:
    value: str = _field(doc, name, str)
    if not 0 < len(value) <= MAX_FIELD_CHARS:
        raise RecordError(f"field {name!r}: 1 to {MAX_FIELD_CHARS} characters")
    try:
        return _text(value)
    except _Invalid as exc:
        raise RecordError(f"field {name!r}: {exc.reason}") from None


def _json_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:  # Python refuses int() of over 4,300 digits with a ValueError
        raise RecordError(f"not JSON v1: an integer of {len(text)} digits")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RecordError(f"not JSON v1: {shown(text)} is out of range")
    return value


def _json_constant(text: str) -> Any:
    raise RecordError(f"not JSON v1: {text} is not a JSON number")


def encode_probe(probe: Probe) -> bytes:
    doc = {"v": SCHEMA_VERSION, "op": PROBE, "pair": probe.pair, "origin": probe.origin, "created": probe.created_s}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_record(data: bytes) -> ReplicationRecord:
    """Parse and validate a payload; raise RecordError with the reason if it is not one (a
    preflight probe is not one either: `decode_payload` tells it apart).

    Every input either decodes or raises RecordError, in time linear in its size: the size, the
    nesting, numbers, base64 and Unicode are bounded the way Kinesis and DynamoDB bound them.
    """
    decoded = decode_payload(data)
    if isinstance(decoded, Probe):
        raise RecordError("a preflight probe, not a change")
    return decoded


def _created(doc: dict[str, Any]) -> float:
    created = _field(doc, "created", (int, float))
    if not 0 <= created < MAX_EPOCH_S:
        raise RecordError("field 'created': not a time in epoch seconds")
    return float(created)


def decode_payload(data: bytes) -> ReplicationRecord | Probe:
    """A replication record or a preflight probe (decode_record's rules); RecordError if neither."""
    doc = _document(data)
    op = _field(doc, "op", str)
    if op == PROBE:
        return Probe(_text_field(doc, "pair"), _text_field(doc, "origin"), _created(doc))
    if op not in OPS:
        raise RecordError(f"unknown op {shown(op)}")
    keys = item_from_json(_field(doc, "keys", dict), "keys")
    if not keys:
        raise RecordError("keys: empty")
    image = None
    if op == "PUT":
        image = item_from_json(_field(doc, "image", dict), "image")
        # An image is never larger than its JSON, so only a large payload can hold one DynamoDB
        # refuses: refuse it here, before the request is built on the event loop and sent.
        if len(data) > MAX_ITEM_BYTES and (size := item_size_floor(image)) > MAX_ITEM_BYTES:
            raise RecordError(f"image: an item of at least {size} bytes exceeds DynamoDB's {MAX_ITEM_BYTES}")
        for name, value in keys.items():
            if image.get(name) != value:
                raise RecordError(f"image: key attribute {shown(name)} missing or different")
    version = _field(doc, "version", dict)
    ts = parse_number(_field(version, "ts", str))
    if ts is None:
        raise RecordError("version.ts: not a number")
    vop = _field(version, "op", str)
    if vop != op:
        raise RecordError("version.op does not match op")
    created = _created(doc)
    return ReplicationRecord(
        op=op,
        pair=_text_field(doc, "pair"),
        keys=keys,
        image=image,
        version=Version(ts, OPS[vop], _text_field(version, "region")),
        origin=_text_field(doc, "origin"),
        sequence_number=_text_field(doc, "seq"),
        created_s=created,
    )


def _document(data: bytes) -> dict[str, Any]:
    """The payload's JSON object, of schema version 1; RecordError otherwise."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(data)} bytes exceeds Kinesis' {MAX_RECORD_BYTES}")
    try:
        text = data.decode("utf-8")
        doc = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    except RecursionError:
        raise RecordError("not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise RecordError("not a JSON object")
    if type(doc.get("v")) is not int or doc.get("v") != SCHEMA_VERSION:
        raise RecordError(f"unsupported record version {shown(doc.get('v'))}")
    return doc


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
