"""The dead-letter queue: records that cannot be replicated, with the reason. Never a silent drop.

Each record goes to the queue as it arrived: the Kinesis payload (base64) or the DynamoDB stream
record (JSON text). A record too large for one SQS message is split into parts that share a
`letter_id` (`part` 1..`parts`); concatenating the parts' `payload` fields in order gives it back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from replicatord.aws import Aws
from replicatord.errors import ReplicatorError
from replicatord.metrics import Metrics

log = logging.getLogger(__name__)

# SQS's classic message size limit (provision sets it on the queue); the body must fit in it.
MAX_BODY_BYTES = 256 * 1024
MAX_DETAIL_CHARS = 2000
# SendMessageBatch: 10 messages a call, their bodies together within the queue's message size.
BATCH_MESSAGES = 10
# Batch calls of one flood of letters in flight at once.
BATCH_CONCURRENCY = 8


@dataclass(frozen=True)
class Outgoing:
    """One record for the queue, as `DeadLetterQueue.send` takes it."""

    pair: str
    role: str  # forwarder or applier; "pipeline" in the letter, as it always was
    reason: str
    detail: str
    payload: bytes | str
    content: str = "replication_record"


class DeadLetterQueue:
    def __init__(self, aws: Aws, queue_url: str, metrics: Metrics, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.aws = aws
        self.queue_url = queue_url
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def send(
        self, pair: str, role: str, reason: str, detail: str, payload: bytes | str,
        content: str = "replication_record",
    ) -> None:
        """Send one record with its reason (in parts if it must be); raises ReplicatorError if the
        queue did not take it all, and the caller sends it again (parts are idempotent by id)."""
        envelope = self._envelope(Outgoing(pair, role, reason, detail, payload, content))
        for body in bodies(envelope, payload, self.max_body_bytes):
            await self.aws.call("sqs", "send_message", QueueUrl=self.queue_url, MessageBody=body)
        self.metrics.dlq_sent.labels(pair, reason).inc()
        log.warning("%s %s: record sent to the dead-letter queue: %s: %s", role, pair, reason,
                    envelope["detail"])


    def _envelope(self, letter: Outgoing) -> dict[str, Any]:
        return {"reason": letter.reason, "detail": printable(letter.detail)[:MAX_DETAIL_CHARS], "pair": letter.pair,
                "pipeline": letter.role, "region": self.aws.settings.region, "time": time.time(),
                "content": letter.content}

    async def send_many(self, letters: Sequence[Outgoing]) -> list[int]:
        """Send many records in SendMessageBatch calls (BATCH_MESSAGES messages, the queue's size
        limit, BATCH_CONCURRENCY calls at once): a flood of junk costs a tenth of the calls and
        none waits for another. Returns the indexes of the letters a message of which the queue
        did not take (send them again: parts are idempotent by id); [] when all are in."""
        messages = [(index, body) for index, letter in enumerate(letters)
                    for body in bodies(self._envelope(letter), letter.payload, self.max_body_bytes)]
        batches: list[list[tuple[int, str]]] = [[]]
        for index, body in messages:
            batch = batches[-1]
            if len(batch) == BATCH_MESSAGES or sum(len(b) for _, b in batch) + len(body) > self.max_body_bytes:
                batches.append(batch := [])
            batch.append((index, body))
        batches_at_once = asyncio.Semaphore(BATCH_CONCURRENCY)
        failed: set[int] = set()

        async def send(batch: list[tuple[int, str]]) -> None:
            async with batches_at_once:
                failed.update(await self._send_batch(batch))

        await asyncio.gather(*(send(batch) for batch in batches if batch))
        sent = Counter((letters[i].pair, letters[i].reason) for i in range(len(letters)) if i not in failed)
        for (pair, reason), count in sent.items():
            self.metrics.dlq_sent.labels(pair, reason).inc(count)
        if sent:
            log.warning("%d records sent to the dead-letter queue (%s)", sum(sent.values()),
                        ", ".join(f"{pair} {reason}: {n}" for (pair, reason), n in sorted(sent.items())))
        return sorted(failed)

    async def _send_batch(self, batch: list[tuple[int, str]]) -> set[int]:
        """One SendMessageBatch call; the letter indexes of the messages it did not take."""
        try:
            result = await self.aws.call("sqs", "send_message_batch", QueueUrl=self.queue_url, Entries=[
                {"Id": str(n), "MessageBody": body} for n, (_, body) in enumerate(batch)])
        except ReplicatorError as exc:
            self.metrics.errors.labels("dlq", exc.kind).inc()
            log.warning("dead-letter queue: a batch of %d messages was not taken: %s", len(batch), exc)
            return {index for index, _ in batch}
        refused = {int(entry["Id"]) for entry in result.get("Failed", [])}
        if refused:
            self.metrics.errors.labels("dlq", "batch_entry_failed").inc(len(refused))
        return {batch[n][0] for n in refused}


def printable(text: str) -> str:
    """`text` with anything a UTF-8 log or queue cannot take (lone surrogates) escaped."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def bodies(envelope: dict[str, Any], payload: bytes | str, limit: int = MAX_BODY_BYTES) -> list[str]:
    """The message bodies for one record: JSON, ASCII only (SQS takes any of it), each within
    `limit` bytes. Text that fits goes as text; otherwise the bytes (a text's UTF-8) as base64,
    in as many parts as it takes."""
    letter_id = hashlib.sha256(payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass"))
    head = {**envelope, "letter_id": letter_id.hexdigest()[:32]}
    if isinstance(payload, str):
        whole = _body(head, "text", payload, 1, 1)
        if len(whole) <= limit:
            return [whole]
        payload = payload.encode("utf-8", "surrogatepass")
    encoded = base64.b64encode(payload).decode("ascii")
    # Every part carries the same head; base64 needs no JSON escaping, so sizes are exact.
    room = limit - len(_body(head, "base64", "", 999_999, 999_999))
    if room < 1024:
        raise ValueError(f"dead-letter messages of {limit} bytes leave no room for the record")
    chunks = [encoded[i:i + room] for i in range(0, len(encoded), room)] or [""]
    return [_body(head, "base64", chunk, n, len(chunks)) for n, chunk in enumerate(chunks, 1)]


def _body(head: dict[str, Any], encoding: str, payload: str, part: int, parts: int) -> str:
    return json.dumps({**head, "encoding": encoding, "part": part, "parts": parts, "payload": payload})


def stream_record_text(record: dict[str, Any]) -> str:
    """A DynamoDB stream record as JSON text for the dead-letter queue (ASCII: escapes kept)."""
    return json.dumps(record, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
