"""End to end in a world that behaves like AWS (issue 8): DynamoDB stream shards roll over every
few seconds and age out, TTL sweeps delete, key pairs are rotated and revoked, a stream is
disabled and enabled again, and a daemon is frozen past the stream's retention.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from replicatord.config import load_topology
from replicatord.local.world import REGIONS, metric_sum, peer_writer_key_pair, wait_for
from replicatord.ops.provision import RegionProvisioner
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning
from tests.test_e2e import TABLES, _drained

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
TUNING = quick_tuning(peer_credentials_refresh_s=1)


class Writer:
    """Writes items into one region at a steady rate, in a thread, until stopped."""

    def __init__(self, regions: LocalRegions, region: str, prefix: str, per_s: float,
                 extra: dict[str, Any] | None = None):
        self.ddb = regions.client("dynamodb", region)
        self.region, self.prefix, self.per_s, self.extra = region, prefix, per_s, extra or {}
        self.written: list[str] = []
        self.errors: list[BaseException] = []
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while not self.halt.is_set():
                pk = f"{self.prefix}-{len(self.written)}"
                self.ddb.put_item(TableName=TABLES[self.region], Item={
                    "PK": {"S": pk}, "last_update_timestamp": {"N": f"{time.time():.3f}"},
                    "last_updater_region": {"S": self.region}, **self.extra})
                self.written.append(pk)
                # Paced to the rate, not a synchronisation.
                self.halt.wait(max(0.0, started + len(self.written) / self.per_s - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
            self.errors.append(exc)

    def stop(self) -> list[str]:
        self.halt.set()
        self.thread.join(timeout=60)
        assert not self.errors, self.errors
        return self.written


def count(regions: LocalRegions, region: str) -> int:
    return int(regions.client("dynamodb", region).scan(TableName=TABLES[region], Select="COUNT")["Count"])


def stream_shards(regions: LocalRegions, region: str) -> list[str]:
    ddb, streams = regions.client("dynamodb", region), regions.client("dynamodbstreams", region)
    arn = ddb.describe_table(TableName=TABLES[region])["Table"]["LatestStreamArn"]
    return [s["ShardId"] for s in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]]


def test_a_minute_of_load_through_rollovers_kill_9_and_sigterm(regions: LocalRegions) -> None:
    """Both regions write for 60 s while their streams roll over every few seconds; one daemon is
    killed -9 and one stopped with SIGTERM on the way. The daemons run with HTTP(S)_PROXY set to a
    dead proxy: the local clients must never use it."""
    regions.provision(tuning=TUNING)
    dead_proxy = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    daemons = {r: regions.daemon(r, env=dead_proxy) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(120)
    shards_before = len(stream_shards(regions, CN))
    writers = [Writer(regions, r, f"steady-{r}", per_s=15) for r in REGIONS]
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 20, 30, "20 s of load")
    daemons[CN].kill()
    daemons[CN] = regions.daemon(CN, env=dead_proxy)
    wait_for(lambda: time.monotonic() - started > 40, 30, "40 s of load")
    assert daemons[SG].terminate() == 0
    daemons[SG] = regions.daemon(SG, env=dead_proxy)
    wait_for(lambda: time.monotonic() - started > 60, 30, "60 s of load")
    written = {w.region: w.stop() for w in writers}
    _drained(regions)
    diff = assert_identical(regions, TABLES)
    assert diff.counts == {CN: sum(map(len, written.values())), SG: sum(map(len, written.values()))}
    rollovers = len(stream_shards(regions, CN)) - shards_before
    assert rollovers >= 10, rollovers
    assert "ignoring HTTPS_PROXY, HTTP_PROXY from the environment" in daemons[CN].log_path.read_text()
    print(f"\n60 s of load, {sum(map(len, written.values()))} items, {rollovers} rollovers in {CN}: identical")


def test_a_daemon_frozen_past_the_retention_reports_the_loss_and_replicates_what_is_new(regions: LocalRegions) -> None:
    regions.provision(tuning=TUNING)
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(120)
    control = regions.control(CN)
    control.behaviour(stream_rollover_s=2.0, stream_retention_s=6.0)
    ddb_cn, ddb_sg = regions.client("dynamodb", CN), regions.client("dynamodb", SG)

    def put(pk: str) -> None:
        ddb_cn.put_item(TableName=TABLES[CN], Item={
            "PK": {"S": pk}, "last_update_timestamp": {"N": f"{time.time():.3f}"}, "last_updater_region": {"S": CN}})

    def in_sg(pk: str) -> bool:
        return "Item" in ddb_sg.get_item(TableName=TABLES[SG], Key={"PK": {"S": pk}})

    put("before")
    wait_for(lambda: in_sg("before"), 60, "the first item to replicate")
    frozen = daemons[CN]
    pid = frozen.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(10):
            put(f"while-frozen-{i}")
        lost_shards = set(stream_shards(regions, CN))
        wait_for(lambda: not lost_shards & set(stream_shards(regions, CN)), 60,
                 "the shards holding the writes to leave the stream")
    finally:
        os.kill(pid, signal.SIGCONT)
    for i in range(5):
        put(f"fresh-{i}")
    wait_for(lambda: all(in_sg(f"fresh-{i}") for i in range(5)), 120, "fresh writes to replicate after the loss")
    assert frozen.alive() and frozen.process.pid == pid  # type: ignore[union-attr]
    metrics = frozen.metrics()
    assert metric_sum(metrics, "replicatord_checkpoint_trimmed_total", pipeline="forwarder") >= 1
    log = frozen.log_path.read_text()
    lines = [line for line in log.splitlines() if "ERROR" in line and ("were lost" in line or "trimmed" in line)]
    assert lines, log[-3000:]
    # The operator learns which shard and from when: an ISO time in the line.
    assert any(re.search(r"written \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line) or "left the stream before" in line
               for line in lines), lines
    lost = sum(1 for i in range(10) if not in_sg(f"while-frozen-{i}"))
    print(f"\nfrozen past the retention: {lost} of 10 writes lost and reported ({len(lines)} error lines, "
          f"trimmed_total {metric_sum(metrics, 'replicatord_checkpoint_trimmed_total'):.0f}); fresh writes replicated")


def test_ttl_expiry_racing_a_newer_write_keeps_the_write_and_a_plain_expiry_deletes_both(regions: LocalRegions) -> None:
    regions.provision(tuning=TUNING)
    for region in REGIONS:
        regions.client("dynamodb", region).update_time_to_live(
            TableName=TABLES[region], TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"})
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(120)
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    expired = str(int(time.time()) - 3600)
    old_ts = Decimal(int(time.time()) - 7200)
    for i in range(10):
        ddb[CN].put_item(TableName=TABLES[CN], Item={
            "PK": {"S": f"ttl-{i}"}, "last_update_timestamp": {"N": str(old_ts)},
            "last_updater_region": {"S": CN}, "expires_at": {"N": expired}})
    _drained(regions)
    # Singapore rewrites five of them after they expired, while its daemon is down: the sweep in
    # Beijing runs before those writes can get there.
    assert daemons[SG].terminate() == 0
    newer = f"{time.time():.3f}"
    for i in range(5):
        ddb[SG].put_item(TableName=TABLES[SG], Item={
            "PK": {"S": f"ttl-{i}"}, "last_update_timestamp": {"N": newer}, "last_updater_region": {"S": SG},
            "expires_at": {"N": str(int(time.time()) + 86400)}, "rewritten": {"BOOL": True}})
    # The sweep comes later than the rewrites (hours or days after the expiry, on AWS): a delete
    # stamped with the sweep's time would beat them.
    wait_for(lambda: time.time() > float(newer) + 2.0, 10, "the sweep to come a little after the rewrites")
    assert regions.control(CN).ttl_sweep(TABLES[CN]) == 10
    assert regions.control(SG).ttl_sweep(TABLES[SG]) == 5  # Singapore's own five still expired
    daemons[SG] = regions.daemon(SG)
    daemons[SG].wait_ready(120)
    _drained(regions)
    assert_identical(regions, TABLES)
    kept = {i["PK"]["S"] for i in ddb[SG].scan(TableName=TABLES[SG])["Items"] if i["PK"]["S"].startswith("ttl-")}
    assert kept == {f"ttl-{i}" for i in range(5)}, kept  # the newer writes won in both regions
    assert metric_sum(daemons[CN].metrics(), "replicatord_ttl_deletes_total", action="replicated") == 10
    print(f"\nTTL racing newer writes: {len(kept)} of 5 kept in both regions; 5 plain expiries deleted in both")


def test_key_rotation_under_load_without_a_restart_and_no_secret_in_any_output(regions: LocalRegions) -> None:
    config = regions.provision(tuning=TUNING)
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(120)
    writers = [Writer(regions, r, f"rotation-{r}", per_s=20) for r in REGIONS]
    wait_for(lambda: metric_sum(daemons[CN].metrics(), "replicatord_records_forwarded_total") > 50, 60,
             "forwarding to be under way")
    new_secret = "rotated-secret-" + os.urandom(8).hex()
    # Beijing's daemon writes Singapore's stream with Singapore's key pair from Beijing's SSM:
    # store a new pair there, then revoke the old one at Singapore.
    RegionProvisioner(load_topology(config), CN, lambda _line: None).store_peer_credentials(
        SG, "AKIDROTATED", new_secret)
    regions.control(SG).revoke(peer_writer_key_pair(SG)[0])
    wait_for(lambda: metric_sum(daemons[CN].metrics(), "replicatord_peer_credentials_refreshed_total") >= 1, 60,
             "the daemon to take the new key pair")
    wait_for(lambda: metric_sum(daemons[CN].metrics(), "replicatord_records_forwarded_total", peer=SG) > 200, 60,
             "forwarding on the new pair")
    written = [w.stop() for w in writers]
    _drained(regions)
    diff = assert_identical(regions, TABLES)
    assert diff.counts[CN] == diff.counts[SG] == sum(map(len, written))
    assert regions.control(SG).stats()["faults"].get("revoked_key", 0) >= 1
    outputs = [d.log_path.read_text() for d in daemons.values()]
    outputs += ["\n".join(f"{k} {v}" for k, v in d.metrics().items()) for d in daemons.values()]
    for command in (("status", "--config", str(config)), ("check-config", "--config", str(config), "--region", CN)):
        result = cli(*command)
        outputs += [result.stdout, result.stderr]
    for secret in (peer_writer_key_pair(SG)[1], new_secret):
        assert not any(secret in text for text in outputs), "a secret key appeared in the output"
    print(f"\nkey rotation under load: {sum(map(len, written))} items converged, no restart, no secret in any output")


def test_a_stream_disabled_and_enabled_again_under_load_is_followed(regions: LocalRegions) -> None:
    regions.provision(tuning=TUNING)
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(120)
    ddb = regions.client("dynamodb", CN)
    first = Writer(regions, CN, "first-stream", per_s=40)
    wait_for(lambda: len(first.written) >= 400, 60, "400 writes on the first stream")
    first_written = first.stop()  # no writes while the stream is off: AWS would not record them
    old_arn = ddb.describe_table(TableName=TABLES[CN])["Table"]["LatestStreamArn"]
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": False})
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": True,
                                                                 "StreamViewType": "NEW_AND_OLD_IMAGES"})
    assert ddb.describe_table(TableName=TABLES[CN])["Table"]["LatestStreamArn"] != old_arn
    second = Writer(regions, CN, "second-stream", per_s=40)
    wait_for(lambda: len(second.written) >= 400, 60, "400 writes on the new stream")
    total = len(first_written) + len(second.stop())
    wait_for(lambda: count(regions, SG) == total, 180, "both streams' writes to reach Singapore")
    _drained(regions)
    diff = assert_identical(regions, TABLES)
    assert diff.counts == {CN: total, SG: total}
    log = daemons[CN].log_path.read_text()
    assert "has a new stream" in log and "read to its end; this pipeline stops" in log
    assert daemons[CN].get("/readyz")[0] == 200
    print(f"\nstream re-enabled under load: {total} items from two streams, identical; old stream retired")
