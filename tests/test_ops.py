"""Operator commands against the emulated regions (issue 9): verify and repair, backfill, the
dead-letter queue, pause and resume, status. Each run as an operator would, through the CLI."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import pytest

from replicatord.local.world import REGIONS
from replicatord.tombstones import TOMB_KEY, tomb_key
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning

pytestmark = pytest.mark.integration

CN, SG = REGIONS
TABLES = {CN: "user-cn", SG: "user-sg"}
TS, RG = "last_update_timestamp", "last_updater_region"


def item(pk: str, ts: str | None = "100", region: str | None = CN, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"PK": {"S": pk}, **extra}
    if ts is not None:
        out[TS] = {"N": ts}
    if region is not None:
        out[RG] = {"S": region}
    return out


def put(regions: LocalRegions, region: str, *items: dict[str, Any]) -> None:
    ddb = regions.client("dynamodb", region)
    for it in items:
        ddb.put_item(TableName=TABLES[region], Item=it)


def no_faults(regions: LocalRegions) -> None:
    """Exact report lines: no injected 5xx (a repair answered with one after it landed would be
    counted as already there)."""
    for region in REGIONS:
        regions.control(region).behaviour(throttle_rate=0.0, error_rate=0.0, error_after_rate=0.0)


def test_verify_finds_every_difference_and_repair_makes_the_tables_identical(regions: LocalRegions) -> None:
    config = str(regions.provision())
    no_faults(regions)
    same = [item(f"same-{i}", extra={"S": str(i)}) for i in range(40)]
    put(regions, CN, *same)
    put(regions, SG, *same)
    # Only in one region; the second is stamped with the peer's region, which the forwarder
    # skips as replicated: the daemons could never fix it, verify must see it.
    put(regions, CN, item("only-cn"), item("only-cn-invisible", region=SG))
    put(regions, SG, item("only-sg", region=SG))
    # Different: a value, a type, a version, each with a clear winner.
    put(regions, CN, item("value", "200", note={"S": "new"}), item("type", "100", n={"N": "1"}),
        item("version", "100"))
    put(regions, SG, item("value", "100", note={"S": "old"}), item("type", "300", SG, n={"S": "1"}),
        item("version", "150", SG))
    # Deleted in Singapore after it was written in Beijing: the tombstone wins.
    put(regions, CN, item("deleted-later", "100"))
    regions.client("dynamodb", SG).put_item(TableName="replicatord_tombstones", Item={
        TOMB_KEY: {"S": tomb_key("user", {"PK": {"S": "deleted-later"}})}, "ts": {"N": "500"},
        "region": {"S": SG}, "expires_at": {"N": str(int(time.time()) + 3600)}})
    # Without version attributes: reported, never guessed.
    put(regions, SG, item("unversioned", ts=None, region=None))

    found = cli("verify", "--config", config, "--json", "--recheck-s", "0.2", "--segments", "3")
    assert found.returncode == 1, found.stderr
    (comparison,) = json.loads(found.stdout)["comparisons"]
    assert comparison["only_in"] == {CN: 3, SG: 2}
    assert comparison["different"] == 3
    assert comparison["scanned"] == {CN: 40 + 2 + 3 + 1, SG: 40 + 1 + 3 + 1}
    assert set(comparison["samples"][f"only_in_{CN}"]) == {
        '{"PK":{"S":"only-cn"}}', '{"PK":{"S":"only-cn-invisible"}}', '{"PK":{"S":"deleted-later"}}'}

    repaired = cli("verify", "--config", config, "--repair", "--recheck-s", "0.2")
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr  # the unversioned item is left
    assert "without version attributes (reported, not repaired): 1" in repaired.stdout
    assert "deleted (tombstone newer) in cn-north-1: 1" in repaired.stdout
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    for pk, winner in (("value", ("200", CN)), ("type", ("300", SG)), ("version", ("150", SG))):
        for region in REGIONS:
            got = ddb[region].get_item(TableName=TABLES[region], Key={"PK": {"S": pk}})["Item"]
            assert (got[TS]["N"], got[RG]["S"]) == winner, (pk, region)
    assert all("Item" not in ddb[r].get_item(TableName=TABLES[r], Key={"PK": {"S": "deleted-later"}}) for r in REGIONS)

    ddb[SG].delete_item(TableName=TABLES[SG], Key={"PK": {"S": "unversioned"}})  # the operator decides
    again = cli("verify", "--config", config, "--recheck-s", "0.2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "identical" in again.stdout
    assert_identical(regions, TABLES)


def test_verify_counts_match_for_a_larger_table_and_the_read_rate_is_bounded(regions: LocalRegions) -> None:
    config = str(regions.provision())
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    items = [item(f"bulk-{i}", str(Decimal(1000 + i))) for i in range(600)]
    for region in REGIONS:
        for start in range(0, len(items), 25):
            ddb[region].batch_write_item(RequestItems={TABLES[region]: [
                {"PutRequest": {"Item": it}} for it in items[start:start + 25]]})
    started = time.monotonic()
    result = cli("verify", "--config", config, "--json", "--rate", "400")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    (comparison,) = json.loads(result.stdout)["comparisons"]
    assert comparison["scanned"] == {CN: 600, SG: 600}
    # 600 items scanned and 600 looked up in each region at 400 items/s: 3 s at least (a lower
    # bound: a busy machine only makes it longer).
    assert elapsed >= 2.5, elapsed


def test_backfill_copies_by_version_and_a_second_run_continues(regions: LocalRegions) -> None:
    config = str(regions.provision())
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    for start in range(0, 300, 25):
        ddb[CN].batch_write_item(RequestItems={TABLES[CN]: [
            {"PutRequest": {"Item": item(f"bf-{i}", str(1000 + i))}} for i in range(start, start + 25)]})
    put(regions, CN, item("bf-unversioned", ts=None, region=None))
    put(regions, SG, item("bf-7", "5000", SG, newer={"BOOL": True}))  # Singapore holds a newer write
    result = cli("backfill", "--config", config, "--pair", "user", "--from", CN, "--json", "--segments", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] and not summary["resumed"]
    totals = summary["totals"]
    assert (totals["scanned"], totals["failed"], totals["unversioned"]) == (301, 0, 1)
    # bf-7 is older than Singapore's; a write answered with a 5xx after it took effect (the
    # AWS-behaviour layer) is retried, finds itself there and counts as older too.
    late = regions.control(SG).stats()["faults"].get("dynamodb.error_after", 0)
    assert totals["copied"] + totals["older"] == 300 and 1 <= totals["older"] <= 1 + late
    got = ddb[SG].get_item(TableName=TABLES[SG], Key={"PK": {"S": "bf-7"}})["Item"]
    assert got[RG]["S"] == SG and got["newer"] == {"BOOL": True}  # never overwritten
    assert ddb[SG].scan(TableName=TABLES[SG], Select="COUNT")["Count"] == 300
    again = cli("backfill", "--config", config, "--pair", "user", "--from", CN, "--json")
    assert again.returncode == 0
    second = json.loads(again.stdout)
    assert second["resumed"] and second["this_run"]["scanned"] == 0  # complete: nothing done twice


TUNING = quick_tuning(max_record_attempts=2, backoff_base_ms=20, backoff_max_ms=200)


def write(regions: LocalRegions, region: str, pk: str) -> None:
    put(regions, region, item(pk, f"{time.time():.3f}", region))


def present(regions: LocalRegions, region: str, pk: str) -> bool:
    return "Item" in regions.client("dynamodb", region).get_item(TableName=TABLES[region], Key={"PK": {"S": pk}})


def dlq_list(config: str, region: str) -> list[dict[str, Any]]:
    result = cli("dlq", "list", "--config", config, "--region", region, "--json")
    assert result.returncode == 0, result.stderr
    letters: list[dict[str, Any]] = json.loads(result.stdout)["letters"]
    return letters


def test_a_refused_record_is_redriven_once_its_cause_is_fixed(regions: LocalRegions) -> None:
    from replicatord.local.world import wait_for

    config = str(regions.provision(tuning=TUNING))
    no_faults(regions)
    for region in REGIONS:
        regions.daemon(region).wait_ready()
    write(regions, CN, "first")
    wait_for(lambda: present(regions, SG, "first"), 60, "replication to work")
    # The cause: Singapore's table is gone (an operator's mistake). Its writes fail with
    # ResourceNotFoundException, which is retried max_record_attempts times, then dead-lettered.
    regions.client("dynamodb", SG).delete_table(TableName=TABLES[SG])
    write(regions, CN, "refused")
    wait_for(lambda: len(dlq_list(config, SG)) == 1, 120, "the record in Singapore's dead-letter queue")
    (letter,) = dlq_list(config, SG)
    assert (letter["reason"], letter["pair"], letter["pipeline"]) == ("not_found", "user", "applier")
    shown = cli("dlq", "show", "--config", config, "--region", SG, "--id", letter["id"][:8])
    assert shown.returncode == 0 and '"refused"' in shown.stdout, shown.stdout + shown.stderr
    # Fixed: the table is back. The redrive applies the record through the normal rules.
    assert cli("provision", "--config", config).returncode == 0
    redrive = cli("dlq", "redrive", "--config", config, "--region", SG)
    assert redrive.returncode == 0, redrive.stdout + redrive.stderr
    assert "redriven 1 letters; 0 refused again" in redrive.stdout
    assert present(regions, SG, "refused")
    assert dlq_list(config, SG) == []
    refused = cli("dlq", "purge", "--config", config, "--region", SG)
    assert refused.returncode == 2  # purge asks for --yes


def test_pause_holds_a_direction_and_resume_loses_nothing(regions: LocalRegions) -> None:
    from replicatord.local.world import metric_sum, wait_for

    config = str(regions.provision(tuning=TUNING))
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready()
    paused = cli("pause", "--config", config, "--pair", "user", "--direction", f"{CN}:{SG}")
    assert paused.returncode == 0, paused.stderr
    wait_for(lambda: metric_sum(daemons[CN].metrics(), "replicatord_paused", direction=f"{CN}:{SG}") == 1, 30,
             "the daemon to obey the pause")
    for i in range(20):
        write(regions, CN, f"while-paused-{i}")
    write(regions, SG, "other-direction")  # the other direction goes on
    wait_for(lambda: present(regions, CN, "other-direction"), 60, "the other direction to replicate")
    # With an outbox (the default) the forwarder goes on and the records wait in Singapore's
    # outbox in Beijing, whose retention (7 days) bounds the pause instead of the stream's 24 hours.
    wait_for(lambda: metric_sum(daemons[CN].metrics(), "replicatord_outbox_records_total", peer=SG,
                                event="diverted") >= 20, 30, "the writes to wait in the outbox")
    status = cli("status", "--config", config, "--json")
    assert status.returncode == 0, status.stderr
    direction = next(d for d in json.loads(status.stdout)["pairs"]["user"] if d["direction"] == f"{CN} -> {SG}")
    assert direction["paused_since"] and direction["mode"] == "diverted"
    assert direction["outbox"]["oldest_unshipped_s"] is not None
    assert 24 * 3600 < direction["time_to_data_loss_s"] < 168 * 3600
    assert not any(present(regions, SG, f"while-paused-{i}") for i in range(20))
    assert "PAUSED for" in cli("status", "--config", config).stdout
    wait_for(lambda: 0 < metric_sum(daemons[CN].metrics(), "replicatord_time_to_data_loss_seconds",
                                    pipeline=f"shipper:{SG}") < 168 * 3600, 30, "the metric to show the paused backlog")
    assert metric_sum(daemons[CN].metrics(), "replicatord_peer_mode", peer=SG) == 1
    assert cli("resume", "--config", config, "--pair", "user", "--direction", f"{CN}:{SG}").returncode == 0
    wait_for(lambda: all(present(regions, SG, f"while-paused-{i}") for i in range(20)), 60,
             "the writes made while paused to replicate")
