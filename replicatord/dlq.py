"""The dead-letter queue: records that cannot be replicated, with the reason. Never a silent drop."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from replicatord.aws import Aws
from replicatord.metrics import Metrics

log = logging.getLogger(__name__)

# SQS's classic message size limit (provision sets it on the queue); the body must fit in it.
MAX_BODY_BYTES = 256 * 1024


class DeadLetterQueue:
    def __init__(self, aws: Aws, queue_url: str, metrics: Metrics) -> None:
        self.aws = aws
        self.queue_url = queue_url
        self.metrics = metrics

    async def send(self, pair: str, pipeline: str, reason: str, detail: str, payload: bytes | str) -> None:
        """Send one record with its reason; raises ReplicatorError so the page is retried."""
        text = payload if isinstance(payload, str) else base64.b64encode(payload).decode("ascii")
        envelope = {
            "reason": reason,
            "detail": detail[:2000],
            "pair": pair,
            "pipeline": pipeline,
            "region": self.aws.settings.region,
            "time": time.time(),
            "encoding": "text" if isinstance(payload, str) else "base64",
        }
        await self.aws.call("sqs", "send_message", QueueUrl=self.queue_url, MessageBody=fit_body(envelope, text))
        self.metrics.dlq_sent.labels(pair, reason).inc()
        log.warning("%s %s: record sent to the dead-letter queue: %s: %s", pipeline, pair, reason, detail)


def fit_body(envelope: dict[str, Any], payload: str, limit: int = MAX_BODY_BYTES) -> str:
    """The message body with as much of the payload as fits in `limit` bytes once encoded."""

    def body(keep: int) -> str:
        return json.dumps({**envelope, "payload": payload[:keep], "truncated": keep < len(payload)})

    if len(body(len(payload)).encode()) <= limit:
        return body(len(payload))
    # JSON escaping makes the cost of a character vary (1 to 12 bytes): search for the longest prefix.
    low, high = 0, len(payload)
    while low < high:
        middle = (low + high + 1) // 2
        if len(body(middle).encode()) <= limit:
            low = middle
        else:
            high = middle - 1
    return body(low)


def stream_record_text(record: dict[str, Any]) -> str:
    """A DynamoDB stream record as JSON text for the dead-letter queue."""
    return json.dumps(record, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
