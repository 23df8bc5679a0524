"""The per-peer mode machine of store and forward (outbox.next_mode): every transition."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from replicatord.config import Topology
from replicatord.dlq import DeadLetterQueue
from replicatord.errors import classify
from replicatord.forwarder import Forwarder
from replicatord.metrics import Metrics
from replicatord.ops import dead_letters, status
from replicatord.ops.dead_letters import Letter
from replicatord.outbox import Happened, Mode, PeerState, Route, next_mode
from replicatord.records import encode_record
from replicatord.shipper import Shipper
from replicatord.sources import KinesisSource, shipper_role
from replicatord.tombstones import TombstoneTable
from tests.conftest import replication_put
from tests.unit.test_isolation import CN, CONFLICT, NOW, SG, TUNING, FakeAws, Fault, Repairs, stream_record

AFTER = 30.0
D, V, R = Mode.DIRECT, Mode.DIVERTED, Mode.DRAINING
H = Happened

CASES = [
    # (state before, what happened, now, state after)
    (PeerState(D), H.PUT_OK, 100, PeerState(D)),
    (PeerState(D), H.REACHABLE, 100, PeerState(D)),
    (PeerState(D, 90), H.PUT_OK, 100, PeerState(D)),  # an answer ends the failing spell
    (PeerState(D, 90), H.REACHABLE, 100, PeerState(D)),
    (PeerState(D), H.PUT_FAILED, 100, PeerState(D, 100)),  # the spell starts
    (PeerState(D, 100), H.PUT_FAILED, 129.9, PeerState(D, 100)),  # within outbox_after_s: keep trying
    (PeerState(D, 100), H.PUT_FAILED, 130, PeerState(V)),  # failing for outbox_after_s: divert
    (PeerState(D), H.UNREACHABLE, 100, PeerState(V)),  # known unreachable: divert at once
    (PeerState(D, 95), H.UNREACHABLE, 100, PeerState(V)),
    (PeerState(D), H.DRAINED, 100, PeerState(D)),
    (PeerState(D), H.PAUSED, 100, PeerState(V, None, True)),
    (PeerState(D), H.RESUMED, 100, PeerState(D)),
    (PeerState(V), H.PUT_FAILED, 100, PeerState(V)),
    (PeerState(V), H.UNREACHABLE, 100, PeerState(V)),
    (PeerState(V), H.DRAINED, 100, PeerState(V)),  # records keep coming to the outbox
    (PeerState(V), H.REACHABLE, 100, PeerState(R)),  # the peer answers: new records go direct
    (PeerState(V), H.PUT_OK, 100, PeerState(R)),  # the shipper's put was accepted
    (PeerState(V, None, True), H.REACHABLE, 100, PeerState(V, None, True)),  # paused: everything waits
    (PeerState(V, None, True), H.PUT_OK, 100, PeerState(V, None, True)),
    (PeerState(V, None, True), H.RESUMED, 100, PeerState(V)),  # resumed: ships once the peer answers
    (PeerState(V), H.PAUSED, 100, PeerState(V, None, True)),
    (PeerState(R), H.PUT_OK, 100, PeerState(R)),
    (PeerState(R), H.REACHABLE, 100, PeerState(R)),
    (PeerState(R), H.PUT_FAILED, 100, PeerState(V)),  # just back and failing again: no grace period
    (PeerState(R), H.UNREACHABLE, 100, PeerState(V)),
    (PeerState(R), H.DRAINED, 100, PeerState(D)),
    (PeerState(R), H.PAUSED, 100, PeerState(V, None, True)),
    (PeerState(R), H.RESUMED, 100, PeerState(R)),
]


@pytest.mark.parametrize(("before", "happened", "now", "after"), CASES,
                         ids=[f"{b.mode.value}{'-failing' if b.failing_since else ''}"
                              f"{'-paused' if b.paused else ''}-{h.name}-{n}" for b, h, n, _ in CASES])
def test_next_mode(before: PeerState, happened: Happened, now: float, after: PeerState) -> None:
    assert next_mode(before, happened, now, AFTER) == after


def test_every_mode_and_happening_is_in_the_table() -> None:
    seen = {(before.mode, happened) for before, happened, _, _ in CASES}
    assert seen == {(mode, happened) for mode in Mode for happened in Happened}


def test_a_route_goes_round_the_whole_cycle() -> None:
    route = Route("user", "ap-southeast-1", AFTER)
    assert route.note(H.PUT_FAILED, 0) is D
    assert route.note(H.PUT_FAILED, 31) is V
    assert route.diverted()
    assert route.note(H.REACHABLE, 40) is R
    assert route.note(H.DRAINED, 41) is D
    assert route.changed_at == 41


# --- the forwarder and the shipper at the client seam ------------------------------------------

QUICK = TUNING.model_copy(update={"outbox_after_s": 0.02})
NX = "cn-northwest-1"


def diverting_forwarder(aws: FakeAws, routes: dict[str, Route]) -> Forwarder:
    metrics = Metrics()
    aws.local = {"kinesis": "local kinesis"}  # type: ignore[attr-defined]
    aws.peers = {peer: f"client of {peer}" for peer in routes}
    return Forwarder(aws, "user", {p: f"stream-{p}" for p in routes},  # type: ignore[arg-type]
                     TombstoneTable(aws, "tombs", 3600), CONFLICT, QUICK,  # type: ignore[arg-type]
                     DeadLetterQueue(aws, "queue", metrics), Repairs(), metrics,  # type: ignore[arg-type]
                     asyncio.Event(), {p: (route, f"outbox-{p}") for p, route in routes.items()})


def puts(aws: FakeAws, accepted: bool = True) -> list[tuple[str, list[str]]]:
    """(stream, keys) of each PutRecords call (accepted ones only, or every attempt)."""
    return [(kw["StreamName"], [json.loads(r["Data"])["keys"]["PK"]["S"] for r in kw["Records"]])
            for op, kw in (aws.accepted if accepted else aws.calls) if op == "put_records"]


def down(peer_stream: str) -> Fault:
    """Every put on `peer_stream` times out (a black-holed border)."""
    return lambda op, kw: classify(TimeoutError()) if op == "put_records" and kw["StreamName"] == peer_stream \
        else None


async def test_a_diverted_peer_gets_the_page_in_its_outbox_and_the_page_completes() -> None:
    route = Route("user", CN, QUICK.outbox_after_s)
    route.note(H.UNREACHABLE)
    aws = FakeAws(faults=[down(f"stream-{CN}")])
    await diverting_forwarder(aws, {CN: route}).process("shard", [stream_record("a"), stream_record("b", seq=2)])
    assert puts(aws, accepted=False) == [(f"outbox-{CN}", ["a", "b"])]  # not even tried on the peer


async def test_puts_failing_for_outbox_after_s_divert_what_the_peer_has_not_taken() -> None:
    route = Route("user", CN, QUICK.outbox_after_s)
    aws = FakeAws(faults=[down(f"stream-{CN}")])
    async with asyncio.timeout(10):
        await diverting_forwarder(aws, {CN: route}).process("shard", [stream_record("a")])
    tried = puts(aws, accepted=False)
    assert len(tried) >= 3 and {s for s, _ in tried[:-1]} == {f"stream-{CN}"}  # retried while within the grace
    assert puts(aws) == [(f"outbox-{CN}", ["a"])] and route.mode is V


async def test_one_peer_down_holds_up_no_other_peer() -> None:
    """The page completes for the healthy peer at once, and for the silent one through its outbox."""
    routes = {CN: Route("user", CN, QUICK.outbox_after_s), NX: Route("user", NX, QUICK.outbox_after_s)}
    aws = FakeAws(faults=[down(f"stream-{NX}")])
    async with asyncio.timeout(10):
        await diverting_forwarder(aws, routes).process("shard", [stream_record("a")])
    assert sorted(puts(aws)) == [(f"outbox-{NX}", ["a"]), (f"stream-{CN}", ["a"])]
    assert routes[CN].mode is D and routes[NX].mode is V


async def test_a_peer_that_answers_is_fed_direct_while_the_shipper_empties_the_outbox() -> None:
    route = Route("user", CN, QUICK.outbox_after_s)
    route.note(H.UNREACHABLE)
    source = KinesisSource(FakeAws(), f"outbox-{CN}", "1", role=shipper_role(CN))  # type: ignore[arg-type]
    aws = source.aws
    metrics = Metrics()
    shipper = Shipper.build(source, "user", CN, f"stream-{CN}", route, DeadLetterQueue(aws, "q", metrics),  # type: ignore[arg-type]
                            QUICK, metrics, asyncio.Event())
    data = [encode_record(replication_put(pk, "1700000000", SG, created_s=NOW)) for pk in ("a", "b")]
    page = [{"Data": d, "PartitionKey": "k", "SequenceNumber": str(i),
             "ApproximateArrivalTimestamp": datetime.fromtimestamp(NOW, UTC)} for i, d in enumerate(data)]
    await shipper.process("shard", page)
    assert [(s, k) for s, k in puts(aws)] == [(f"stream-{CN}", ["a", "b"])]  # type: ignore[arg-type]
    assert route.mode is R  # the peer took them: new records go direct
    assert metrics.outbox_records.labels("user", CN, "shipped")._value.get() == 2


# --- configuration and what status shows -------------------------------------------------------


def topology(**region_extra: object) -> Topology:
    return Topology.model_validate({
        "regions": {CN: {"dead_letter_queue": "q", **region_extra}, SG: {"dead_letter_queue": "q"}},
        "pairs": [{"name": "user", "tables": {CN: "t", SG: "t"}, "streams": {CN: "s-cn", SG: "s-sg"},
                   "outboxes": {SG: {CN: "held-for-beijing"}}}],
    })


def test_outbox_names_default_to_the_peer_stream_and_can_be_named() -> None:
    t = topology()
    assert t.pairs[0].outbox_stream(CN, SG) == f"s-sg-outbox-{CN}"
    assert t.pairs[0].outbox_stream(SG, CN) == "held-for-beijing"
    assert t.regions[CN].outbox is not None and t.regions[CN].outbox.retention_hours == 168
    assert topology(outbox=None).regions[CN].outbox is None


@pytest.mark.parametrize(("outboxes", "message"), [
    ({"eu-west-1": {CN: "x"}}, "not a region and its peers"),
    ({CN: {CN: "x"}}, "not a region and its peers"),
    ({CN: {SG: "bad name!"}}, "String should match pattern"),
])
def test_outbox_names_are_checked(outboxes: dict[str, dict[str, str]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Topology.model_validate({"regions": {CN: {"dead_letter_queue": "q"}, SG: {"dead_letter_queue": "q"}},
                                 "pairs": [{"name": "u", "tables": {CN: "t", SG: "t"}, "streams": {CN: "a", SG: "b"},
                                            "outboxes": outboxes}]})


@pytest.mark.parametrize("hours", [23, 8761])
def test_outbox_retention_is_what_kinesis_allows(hours: int) -> None:
    with pytest.raises(ValidationError, match="retention_hours"):
        topology(outbox={"retention_hours": hours})


@pytest.mark.parametrize(("outbox", "reachable", "mode"), [
    (None, True, "direct"),
    ({"oldest_unshipped_s": None}, False, "direct"),
    ({"oldest_unshipped_s": 5.0}, False, "diverted"),
    ({"oldest_unshipped_s": 5.0}, True, "draining"),
])
def test_status_shows_the_mode_from_outside(outbox: dict[str, float | None] | None, reachable: bool,
                                             mode: str) -> None:
    assert status._mode(outbox, reachable) == mode


async def test_a_shippers_dead_letter_is_redriven_onto_the_peers_stream() -> None:
    """`dlq redrive` of a letter the shipper of Beijing's outbox gave up: the record, unchanged, on
    Beijing's stream (not applied here, where it came from)."""
    aws = FakeAws()
    aws.peers = {}

    async def open_peer(peer: str) -> str:
        aws.peers[peer] = f"client of {peer}"
        return aws.peers[peer]

    aws.open_peer = open_peer  # type: ignore[attr-defined]
    data = encode_record(replication_put("a", "1700000000", SG, created_s=NOW))
    t = topology()
    metrics = Metrics()

    async def dlq() -> DeadLetterQueue:
        return DeadLetterQueue(aws, "q", metrics)  # type: ignore[arg-type]

    ops = SimpleNamespace(aws=aws, region=SG, topology=t, metrics=metrics, stop=asyncio.Event(), dlq=dlq)
    letter = Letter("id", {"pipeline": shipper_role(CN), "pair": "user", "content": "replication_record",
                           "encoding": "base64", "parts": 1}, {0: base64.b64encode(data).decode()})
    await dead_letters._redrive(t, ops, letter)  # type: ignore[arg-type]
    assert [(kw["StreamName"], kw["Records"][0]["Data"]) for op, kw in aws.accepted if op == "put_records"] == [
        ("s-cn", data)]


