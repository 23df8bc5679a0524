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

# SQS takes 256 KiB per message; keep room for the envelope.
MAX_PAYLOAD_CHARS = 200_000


class DeadLetterQueue:
    def __init__(self, aws: Aws, queue_url: str, metrics: Metrics) -> None:
        self.aws = aws
        self.queue_url = queue_url
        self.metrics = metrics

    async def send(self, pair: str, pipeline: str, reason: str, detail: str, payload: bytes | str) -> None:
        """Send one record with its reason; raises ReplicatorError so the page is retried."""
        text = payload if isinstance(payload, str) else base64.b64encode(payload).decode("ascii")
        body = {
            "reason": reason,
            "detail": detail,
            "pair": pair,
            "pipeline": pipeline,
            "region": self.aws.settings.region,
            "time": time.time(),
            "encoding": "text" if isinstance(payload, str) else "base64",
            "payload": text[:MAX_PAYLOAD_CHARS],
            "truncated": len(text) > MAX_PAYLOAD_CHARS,
        }
        await self.aws.call("sqs", "send_message", QueueUrl=self.queue_url, MessageBody=json.dumps(body))
        self.metrics.dlq_sent.labels(pair, reason).inc()
        log.warning("%s %s: record sent to the dead-letter queue: %s: %s", pipeline, pair, reason, detail)


def stream_record_text(record: dict[str, Any]) -> str:
    """A DynamoDB stream record as JSON text for the dead-letter queue."""
    return json.dumps(record, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
