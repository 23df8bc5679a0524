"""Backfill end to end (issue 9): a table that existed before its stream was enabled, copied into
an empty peer while both daemons run and both regions write newer versions of some of its keys;
interrupted half-way with kill -9 and resumed.

CI runs it with 2,000 items (its time budget); the figure in the README is the 20,000-item run:
    OPS_E2E_ITEMS=20000 .venv/bin/pytest -s tests/test_ops_e2e.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from replicatord.lease_table import SHARD_KEY, STREAM_KEY
from replicatord.local.world import REGIONS, local_env, wait_drained, wait_for
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
TABLES = {CN: "user-cn", SG: "user-sg"}
STREAMS = {CN: "ddb_replication_stream_cn", SG: "ddb_replication_stream_sg"}
TUNING = quick_tuning()
ITEMS = int(os.environ.get("OPS_E2E_ITEMS", "2000"))
TS, RG = "last_update_timestamp", "last_updater_region"


def backfill_progress(regions: LocalRegions) -> int:
    """Items scanned so far, from the progress the backfill stores in Beijing's lease table."""
    items = regions.client("dynamodb", CN).query(
        TableName="replicatord_leases_v2", KeyConditionExpression="#s = :s",
        ExpressionAttributeNames={"#s": STREAM_KEY},
        ExpressionAttributeValues={":s": {"S": f"backfill/user/{CN}"}}, ConsistentRead=True)["Items"]
    return sum(int(i.get("scanned", {}).get("N", "0")) for i in items if i[SHARD_KEY]["S"].startswith("segment-"))


@pytest.mark.timeout(900)  # 20,000 conditional writes (the long run) into an emulator that serves one at a time
def test_backfill_a_table_that_predates_its_stream_while_everything_runs(regions: LocalRegions, tmp_path: Path) -> None:
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    # The existing table: created and filled before any stream or replicatord existed.
    ddb[CN].create_table(TableName=TABLES[CN], BillingMode="PAY_PER_REQUEST",
                         KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                         AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}])
    base = time.time() - 86400
    for start in range(0, ITEMS, 25):
        ddb[CN].batch_write_item(RequestItems={TABLES[CN]: [{"PutRequest": {"Item": {
            "PK": {"S": f"old-{i}"}, TS: {"N": f"{base + i / 1000:.3f}"}, RG: {"S": CN},
            "payload": {"S": "x" * 64}}}} for i in range(start, start + 25)]})
    config = str(regions.provision(tuning=TUNING))  # enables the stream on the existing table
    for region in REGIONS:
        regions.daemon(region).wait_ready(120)

    # While the backfill runs, both regions write newer versions of some of those keys.
    newer: dict[str, str] = {}
    halt = threading.Event()

    def rewrite(region: str, offset: int) -> None:
        client = regions.client("dynamodb", region)
        n = 0
        while not halt.is_set() and n < 300:
            pk = f"old-{offset + n * 31 % (ITEMS // 2)}"
            client.put_item(TableName=TABLES[region], Item={
                "PK": {"S": pk}, TS: {"N": f"{time.time():.3f}"}, RG: {"S": region}, "rewritten": {"S": region}})
            newer[pk] = region
            n += 1
            halt.wait(0.05)  # a steady trickle, not a synchronisation

    writers = [threading.Thread(target=rewrite, args=(CN, 0)), threading.Thread(target=rewrite, args=(SG, ITEMS // 2))]
    for writer in writers:
        writer.start()
    command = [sys.executable, "-m", "replicatord.cli", "backfill", "--config", config, "--pair", "user",
               "--from", CN, "--json", "--rate", "0", "--segments", "4"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=local_env())
    wait_for(lambda: backfill_progress(regions) >= ITEMS // 2, 600, "the backfill to get half-way")
    first.kill()  # kill -9, half-way
    first.wait()
    done_before = backfill_progress(regions)
    started = time.monotonic()
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, env=local_env())
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads(second.stdout)
    halt.set()
    for writer in writers:
        writer.join(timeout=60)
    assert summary["complete"] and summary["resumed"]
    assert summary["totals"]["scanned"] >= ITEMS and summary["totals"]["failed"] == 0, summary
    # The work already done was not repeated: the second run scanned what was left (and at most
    # the pages in flight when the first was killed, one per segment).
    assert summary["this_run"]["scanned"] <= ITEMS - done_before + 4 * 500, (summary, done_before)

    wait_drained(regions.client, {r: [(TABLES[r], STREAMS[r])] for r in REGIONS}, 300)
    assert_identical(regions, TABLES, ITEMS)
    for pk in newer:  # every newer write kept, in both regions
        for r in REGIONS:
            got = ddb[r].get_item(TableName=TABLES[r], Key={"PK": {"S": pk}})["Item"]
            assert "rewritten" in got, (pk, r)
    rate = summary["this_run"]["scanned"] / elapsed
    print(f"\nbackfill of {ITEMS:,} items: killed at {done_before:,}, resumed: {summary['this_run']['scanned']:,} "
          f"more in {elapsed:.0f}s ({rate:,.0f} items/s); {summary['totals']['copied']:,} copied, "
          f"{summary['totals']['older']:,} older; {len(newer)} newer writes kept in both regions")
    started = time.monotonic()
    verify = cli("verify", "--config", config, "--json", "--rate", "0")
    elapsed = time.monotonic() - started
    assert verify.returncode == 0, verify.stdout
    scanned = json.loads(verify.stdout)["comparisons"][0]["scanned"]
    print(f"verify of {scanned}: identical in {elapsed:.0f}s ({sum(scanned.values()) / elapsed:,.0f} items/s)")
