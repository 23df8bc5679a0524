"""Conflict cases of docs/design.md §4, end to end: both daemons running against the two emulators.

Every test ends the same way: after the pipelines drain, both tables are identical attribute for
attribute AND every key holds its winner, the highest version (timestamp, PUT < DELETE, region)
among all the application's writes and deletes to it. Item timestamps lie far in the future
(FUTURE + n) so that an application delete's version is the removed item's timestamp, not the
stream record's creation time: the expected winner is known in advance.

Interleavings are forced by stopping a region's daemon while the conflicting writes happen and
starting a new one afterwards: it resumes from its checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import pytest
from botocore.exceptions import ClientError

from replicatord.conflict import DELETE, PUT
from replicatord.local.compare import compare_tables
from replicatord.local.world import (
    REGIONS,
    DaemonProcess,
    metric_sum,
    provision_local,
    topology_document,
    wait_drained,
    wait_for,
    write_topology,
)
from replicatord.ops.tables import canonical
from replicatord.records import partition_key
from replicatord.tombstones import tomb_key
from tests.conftest import LocalRegions, assert_identical

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
TS, RG = "last_update_timestamp", "last_updater_region"
FUTURE = Decimal(4_000_000_000)
DRAIN_S = 240
READY_S = 120

Item = dict[str, Any]
Version = tuple[Decimal, int, str]


class Pair(NamedTuple):
    name: str
    tables: dict[str, str]
    streams: dict[str, str]


USER = Pair("user", {CN: "user-cn", SG: "user-sg"}, {CN: "ddb_replication_stream_cn", SG: "ddb_replication_stream_sg"})
BLOBS = Pair("blobs", {CN: "blobs-cn", SG: "blobs-sg"},
             {CN: "ddb_replication_stream_blobs_cn", SG: "ddb_replication_stream_blobs_sg"})


# --- setup --------------------------------------------------------------------------------------


def provision(regions: LocalRegions, pairs: tuple[Pair, ...] = (USER,), keys: dict[str, dict[str, str]] | None = None,
              conflict: dict[str, Any] | None = None) -> None:
    """Like LocalRegions.provision, with the options topology_document has no argument for:
    more pairs, a key schema per pair, a `conflict` section. The cases stamp their writes in the
    far FUTURE (above every delete stamped now), so the bound on future versions is widened."""
    doc = topology_document(regions.endpoints)
    template = doc["pairs"][0]
    doc["pairs"] = [{**template, "name": p.name, "tables": p.tables, "streams": p.streams} for p in pairs]
    for pair_doc in doc["pairs"]:
        if keys and pair_doc["name"] in keys:
            pair_doc["key"] = keys[pair_doc["name"]]
    doc["conflict"] = {"max_future_s": float(FUTURE) + 10**6, **(conflict or {})}
    regions.config = write_topology(regions.workdir / "topology.yaml", doc)
    provision_local(regions.config, report=lambda _line: None)


def start(regions: LocalRegions, *names: str) -> dict[str, DaemonProcess]:
    daemons = {region: regions.daemon(region) for region in names}
    for daemon in daemons.values():
        daemon.wait_ready(READY_S)
    return daemons


def restart(regions: LocalRegions, daemons: dict[str, DaemonProcess], region: str) -> None:
    """A new daemon (another instance id) in place of the stopped one: it resumes from the checkpoints."""
    daemons.update(start(regions, region))


def stop(daemons: dict[str, DaemonProcess], region: str) -> None:
    assert daemons[region].terminate() == 0, daemons[region].log_tail()


# --- draining -----------------------------------------------------------------------------------


def drained(regions: LocalRegions, pairs: tuple[Pair, ...] = (USER,)) -> None:
    wait_drained(regions.client, {r: [(p.tables[r], p.streams[r]) for p in pairs] for r in REGIONS}, DRAIN_S)


# --- the application's changes and their winners ------------------------------------------------


def canonical_item(item: Item | None) -> Item | None:
    return None if item is None else {name: canonical(value) for name, value in item.items()}


@dataclass
class Ledger:
    """The application of one pair, writing in both regions: it makes each change with the region's
    own client and keeps every key's versions, to know which one must win."""

    regions: LocalRegions
    pair: Pair = USER
    versions: dict[str, list[tuple[Version, Item | None]]] = field(default_factory=dict)
    keys: dict[str, Item] = field(default_factory=dict)
    clients: dict[str, Any] = field(default_factory=dict)

    def _ddb(self, region: str) -> Any:
        if region not in self.clients:
            self.clients[region] = self.regions.client("dynamodb", region)
        return self.clients[region]

    def _record(self, key: Item, version: Version, image: Item | None) -> None:
        canon = partition_key(key)
        self.keys[canon] = key
        self.versions.setdefault(canon, []).append((version, image))

    def put(self, region: str, key: Item, ts: Decimal | int, **attributes: Any) -> Item:
        """PutItem stamped (FUTURE + ts, region), the whole item as the application wrote it."""
        stamp = FUTURE + ts
        item = {**key, TS: {"N": str(stamp)}, RG: {"S": region}, **attributes}
        self._ddb(region).put_item(TableName=self.pair.tables[region], Item=item)
        self._record(key, (stamp, PUT, region), item)
        return item

    def update(self, region: str, key: Item, ts: Decimal | int, **attributes: Any) -> Item:
        """UpdateItem: sets `attributes` and a new version, keeps the others."""
        stamp = FUTURE + ts
        values = {TS: {"N": str(stamp)}, RG: {"S": region}, **attributes}
        names = {f"#a{i}": name for i, name in enumerate(values)}
        item = self._ddb(region).update_item(
            TableName=self.pair.tables[region], Key=key, ReturnValues="ALL_NEW",
            UpdateExpression="SET " + ", ".join(f"#a{i} = :v{i}" for i in range(len(values))),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={f":v{i}": value for i, value in enumerate(values.values())},
        )["Attributes"]
        self._record(key, (stamp, PUT, region), item)
        return dict(item)

    def delete(self, region: str, key: Item) -> None:
        """DeleteItem; its version is (max(now, removed item's timestamp), DELETE, region)."""
        now = Decimal(str(time.time()))
        old = self._ddb(region).delete_item(TableName=self.pair.tables[region], Key=key,
                                            ReturnValues="ALL_OLD").get("Attributes")
        assert old is not None, f"{key} was not in {region}: a delete of nothing is no change"
        self._record(key, (max(now, Decimal(old[TS]["N"])), DELETE, region), None)

    def winner(self, key: Item) -> Item | None:
        """What `key` must hold in every region: its highest version's image, or nothing."""
        version, image = max(self.versions[partition_key(key)], key=lambda change: change[0])
        return None if version[1] == DELETE else image

    def assert_winners(self) -> None:
        for region in REGIONS:
            ddb = self._ddb(region)
            for key in self.keys.values():
                got = ddb.get_item(TableName=self.pair.tables[region], Key=key, ConsistentRead=True).get("Item")
                assert canonical_item(got) == canonical_item(self.winner(key)), f"{self.pair.name} {key} in {region}"


