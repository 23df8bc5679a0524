"""`replicatord dlq list|show|redrive|purge --region R`: the dead-letter queue, for operators.

A queue may hold anything (a flood of junk, forged or garbled messages, half of a multi-part
letter), and any number of messages; the commands work on it a batch at a time with bounded
memory. SQS has no peek: messages are received with a visibility timeout, which is extended
while the command still holds them, and made visible again at once when it is done (list,
show, and what a purge or redrive does not take). `--limit` bounds how many letters a command
looks at (list and show 1,000 by default). A record sent in parts (dlq.py) is one letter once
all its parts are in. `redrive` puts each letter back through the pipeline it came from, as a
page of one record: the applier's letters (`replication_record`) through the region's applier
(decode, the provenance checks, conditional write by version), the forwarder's
(`stream_record`) through the forwarder. A record refused again goes back to the queue with its
new reason; the old messages are deleted either way. `purge` deletes, and asks for `--yes`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from replicatord.config import Pair, Topology
from replicatord.errors import ReplicatorError
from replicatord.forwarder import Forwarder
from replicatord.ops.tables import Progress, RegionOps, Regions, pick_pairs
from replicatord.producer import KinesisProducer, Target
from replicatord.records import Entry
from replicatord.retry import Arrival, RecordRetry
from replicatord.sources import SHIPPER, shipper_role

VISIBILITY_S = 60  # how long letters are held before the keeper extends them
EMPTY_RECEIVES = 3  # SQS short polling samples servers: a few empty answers in a row mean empty
DEFAULT_LIMIT = {"list": 1000, "show": 1000}
MAX_PARTS = 1000  # a part number above this (or not a number) is garbage, not a part
MAX_PARTIAL = 1000  # letters waiting for more parts at once; beyond, the oldest is given up as incomplete


def shown_text(text: object, limit: int = 100) -> str:
    """Text for a terminal: control characters escaped, cut to `limit` characters."""
    value = str(text)
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)
    return escaped if len(escaped) <= limit else escaped[:limit - 3] + "..."


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PARTS else default


@dataclass
class Letter:
    letter_id: str
    envelope: dict[str, Any]
    parts: dict[int, str] = field(default_factory=dict)  # part -> payload text
    handles: list[str] = field(default_factory=list)  # receipt handles of every message seen

    @property
    def expected_parts(self) -> int:
        return _int(self.envelope.get("parts"), 1)

    @property
    def complete(self) -> bool:
        return len(self.parts) >= self.expected_parts

    def payload(self) -> bytes | str:
        text = "".join(self.parts[n] for n in sorted(self.parts))
        if self.envelope.get("encoding") == "base64":
            try:
                return base64.b64decode(text, validate=True)
            except ValueError:
                return text
        return text

    def summary(self) -> dict[str, Any]:
        e = self.envelope
        return {"id": self.letter_id, "reason": e.get("reason"), "pair": e.get("pair"), "pipeline": e.get("pipeline"),
                "time": e.get("time"), "content": e.get("content"), "detail": e.get("detail"),
                "complete": self.complete, "messages": len(self.handles)}

    def describe(self) -> str:
        e = self.envelope
        try:
            when = dt.datetime.fromtimestamp(float(e.get("time") or 0), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (TypeError, ValueError, OverflowError, OSError):
            when = "(no time)"
        partial = "" if self.complete else f" (parts {len(self.parts)}/{self.expected_parts})"
        where = "  ".join(shown_text(e.get(name), 40) for name in ("reason", "pair", "pipeline"))
        return f"{shown_text(self.letter_id, 12)}  {when}  {where}{partial}  {shown_text(e.get('detail') or '')}"


def parse_message(message: dict[str, Any]) -> tuple[str, dict[str, Any], int, str]:
    """(letter id, envelope, part, payload text) of one SQS message, whatever its body holds."""
    body_text = str(message.get("Body", ""))
    try:
        body = json.loads(body_text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return str(message["MessageId"]), {"reason": "unreadable", "detail": body_text[:200]}, 1, body_text
    letter_id = body.get("letter_id")
    if not isinstance(letter_id, str) or not letter_id:
        letter_id = str(message["MessageId"])
    envelope = {k: v for k, v in body.items() if k != "payload"}
    payload = body.get("payload", "")
    return letter_id, envelope, _int(body.get("part"), 1), payload if isinstance(payload, str) else json.dumps(payload)


class Queue:
    """The region's dead-letter queue, a batch of messages at a time. Messages received stay
    held (invisible to others, their visibility extended every VISIBILITY_S / 2) until this
    command deletes or releases them; `close()` releases what is still held."""

    def __init__(self, ops: RegionOps) -> None:
        self.ops = ops
        self.url = ""
        self.held: dict[str, float] = {}  # receipt handle -> when its visibility ends (monotonic)
        self.examined = 0

    async def open(self) -> int:
        """The queue's URL; returns its approximate depth (for progress)."""
        self.url = (await self.ops.dlq()).queue_url
        try:
            attributes = await self.ops.aws.call("sqs", "get_queue_attributes", QueueUrl=self.url,
                                                 AttributeNames=["ApproximateNumberOfMessages"])
            return int(attributes["Attributes"]["ApproximateNumberOfMessages"])
        except (ReplicatorError, KeyError, ValueError):
            return 0

    async def letters(self) -> AsyncIterator[Letter]:
        """Every letter in the queue, complete ones as soon as their last part is in, then the
        incomplete ones; ends after EMPTY_RECEIVES empty receives in a row."""
        partial: dict[str, Letter] = {}
        empty = 0
        while empty < EMPTY_RECEIVES:
            await self.keep()
            result = await self.ops.aws.call("sqs", "receive_message", QueueUrl=self.url, MaxNumberOfMessages=10,
                                             VisibilityTimeout=VISIBILITY_S, WaitTimeSeconds=0)
            messages = result.get("Messages", [])
            empty = 0 if messages else empty + 1
            for message in messages:  # all held before any is yielded: the caller may stop at one
                self.held[message["ReceiptHandle"]] = time.monotonic() + VISIBILITY_S
            for message in messages:
                self.examined += 1
                letter_id, envelope, part, payload = parse_message(message)
                letter = partial.setdefault(letter_id, Letter(letter_id, envelope))
                letter.parts[part] = payload
                letter.handles.append(message["ReceiptHandle"])
                if letter.complete:
                    del partial[letter_id]
                    yield letter
                elif len(partial) > MAX_PARTIAL:
                    yield partial.pop(next(iter(partial)))
        for letter in partial.values():
            yield letter

    async def keep(self) -> None:
        """Extend the visibility of held messages whose timeout is half gone."""
        soon = time.monotonic() + VISIBILITY_S / 2
        due = [handle for handle, until in self.held.items() if until < soon]
        for batch in _batches(due, 10):
            await self._visibility(batch, VISIBILITY_S)
            for handle in batch:
                self.held[handle] = time.monotonic() + VISIBILITY_S

    async def release(self, letters: list[Letter]) -> None:
        """Make letters visible again at once."""
        handles = [h for letter in letters for h in letter.handles if h in self.held]
        for batch in _batches(handles, 10):
            await self._visibility(batch, 0)
            for handle in batch:
                self.held.pop(handle, None)

    async def delete(self, letters: list[Letter]) -> None:
        handles = [h for letter in letters for h in letter.handles]
        for batch in _batches(handles, 10):
            await self.ops.aws.call("sqs", "delete_message_batch", QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(batch)])
            for handle in batch:
                self.held.pop(handle, None)

    async def close(self) -> None:
        """Release everything still held (best effort: it comes back by itself within VISIBILITY_S)."""
        with contextlib.suppress(ReplicatorError):
            for batch in _batches(list(self.held), 10):
                await self._visibility(batch, 0)
        self.held.clear()

    async def _visibility(self, handles: list[str], timeout_s: int) -> None:
        await self.ops.aws.call("sqs", "change_message_visibility_batch", QueueUrl=self.url, Entries=[
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": timeout_s} for i, h in enumerate(handles)])


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def matches(letter: Letter, pair: str | None, reason: str | None, letter_id: str | None) -> bool:
    e = letter.envelope
    return ((pair is None or e.get("pair") == pair) and (reason is None or e.get("reason") == reason)
            and (letter_id is None or letter.letter_id.startswith(letter_id)))


def stream_record_from_text(text: str) -> dict[str, Any]:
    """A DynamoDB stream record from its dead-letter JSON (dlq.stream_record_text): times back to
    datetimes, binary attribute values back to bytes."""
    record: dict[str, Any] = json.loads(text)
    ddb = record.get("dynamodb", {})
    created = ddb.get("ApproximateCreationDateTime")
    if isinstance(created, str):
        ddb["ApproximateCreationDateTime"] = dt.datetime.fromisoformat(created)
    for image in ("Keys", "NewImage", "OldImage"):
        if isinstance(ddb.get(image), dict):
            ddb[image] = {name: _binary(value) for name, value in ddb[image].items()}
    return record


def _binary(value: Any) -> Any:
    if not isinstance(value, dict) or len(value) != 1:
        return value
    (kind, inner), = value.items()
    if kind == "B" and isinstance(inner, str):
        return {"B": base64.b64decode(inner)}
    if kind == "BS" and isinstance(inner, list):
        return {"BS": [base64.b64decode(b) for b in inner]}
    if kind == "L" and isinstance(inner, list):
        return {"L": [_binary(v) for v in inner]}
    if kind == "M" and isinstance(inner, dict):
        return {"M": {k: _binary(v) for k, v in inner.items()}}
    return value


def redrivable(topology: Topology, letter: Letter) -> bool:
    """A letter of a pair of the topology (a forged or garbled one is left in the queue)."""
    return letter.envelope.get("content") == "preflight" or any(
        p.name == letter.envelope.get("pair") for p in topology.pairs)


async def _redrive(topology: Topology, ops: RegionOps, letter: Letter) -> None:
    """One letter, as a page of one record, through the pipeline it came from."""
    if letter.envelope.get("content") == "preflight":
        return  # a probe of `replicatord preflight`: nothing to redrive, it is deleted
    (pair,) = pick_pairs(topology, str(letter.envelope.get("pair")))
    payload = letter.payload()
    if letter.envelope.get("content") == "stream_record":
        text = payload.decode("utf-8", "surrogatepass") if isinstance(payload, bytes) else payload
        record = stream_record_from_text(text)
        peers = {peer: pair.streams[peer] for peer in topology.regions if peer != ops.region}
        for peer in peers:
            if peer not in ops.aws.peers:
                await ops.aws.open_peer(peer)
        forwarder = Forwarder(ops.aws, pair.name, peers, ops.tombstones(), topology.conflict, topology.tuning,
                              await ops.dlq(), await ops.applier(pair), ops.metrics, ops.stop)
        await forwarder.process("dlq", [record])
        return
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    role, _, peer = str(letter.envelope.get("pipeline")).partition(":")
    if role == SHIPPER and peer in pair.streams and peer != ops.region:
        await _ship(ops, pair, peer, data, letter)
        return
    applier = await ops.applier(pair)
    arrived = dt.datetime.fromtimestamp(float(letter.envelope.get("time") or time.time()), dt.UTC)
    await applier.process("dlq", [{"Data": data, "SequenceNumber": "dlq", "ApproximateArrivalTimestamp": arrived}])


async def _ship(ops: RegionOps, pair: Pair, peer: str, data: bytes, letter: Letter) -> None:
    """A letter of an outbox's shipper: the record, as it was, on the peer's stream."""
    if peer not in ops.aws.peers:
        await ops.aws.open_peer(peer)
    retry = RecordRetry(pair.name, shipper_role(peer), await ops.dlq(), ops.topology.tuning, ops.metrics, ops.stop)
    producer = KinesisProducer(ops.aws, pair.name, retry, ops.topology.tuning, ops.metrics, ops.stop)
    # Any partition key will do: every apply is conditional on the version, whatever the order.
    entry = Entry(data, hashlib.sha256(data).hexdigest())
    await producer.put(Target(peer, pair.streams[peer]), [(entry, Arrival(data, time.time()))])


async def dlq(topology: Topology, region: str, action: str, pair: str | None, reason: str | None,
              letter_id: str | None, yes: bool, profiles: dict[str, str], limit: int | None = None) -> dict[str, Any]:
    """Do `action` on the letters that match, at most `limit` of them (default: DEFAULT_LIMIT for
    list and show, every letter otherwise); returns what to report ({"letters": [...]} and counts)."""
    limit = limit if limit is not None else DEFAULT_LIMIT.get(action)
    async with Regions(topology, [region], profiles) as all_ops:
        ops = all_ops[region]
        queue = Queue(ops)
        depth = await queue.open()
        progress = Progress(f"dlq {action}", depth or None) if sys.stderr.isatty() else None
        chosen: list[Letter] = []
        counts = {"total": 0, "purged": 0, "redriven": 0, "incomplete": 0, "skipped": 0}
        redriven: set[str] = set()  # a letter refused again comes back with the same id: not redriven twice
        before = _sent(ops)
        try:
            async for letter in queue.letters():
                counts["total"] += 1
                if progress is not None:
                    progress.add(len(letter.handles))
                if not matches(letter, pair, reason, letter_id) or letter.letter_id in redriven:
                    continue  # held until the end, then released: not received again meanwhile
                if limit is not None and len(chosen) >= limit:
                    break
                if action in ("list", "show") or (action == "purge" and not yes):
                    if action != "show":
                        letter.parts = dict.fromkeys(letter.parts, "")  # a summary needs no payload
                    chosen.append(letter)
                elif action == "purge":
                    await queue.delete([letter])
                    counts["purged"] += 1
                elif not letter.complete:
                    counts["incomplete"] += 1
                elif not redrivable(topology, letter):
                    counts["skipped"] += 1
                else:
                    await _redrive(topology, ops, letter)
                    await queue.delete([letter])
                    redriven.add(letter.letter_id)
                    counts["redriven"] += 1
        finally:
            await queue.close()
            if progress is not None:
                progress.close()
        counts["examined"], counts["dead_lettered_again"] = queue.examined, _sent(ops) - before
        return _summary(action, yes, chosen, counts, limit)


def _summary(action: str, yes: bool, chosen: list[Letter], counts: dict[str, int], limit: int | None) -> dict[str, Any]:
    result: dict[str, Any] = {"letters": chosen, "total": counts["total"], "examined": counts["examined"]}
    if action == "purge":
        result.update({"refused": True} if not yes else {"purged": counts["purged"]})
    if action == "redrive":
        result.update(redriven=counts["redriven"], dead_lettered_again=counts["dead_lettered_again"],
                      incomplete=counts["incomplete"], skipped=counts["skipped"])
    if limit is not None and len(chosen) >= limit:
        result["limited"] = limit
    return result


def _sent(ops: RegionOps) -> int:
    """Dead letters this command has sent (records refused again during a redrive)."""
    total = 0.0
    for metric in ops.metrics.dlq_sent.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return int(total)


def render(action: str, result: dict[str, Any], as_json: bool, show_payload: bool) -> str:
    letters: list[Letter] = result["letters"]
    if as_json:
        out = {k: v for k, v in result.items() if k != "letters"}
        out["letters"] = [{**letter.summary(), **({"payload": _shown_payload(letter)} if show_payload else {})}
                          for letter in letters]
        return json.dumps(out, indent=2)
    if action == "show":
        return "\n\n".join(f"{letter.describe()}\n{json.dumps(letter.envelope, indent=2)}\npayload:\n"
                           f"{_shown_payload(letter)}" for letter in letters) or "no such letter"
    lines = [letter.describe() for letter in letters]
    if action == "list":
        lines.append(f"{len(letters)} letters" + (f" of {result['total']} looked at" if result["total"] != len(letters)
                                                   else "")
                     + (f" (--limit {result['limited']} reached: there may be more)" if result.get("limited") else ""))
    elif action == "purge":
        lines.append(f"would purge {len(letters)} letters: run again with --yes" if result.get("refused")
                     else f"purged {result['purged']} letters")
    else:
        lines.append(f"redriven {result['redriven']} letters; {result['dead_lettered_again']} refused again "
                     f"(back in the queue with the new reason); {result['incomplete']} incomplete (parts missing); "
                     f"{result['skipped']} of no pair of the topology (left in the queue)")
    return "\n".join(lines)


def _shown_payload(letter: Letter) -> str:
    if not letter.complete:
        return "(incomplete: parts missing)"
    payload = letter.payload()
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return json.dumps(json.loads(text), indent=2, ensure_ascii=True)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return base64.b64encode(payload).decode() if isinstance(payload, bytes) else shown_text(payload, 1 << 20)
