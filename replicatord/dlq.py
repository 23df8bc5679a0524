"""The dead-letter queue: records that cannot be replicated, with the reason. Never a silent drop.

Each record goes to the queue as it arrived: the Kinesis payload (base64) or the DynamoDB stream
record (JSON text). A record too large for one SQS message is split into parts that share a
`letter_id` (`part` 1..`parts`); concatenating the parts' `payload` fields in order gives it back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from typing import Any

from replicatord.aws import Aws
from replicatord.metrics import Metrics

log = logging.getLogger(__name__)

# SQS's classic message size limit (provision sets it on the queue); the body must fit in it.
MAX_BODY_BYTES = 256 * 1024
MAX_DETAIL_CHARS = 2000


class DeadLetterQueue:
    def __init__(self, aws: Aws, queue_url: str, metrics: Metrics, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.aws = aws
        self.queue_url = queue_url
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def send(
        self, pair: str, pipeline: str, reason: str, detail: str, payload: bytes | str,
        content: str = "replication_record",
    ) -> None:
        """Send one record with its reason (in parts if it must be); raises ReplicatorError if the
        queue did not take it all, and the caller sends it again (parts are idempotent by id)."""
        envelope = {
            "reason": reason,
            "detail": printable(detail)[:MAX_DETAIL_CHARS],
            "pair": pair,
            "pipeline": pipeline,
            "region": self.aws.settings.region,
            "time": time.time(),
            "content": content,
        }
        for body in bodies(envelope, payload, self.max_body_bytes):
            await self.aws.call("sqs", "send_message", QueueUrl=self.queue_url, MessageBody=body)
        self.metrics.dlq_sent.labels(pair, reason).inc()
        log.warning("%s %s: record sent to the dead-letter queue: %s: %s", pipeline, pair, reason,
                    envelope["detail"])


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