def assert_converged(regions: LocalRegions, *ledgers: Ledger) -> None:
    for ledger in ledgers:
        assert_identical(regions, ledger.pair.tables)
        ledger.assert_winners()


def pk(name: str) -> Item:
    return {"PK": {"S": name}}


def conflicts(daemon: DaemonProcess, kind: str) -> float:
    return metric_sum(daemon.metrics(), "replicatord_conflicts_total", kind=kind)


# --- the cases ----------------------------------------------------------------------------------


def test_exact_tie_goes_to_cn_north_1(regions: LocalRegions) -> None:
    provision(regions)
    start(regions, CN, SG)
    app = Ledger(regions)
    from_cn = {}
    for i in range(4):
        # Both regions write the key with the same timestamp, in either order, within milliseconds.
        key = pk(f"tie-{i}")
        for region in (CN, SG) if i % 2 else (SG, CN):
            item = app.put(region, key, 100, writer={"S": region})
            if region == CN:
                from_cn[partition_key(key)] = item
    drained(regions)

    assert_converged(regions, app)
    assert {k: app.winner(key) for k, key in app.keys.items()} == from_cn


@pytest.mark.parametrize("order", ["delete_first", "put_first"])
@pytest.mark.parametrize(("ts", "winner"), [(50, "the delete"), (200, "the put")])
def test_delete_against_an_older_or_newer_put_in_either_order(regions: LocalRegions, order: str, ts: int,
                                                              winner: str) -> None:
    """CN deletes an item of version 100 while SG writes it at `ts`; each side's daemon is down so
    that it hears of the other's change only after its own."""
    provision(regions)
    daemons = start(regions, CN, SG)
    app = Ledger(regions)
    k = pk("k")
    app.put(CN, k, 100, v={"S": "original"})
    drained(regions)

    if order == "delete_first":
        stop(daemons, SG)  # SG has not heard of the delete when its application writes
        app.delete(CN, k)
        put = app.put(SG, k, ts, v={"S": f"written at {ts}"})
        restart(regions, daemons, SG)
    else:
        stop(daemons, CN)  # CN has not heard of the write when its application deletes
        put = app.put(SG, k, ts, v={"S": f"written at {ts}"})
        app.delete(CN, k)
        restart(regions, daemons, CN)
    drained(regions)

    assert_converged(regions, app)
    assert app.winner(k) == (None if winner == "the delete" else put)


