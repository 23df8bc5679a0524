"""`replicatord dlq list|show|redrive|purge --region R`: the dead-letter queue, for operators.

Messages are read by receiving them with a visibility timeout (SQS has no peek) and, for `list`
and `show`, made visible again at once. A record sent in parts (dlq.py) is shown and redriven as
one letter once all its parts are in. `redrive` puts each letter back through the pipeline it
came from, as a page of one record: the applier's letters (`replication_record`) through the
region's applier (decode, conditional write by version), the forwarder's (`stream_record`)
through the forwarder (plan, put on every peer's stream, tombstones, repairs). A record refused
again goes back to the queue with its new reason; the old messages are deleted either way, so
the queue holds each record once. `purge` deletes, and asks for `--yes`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from replicatord.config import Topology
from replicatord.forwarder import Forwarder
from replicatord.ops.tables import RegionOps, Regions, pick_pairs

VISIBILITY_S = 60  # how long letters are held while a command works on them
EMPTY_RECEIVES = 3  # SQS short polling samples servers: a few empty answers in a row mean empty


@dataclass
class Letter:
    letter_id: str
    envelope: dict[str, Any]
    parts: dict[int, str] = field(default_factory=dict)  # part -> payload text
    handles: list[str] = field(default_factory=list)  # receipt handles of every message seen

    @property
    def complete(self) -> bool:
        return len(self.parts) == int(self.envelope.get("parts", 1))

    def payload(self) -> bytes | str:
        text = "".join(self.parts[n] for n in sorted(self.parts))
        return base64.b64decode(text) if self.envelope.get("encoding") == "base64" else text

    def summary(self) -> dict[str, Any]:
        e = self.envelope
        return {"id": self.letter_id, "reason": e.get("reason"), "pair": e.get("pair"), "pipeline": e.get("pipeline"),
                "time": e.get("time"), "content": e.get("content"), "detail": e.get("detail"),
                "complete": self.complete, "messages": len(self.handles)}

    def describe(self) -> str:
        e = self.envelope
        when = dt.datetime.fromtimestamp(float(e.get("time") or 0), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        detail = str(e.get("detail") or "")
        detail = detail if len(detail) <= 100 else detail[:97] + "..."
        partial = "" if self.complete else f" (parts {len(self.parts)}/{e.get('parts')})"
        where = f"{e.get('reason')}  {e.get('pair')}  {e.get('pipeline')}{partial}"
        return f"{self.letter_id[:12]}  {when}  {where}  {detail}"


class Queue:
    def __init__(self, ops: RegionOps) -> None:
        self.ops = ops
        self.url = ""

    async def open(self) -> None:
        self.url = (await self.ops.dlq()).queue_url

    async def receive_all(self) -> list[Letter]:
        """Every letter in the queue (held for VISIBILITY_S)."""
        letters: dict[str, Letter] = {}
        empty = 0
        while empty < EMPTY_RECEIVES:
            result = await self.ops.aws.call("sqs", "receive_message", QueueUrl=self.url, MaxNumberOfMessages=10,
                                             VisibilityTimeout=VISIBILITY_S, WaitTimeSeconds=0)
            messages = result.get("Messages", [])
            empty = 0 if messages else empty + 1
            for message in messages:
                try:
                    body = json.loads(message["Body"])
                    letter_id = str(body.get("letter_id") or message["MessageId"])
                except (ValueError, TypeError):
                    body, letter_id = {"reason": "unreadable", "detail": message["Body"][:200]}, message["MessageId"]
                letter = letters.setdefault(letter_id, Letter(letter_id, {k: v for k, v in body.items()
                                                                          if k != "payload"}))
                letter.parts[int(body.get("part", 1))] = str(body.get("payload", ""))
                letter.handles.append(message["ReceiptHandle"])
        return sorted(letters.values(), key=lambda letter: float(letter.envelope.get("time") or 0))

    async def release(self, letters: list[Letter]) -> None:
        """Make letters visible again at once (after list or show)."""
        for batch in _batches([h for letter in letters for h in letter.handles], 10):
            await self.ops.aws.call("sqs", "change_message_visibility_batch", QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0} for i, h in enumerate(batch)])

    async def delete(self, letters: list[Letter]) -> None:
        for batch in _batches([h for letter in letters for h in letter.handles], 10):
            await self.ops.aws.call("sqs", "delete_message_batch", QueueUrl=self.url, Entries=[
                {"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(batch)])


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
    applier = await ops.applier(pair)
    arrived = dt.datetime.fromtimestamp(float(letter.envelope.get("time") or time.time()), dt.UTC)
    await applier.process("dlq", [{"Data": data, "SequenceNumber": "dlq", "ApproximateArrivalTimestamp": arrived}])


async def dlq(topology: Topology, region: str, action: str, pair: str | None, reason: str | None,
              letter_id: str | None, yes: bool, profiles: dict[str, str]) -> dict[str, Any]:
    """Do `action`; returns what to report ({"letters": [...]} and counts)."""
    async with Regions(topology, [region], profiles) as all_ops:
        ops = all_ops[region]
        queue = Queue(ops)
        await queue.open()
        letters = await queue.receive_all()
        chosen = [letter for letter in letters if matches(letter, pair, reason, letter_id)]
        others = [letter for letter in letters if letter not in chosen]
        if action in ("list", "show"):
            await queue.release(letters)
            return {"letters": chosen, "total": len(letters)}
        if action == "purge":
            if not yes:
                await queue.release(letters)
                return {"letters": chosen, "total": len(letters), "refused": True}
            await queue.delete(chosen)
            await queue.release(others)
            return {"letters": chosen, "total": len(letters), "purged": len(chosen)}
        # redrive
        await queue.release(others)
        before = _sent(ops)
        done, incomplete = [], []
        for letter in chosen:
            if not letter.complete:
                incomplete.append(letter)
                continue
            await _redrive(topology, ops, letter)
            await queue.delete([letter])
            done.append(letter)
        await queue.release(incomplete)
        again = _sent(ops) - before
        return {"letters": done, "total": len(letters), "redriven": len(done), "dead_lettered_again": again,
                "incomplete": len(incomplete)}


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
        lines.append(f"{len(letters)} letters" + (f" of {result['total']}" if result["total"] != len(letters) else ""))
    elif action == "purge":
        lines.append(f"would purge {len(letters)} letters: run again with --yes" if result.get("refused")
                     else f"purged {result['purged']} letters")
    else:
        lines.append(f"redriven {result['redriven']} letters; {result['dead_lettered_again']} refused again "
                     f"(back in the queue with the new reason); {result['incomplete']} incomplete (parts missing)")
    return "\n".join(lines)


def _shown_payload(letter: Letter) -> str:
    if not letter.complete:
        return "(incomplete: parts missing)"
    payload = letter.payload()
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return json.dumps(json.loads(text), indent=2, ensure_ascii=True)
    except (UnicodeDecodeError, ValueError):
        return base64.b64encode(payload).decode() if isinstance(payload, bytes) else payload
