"""`replicatord dlq` on a queue of any size and any content (issue 17): garbled, forged and
half letters never crash it; thousands of letters are worked through a batch at a time; what a
command holds stays invisible to others while it works, and is visible again when it is done."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from replicatord.config import load_topology
from replicatord.local.aws_behaviour import TEST_BEHAVIOUR
from replicatord.local.world import REGIONS, wait_for
from replicatord.ops import dead_letters
from replicatord.ops.dead_letters import Queue, dlq, render
from tests.conftest import LocalRegions

pytestmark = pytest.mark.integration


@pytest.fixture
def behaviour() -> dict[str, Any]:
    """No injected 5xx: one after a ReceiveMessage took effect hides its messages for the
    visibility timeout (as on AWS), and these tests count every letter."""
    return {**TEST_BEHAVIOUR, "throttle_rate": 0.0, "error_rate": 0.0, "error_after_rate": 0.0}

CN, SG = REGIONS
GARBAGE = [
    "not json at all",
    "[1, 2, 3]",
    json.dumps({"letter_id": 5, "part": "x", "parts": "y", "reason": "odd"}),
    json.dumps({"letter_id": "half", "part": 2, "parts": 3, "reason": "bad_record", "pair": "user",
                "encoding": "base64", "payload": "e30="}),
    json.dumps({"letter_id": "ctl", "reason": "bad_record\x1b[31m", "pair": "user", "detail": "red\x1b[0m\x07 bell",
                "part": 1, "parts": 1, "encoding": "text", "payload": "\x1b]0;title\x07"}),
    json.dumps({"letter_id": "nopair", "reason": "bad_record", "pair": "no-such-pair", "part": 1, "parts": 1,
                "encoding": "text", "payload": "{}"}),
    json.dumps({"letter_id": "bigpart", "part": 10**9, "parts": 10**9, "reason": "x", "payload": "y"}),
]


def queue_url(regions: LocalRegions, region: str) -> str:
    return str(regions.client("sqs", region).get_queue_url(QueueName="ddbreplicatorcn")["QueueUrl"])


def depth(regions: LocalRegions, url: str) -> int:
    """The messages visible: nothing a command held is left invisible."""
    attributes = regions.client("sqs", CN).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attributes["Attributes"]["ApproximateNumberOfMessages"])


async def test_garbled_forged_and_half_letters_never_crash_the_tools(regions: LocalRegions) -> None:
    config = regions.provision()
    topology = load_topology(config)
    sqs = regions.client("sqs", CN)
    url = queue_url(regions, CN)
    for body in GARBAGE:
        sqs.send_message(QueueUrl=url, MessageBody=body)

    listed = await dlq(topology, CN, "list", None, None, None, False, {})
    assert listed["total"] == len(GARBAGE)
    text = render("list", listed, False, False)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b" in text, text
    json.loads(render("list", listed, True, False))  # the JSON form too
    shown = await dlq(topology, CN, "show", None, None, "half", False, {})
    assert "(incomplete: parts missing)" in render("show", shown, False, True)
    shown = await dlq(topology, CN, "show", None, None, "ctl", False, {})
    assert "\x1b" not in render("show", shown, False, True)
    # Nothing is held: every message is visible again at once (SQS's count comes a little later).
    wait_for(lambda: int(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])[
        "Attributes"]["ApproximateNumberOfMessages"]) == len(GARBAGE), 10, "every letter to be visible again")

    redriven = await dlq(topology, CN, "redrive", None, None, None, False, {})
    assert redriven["skipped"] >= 3  # no pair of the topology: left in the queue
    purged = await dlq(topology, CN, "purge", None, None, None, True, {})
    assert purged["purged"] + redriven["redriven"] >= 1
    assert (await dlq(topology, CN, "list", None, None, None, False, {}))["total"] == 0


async def test_thousands_of_letters_are_listed_with_a_limit_and_purged_a_batch_at_a_time(regions: LocalRegions) -> None:
    config = regions.provision()
    topology = load_topology(config)
    sqs = regions.client("sqs", CN)
    url = queue_url(regions, CN)
    letters = 3000
    for start in range(0, letters, 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": json.dumps({
            "letter_id": f"l{start + i}", "reason": "bad_record" if (start + i) % 3 else "rejected", "pair": "user",
            "part": 1, "parts": 1, "encoding": "text", "payload": "{}", "time": time.time()})} for i in range(10)])

    limited = await dlq(topology, CN, "list", None, None, None, False, {}, limit=100)
    assert len(limited["letters"]) == 100 and limited["limited"] == 100
    assert "--limit 100 reached" in render("list", limited, False, False)
    rejected = await dlq(topology, CN, "list", None, "rejected", None, False, {}, limit=5000)
    assert len(rejected["letters"]) == letters // 3 and rejected["total"] == letters
    wait_for(lambda: depth(regions, url) == letters, 10, "every letter to be visible again")
    purged = await dlq(topology, CN, "purge", None, "rejected", None, True, {})
    assert purged["purged"] == letters // 3
    wait_for(lambda: depth(regions, url) == letters - letters // 3, 10, "the purged letters to be gone")
    print(f"\n{letters} letters: listed with --limit 100, filtered ({letters // 3} rejected), purged by reason")


class Recording:
    """RegionOps with a client that records the visibility changes asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.aws = SimpleNamespace(call=self.call)

    async def call(self, service: str, operation: str, **kwargs: Any) -> Any:
        self.calls.append((operation, kwargs))
        return {}


async def test_held_messages_are_kept_invisible_and_released_at_the_end() -> None:
    ops = Recording()
    queue = Queue(ops)  # type: ignore[arg-type]
    now = time.monotonic()
    queue.held = {"old": now + 5, "fresh": now + dead_letters.VISIBILITY_S}
    await queue.keep()
    (operation, kwargs), = ops.calls
    assert operation == "change_message_visibility_batch"
    assert [(e["ReceiptHandle"], e["VisibilityTimeout"]) for e in kwargs["Entries"]] == [
        ("old", dead_letters.VISIBILITY_S)]
    await queue.close()
    assert sorted(e["ReceiptHandle"] for e in ops.calls[-1][1]["Entries"]) == ["fresh", "old"]
    assert all(e["VisibilityTimeout"] == 0 for e in ops.calls[-1][1]["Entries"]) and not queue.held