def test_stale_local_write_is_repaired(regions: LocalRegions) -> None:
    provision(regions)
    daemons = start(regions, CN, SG)
    app = Ledger(regions)
    k = pk("k")
    newer = app.put(SG, k, 100, v={"S": "newer, from Singapore"})
    drained(regions)

    # The application in Beijing overwrites the replicated item with an older timestamp.
    app.put(CN, k, 50, v={"S": "older, from Beijing"})
    drained(regions)

    assert_converged(regions, app)
    assert app.winner(k) == newer
    assert conflicts(daemons[CN], "stale_write") > 0


def test_resurrection_is_repaired_and_the_tombstone_kept(regions: LocalRegions) -> None:
    provision(regions)
    daemons = start(regions, CN, SG)
    app = Ledger(regions)
    k = pk("k")
    app.put(CN, k, 100, v={"S": "original"})
    drained(regions)

    stop(daemons, SG)
    app.delete(CN, k)
    app.put(SG, k, 50, v={"S": "older, written while Singapore's daemon was down"})
    restart(regions, daemons, SG)
    drained(regions)
    assert_converged(regions, app)
    assert app.winner(k) is None

    tomb = regions.client("dynamodb", CN).get_item(
        TableName="replicatord_tombstones", Key={"tomb_key": {"S": tomb_key("user", k)}}, ConsistentRead=True,
    ).get("Item")
    assert tomb is not None, "no tombstone for the deleted key in cn-north-1"
    assert (Decimal(tomb["ts"]["N"]), tomb["region"]["S"]) == (FUTURE + 100, CN)
    assert Decimal(tomb["expires_at"]["N"]) > Decimal(time.time() + 3600)

    # Now that Singapore knows the delete, an older write there is a resurrection: repaired at once.
    app.put(SG, k, 60, v={"S": "older again, written after the delete arrived"})
    drained(regions)
    assert_converged(regions, app)
    assert conflicts(daemons[SG], "resurrection") > 0


def write_update_delete(regions: LocalRegions, app: Ledger, keys: list[Item]) -> None:
    """Each region writes half of `keys`; then both update, delete and overwrite some of them,
    their own and the other region's. Converged after each phase."""
    for i, key in enumerate(keys):
        app.put(REGIONS[i % 2], key, 10 + i, v={"N": str(i)})
    drained(regions, (app.pair,))
    assert_converged(regions, app)

    app.update(CN, keys[1], 30, v={"S": "cn updated sg's item"})
    app.update(SG, keys[0], 30, extra={"L": [{"S": "sg updated cn's item"}]})
    app.delete(CN, keys[3])
    app.delete(SG, keys[2])
    app.put(SG, keys[4], 30, v={"S": "sg overwrote cn's item"})
    drained(regions, (app.pair,))
    assert_converged(regions, app)
    counts = {r: regions.client("dynamodb", r).scan(TableName=app.pair.tables[r], Select="COUNT")["Count"]
              for r in REGIONS}
    assert counts == {CN: len(keys) - 2, SG: len(keys) - 2}


def test_composite_keys_sharing_a_hash_key(regions: LocalRegions) -> None:
    provision(regions, keys={"user": {"PK": "S", "SK": "N"}})
    start(regions, CN, SG)
    rows = [{"PK": {"S": "customer#1"}, "SK": {"N": str(sk)}} for sk in (1, 2, 3, 10, 20, 300, -5, 7)]
    write_update_delete(regions, Ledger(regions), rows)