class CountingTable:
    """The stats table's outbox items, at the client seam: ADDs applied, a refusal on demand."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, int]] = {}
        self.calls = 0
        self.refuse = False

    async def call(self, service: str, operation: str, **kwargs: object) -> dict[str, object]:
        self.calls += 1
        key = kwargs["Key"]["PK"]["S"]  # type: ignore[index]
        if operation == "get_item":
            item = self.items.get(key)
            return {"Item": {k: {"N": str(v)} for k, v in item.items()}} if item else {}
        if self.refuse:
            raise classify(botocore_error("InternalServerError", "update_item"))
        name = str(kwargs["UpdateExpression"]).split()[1]
        amount = int(kwargs["ExpressionAttributeValues"][":n"]["N"])  # type: ignore[index]
        self.items.setdefault(key, {}).setdefault(name, 0)
        self.items[key][name] += amount
        return {}


def botocore_error(code: str, operation: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}}, operation)


async def test_the_outbox_count_is_noted_off_the_page_path_and_flushed_and_kept_when_refused() -> None:
    from replicatord.shipper import OutboxCount

    table = CountingTable()
    count = OutboxCount(table, "replicator_stats")  # type: ignore[arg-type]
    count.note("user", SG, "diverted", 10)
    count.note("user", SG, "diverted", 5)
    assert table.calls == 0  # nothing written on the page's path
    table.refuse = True
    await count.flush()
    assert await count.depth("user", SG) == 0  # not written, kept for the next flush
    table.refuse = False
    count.note("user", SG, "shipped", 4)
    await count.flush()
    assert table.items["outbox/user/" + SG] == {"diverted": 15, "shipped": 4}
    assert await count.depth("user", SG) == 11
    count.note("user", SG, "shipped", 20)  # a replayed page counted again: never below 0
    await count.flush()
    assert await count.depth("user", SG) == 0