def test_number_hash_and_binary_range_keys(regions: LocalRegions) -> None:
    provision(regions, keys={"user": {"PK": "N", "SK": "B"}})
    start(regions, CN, SG)
    rows = [{"PK": {"N": pk_}, "SK": {"B": sk}}
            for pk_, sk in (("1", b"\x00"), ("1", b"\xff\x00"), ("-2.5", b"a"), ("1000", b"AP8="), ("7", b"\n"))]
    write_update_delete(regions, Ledger(regions), rows)


def test_binary_hash_key(regions: LocalRegions) -> None:
    provision(regions, pairs=(BLOBS,), keys={"blobs": {"BK": "B"}})
    start(regions, CN, SG)
    blobs = [{"BK": {"B": key}} for key in (b"\x00", b"\xff\xfe\x00", "k\u00e9y".encode(), bytes(range(32)),
                                            b"AP8=", b"\x00\xff", b"x" * 100, b"\n")]
    write_update_delete(regions, Ledger(regions, BLOBS), blobs)


def every_type(origin: str) -> dict[str, Any]:
    return {
        "s": {"S": f"plain {origin}"},
        "empty": {"S": ""},
        "unicode": {"S": "北京 → Singapore ☃ 🦆 ñ \u00e9\u0301 \t\n\"quoted\" \\"},
        "n": {"N": "-42"},
        "big": {"N": "123456789012345678901234567890.123"},
        "tiny": {"N": "0.000000000000000000000000000000000001"},
        "huge": {"N": "99999999999999999999999999999999999999"},
        "b": {"B": bytes(range(256))},
        "ss": {"SS": ["a", "ü", "🦆", "z z"]},
        "ns": {"NS": ["1", "-2.5", "123456789012345678901234567890.123"]},
        "bs": {"BS": [b"\x00", b"\xff", b"bytes"]},
        "bool_t": {"BOOL": True},
        "bool_f": {"BOOL": False},
        "null": {"NULL": True},
        "list": {"L": [{"S": "x"}, {"N": "1"}, {"NULL": True}, {"BOOL": False}, {"B": b"\x01\x02"},
                       {"L": []}, {"M": {}}, {"SS": ["in", "list"]}]},
        "map": {"M": {"nested": {"M": {"deeper": {"L": [{"M": {"leaf": {"S": "🌿"}}}]}, "n": {"N": "0"}}},
                      "名前": {"S": "キー"}, "empty": {"S": ""}}},
        "attribute name with spaces & ünïcödé ☃": {"S": "value"},
    }


def test_every_attribute_type_round_trips_both_ways(regions: LocalRegions) -> None:
    provision(regions)
    start(regions, CN, SG)
    app = Ledger(regions)
    for region in REGIONS:
        app.put(region, pk(f"types from {region}"), 100, **every_type(region))
    drained(regions)
    assert_converged(regions, app)


def item_size(item: Item) -> int:
    """An item's size as DynamoDB counts it, for the flat S/N/B items of these tests."""
    return sum(len(name.encode()) + len(v.get("B", b"")) + len(v.get("S", v.get("N", "")).encode())
               for name, v in item.items())


def test_item_near_the_400_kb_limit(regions: LocalRegions) -> None:
    provision(regions)
    start(regions, CN, SG)
    app = Ledger(regions)
    for n, region in enumerate(REGIONS):
        payload = bytes((i * 7 + n) % 256 for i in range(390_000))
        item = app.put(region, pk(f"big from {region}"), 100, blob={"B": payload}, text={"S": "ü" * 4_500})
        assert 399_000 < item_size(item) < 400 * 1024
    drained(regions)
    assert_converged(regions, app)


def put_largest(app: Ledger, region: str, key: Item, ts: int) -> Item:
    """Put the largest item of this shape the table accepts (to 1 byte): an item at the size limit.

    The size is probed in a table that is not replicated (the loader's stats table, keyed by PK too).
    """
    ddb = app.regions.client("dynamodb", region)

    def attributes(pad: int) -> Item:
        return {"blob": {"B": bytes(390_000)}, "text": {"S": "x" * pad}}

    low, high = 0, 20_000  # bytes of padding: fits, does not fit
    while high - low > 1:
        pad = (low + high) // 2
        try:
            ddb.put_item(TableName="loader_stats",
                         Item={**key, TS: {"N": str(FUTURE + ts)}, RG: {"S": region}, **attributes(pad)})
        except ClientError as exc:
            assert "size" in str(exc), exc
            high = pad
        else:
            low = pad
    ddb.delete_item(TableName="loader_stats", Key=key)
    return app.put(region, key, ts, **attributes(low))


def test_delete_of_an_item_at_the_size_limit(regions: LocalRegions) -> None:
    provision(regions)
    start(regions, CN, SG)
    app = Ledger(regions)
    k = pk("at the limit")
    item = put_largest(app, CN, k, 100)
    assert item_size(item) > 399_000
    drained(regions)
    assert_converged(regions, app)  # it replicates

    app.delete(CN, k)
    drained(regions)
    assert_converged(regions, app)  # and so should its delete


def dead_letters(regions: LocalRegions, region: str, queue: str) -> list[dict[str, Any]]:
    sqs = regions.client("sqs", region)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    messages: list[dict[str, Any]] = []

    def received() -> bool:
        for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
            messages.append(json.loads(message["Body"]))
        return bool(messages)

    wait_for(received, 120, f"a dead letter in {queue}", interval_s=0.5)
    return messages


def write_unversioned(regions: LocalRegions, policy: str) -> tuple[Ledger, dict[str, Item]]:
    """Each region writes a versioned item and one without the version attributes; drained."""
    provision(regions, conflict={"missing_version": policy})
    daemons = start(regions, CN, SG)
    app = Ledger(regions)
    unversioned = {region: pk(f"unversioned from {region}") for region in REGIONS}
    for region in REGIONS:
        app.put(region, pk(f"versioned from {region}"), 100)
        regions.client("dynamodb", region).put_item(
            TableName=USER.tables[region], Item={**unversioned[region], "v": {"S": "no version"}})
    drained(regions)
    for region, daemon in daemons.items():
        action = "dead_letter" if policy == "dead_letter" else "stamped"
        assert metric_sum(daemon.metrics(), "replicatord_unversioned_total", action=action) >= 1, region
    return app, unversioned


def test_unversioned_items_go_to_the_dead_letter_queue(regions: LocalRegions) -> None:
    app, unversioned = write_unversioned(regions, "dead_letter")

    diff = compare_tables({r: regions.client("dynamodb", r) for r in REGIONS}, USER.tables)
    assert not diff.different
    assert diff.only_in == {region: [unversioned[region]] for region in REGIONS}  # not replicated
    app.assert_winners()
    for region, queue in ((CN, "ddbreplicatorcn"), (SG, "ddbreplicatorsg")):
        # At least once: a replayed page may send its dead letter again.
        letters = dead_letters(regions, region, queue)
        assert {m["reason"] for m in letters} == {"no_version"}
        assert all(json.loads(m["payload"])["dynamodb"]["Keys"] == unversioned[region] for m in letters)


def test_unversioned_items_are_stamped_and_replicate(regions: LocalRegions) -> None:
    began = time.time()
    app, unversioned = write_unversioned(regions, "stamp")

    assert_converged(regions, app)
    for region in REGIONS:
        item = regions.client("dynamodb", region).get_item(TableName=USER.tables[region], Key=unversioned[region],
                                                           ConsistentRead=True)["Item"]
        # Stamped where it was written, with the stream record's creation time.
        assert item[RG] == {"S": region}
        assert began - 60 < float(item[TS]["N"]) < time.time() + 60
        assert item["v"] == {"S": "no version"}


def test_stamped_overwrite_older_than_the_item_it_replaced(regions: LocalRegions) -> None:
    provision(regions, conflict={"missing_version": "stamp"})
    daemons = start(regions, CN, SG)
    app = Ledger(regions)
    k = pk("k")
    newer = app.put(SG, k, 100, v={"S": "versioned, from Singapore"})
    drained(regions)

    # The application in Beijing overwrites the replicated item without the version attributes.
    # The stamp gives that write the stream record's creation time: older than the replaced item.
    regions.client("dynamodb", CN).put_item(TableName=USER.tables[CN], Item={**k, "v": {"S": "unversioned"}})
    drained(regions)

    assert_converged(regions, app)
    assert app.winner(k) == newer
    assert conflicts(daemons[CN], "stale_write") == 1
