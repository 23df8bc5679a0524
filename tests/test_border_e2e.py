"""End to end, what only AWS would show (issue 16): a border that goes silent behind squid, a
clock AWS refuses, a peer key stored as a SecureString, a stream disabled and enabled again while
the daemons are stopped, a re-enabled stream of the wrong view type, and the preflight of a host
whose policy lacks an action. docs/aws-behaviour.md and docs/streams.md say what AWS does.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from replicatord.config import load_topology
from replicatord.iam import Accounts, identity_files, policies
from replicatord.local.iam_recorder import account_id
from replicatord.local.squid import Squid
from replicatord.local.wan import running_link
from replicatord.local.world import (
    REGIONS,
    DaemonProcess,
    instance_key_pair,
    local_env,
    metric_sum,
    topology_document,
    wait_drained,
    wait_for,
    write_topology,
)
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning
from tests.test_e2e import TABLES

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
DEADLINE_S = 3.0
TUNING = quick_tuning(aws_timeout_s=DEADLINE_S, peer_credentials_refresh_s=1)


def put(regions: LocalRegions, region: str, pk: str, ts: float | None = None) -> None:
    regions.client("dynamodb", region).put_item(TableName=TABLES[region], Item={
        "PK": {"S": pk}, "last_update_timestamp": {"N": f"{ts or time.time():.3f}"},
        "last_updater_region": {"S": region}})


def present(regions: LocalRegions, region: str, pks: list[str]) -> bool:
    ddb = regions.client("dynamodb", region)
    return all("Item" in ddb.get_item(TableName=TABLES[region], Key={"PK": {"S": pk}}, ConsistentRead=True)
               for pk in pks)


def drained(regions: LocalRegions) -> None:
    pipelines = {r: [(TABLES[r], f"ddb_replication_stream_{'cn' if r == CN else 'sg'}")] for r in REGIONS}
    wait_drained(regions.client, pipelines, 180)


def test_a_silent_border_behind_squid_is_reported_within_twice_the_deadline_and_loses_nothing(
        tls_regions: LocalRegions, squid: Squid, tmp_path: Path) -> None:
    """Beijing reaches Singapore over https through squid (CONNECT) and a WAN link that then
    accepts connections and answers nothing, and cuts nothing: the way a border usually fails."""
    regions = tls_regions
    regions.provision(tuning=TUNING, proxies={CN: squid.url, SG: squid.url})
    sg_port = int(regions.endpoints[SG].rsplit(":", 1)[1])
    with running_link("127.0.0.1", sg_port) as link:
        endpoints = {**regions.endpoints, SG: f"https://127.0.0.1:{link.port}"}
        cn_config = write_topology(tmp_path / "cn.yaml", topology_document(
            endpoints, proxies={CN: squid.url, SG: squid.url}, tuning=TUNING))
        cn = DaemonProcess(cn_config, CN, tmp_path).start()
        regions.daemons.append(cn)
        sg = regions.daemon(SG)
        cn.wait_ready(60)
        sg.wait_ready(60)
        pid = cn.process.pid  # type: ignore[union-attr]
        for i in range(10):
            put(regions, CN, f"before-{i}")
        wait_for(lambda: present(regions, SG, [f"before-{i}" for i in range(10)]), 60, "the first writes to cross")

        link.set_blackhole(True)
        silent_at = time.monotonic()
        wait_for(lambda: metric_sum(cn.metrics(), "replicatord_peer_reachable", peer=SG) == 0, 30,
                 "the peer to be reported unreachable", interval_s=0.05)
        reported_s = time.monotonic() - silent_at
        for i in range(30):
            put(regions, CN, f"during-{i}")
        for i in range(20):  # the other direction is unaffected
            put(regions, SG, f"other-way-{i}")
        wait_for(lambda: present(regions, CN, [f"other-way-{i}" for i in range(20)]), 30,
                 "Singapore's writes to reach Beijing while Beijing's way out is silent")
        # Long enough for several PutRecords to hang and be cut at their deadline.
        wait_for(lambda: metric_sum(cn.metrics(), "replicatord_errors_total", pipeline="forwarder",
                                    type="unreachable") >= 3, 60, "calls into the silence to end at their deadline")
        link.set_blackhole(False)
        open_at = time.monotonic()
        wait_for(lambda: present(regions, SG, [f"during-{i}" for i in range(30)]), 60,
                 "what was written during the outage to cross")
        caught_up_s = time.monotonic() - open_at
        drained(regions)
    assert_identical(regions, TABLES)
    assert cn.alive() and cn.process.pid == pid  # type: ignore[union-attr]
    assert reported_s <= 2 * DEADLINE_S + 1.0, reported_s  # +1 s: the metrics poll and scheduling
    # No call waited longer than its deadline (the histogram's 5 s bucket holds every call).
    metrics = cn.metrics()
    slow = metric_sum(metrics, "replicatord_aws_request_duration_seconds_count") - metric_sum(
        metrics, "replicatord_aws_request_duration_seconds_bucket", le="5.0")
    assert slow == 0, f"{slow} calls took longer than 5 s"
    assert any("CONNECT" in line for line in squid.requests()), squid.requests()[-5:]
    print(f"\nsilent border behind squid (https, CONNECT): unreachable reported after {reported_s:.1f}s "
          f"(deadline {DEADLINE_S:.0f}s); the other way unaffected; caught up {caught_up_s:.1f}s after it "
          f"answered again; same process")


def test_a_clock_aws_refuses_is_clock_skew_not_a_bad_key_and_nothing_is_dead_lettered(regions: LocalRegions) -> None:
    """Singapore's clock runs 10 minutes ahead of Beijing's host: Kinesis refuses signatures
    5 minutes off. The forwarder waits it out, says so once, never re-reads the key pair nor
    dead-letters a record; once the clocks agree, everything crosses."""
    regions.provision(tuning=TUNING)
    cn = regions.daemon(CN)
    cn.wait_ready(60)
    regions.control(SG).behaviour(clock_offset_s=600)
    for i in range(20):
        put(regions, CN, f"skewed-{i}")
    wait_for(lambda: metric_sum(cn.metrics(), "replicatord_errors_total", type="clock_skew") >= 3, 60,
             "the refusals to be seen as clock skew")
    metrics = cn.metrics()
    assert metric_sum(metrics, "replicatord_clock_skew_seconds", region=SG) == pytest.approx(600, abs=3)
    assert metric_sum(metrics, "replicatord_dlq_sent_total") == 0
    assert metric_sum(metrics, "replicatord_peer_credentials_refreshed_total") == 0
    regions.control(SG).behaviour(clock_offset_s=0)
    sg = regions.daemon(SG)
    sg.wait_ready(60)
    wait_for(lambda: present(regions, SG, [f"skewed-{i}" for i in range(20)]), 90, "the writes to cross")
    lines = [line for line in cn.log_path.read_text().splitlines() if "clock skew" in line]
    assert len(lines) == 1 and re.search(r"\(ap-southeast-1\).*\+(599|60[0-2])s", lines[0]), lines
    assert metric_sum(cn.metrics(), "replicatord_dlq_sent_total") == 0
    print(f"\nclock 10 min off: {lines[0].split('clock skew: ', 1)[1][:120]}...; nothing dead-lettered")


def test_an_access_key_stored_as_a_secure_string_works(regions: LocalRegions) -> None:
    """Both halves of the peer's key pair in SSM as SecureStrings (as many operators store them)."""
    regions.provision(tuning=TUNING)
    ssm = regions.client("ssm", CN)
    name = "/DDBReplication/TableSG/AccessKey"
    value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    ssm.put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=True)
    # Singapore knows the peer writer's key and no other: a ciphertext used as a key id is refused.
    refuse_unknown_keys(regions, SG)
    daemons = [regions.daemon(r) for r in REGIONS]
    for daemon in daemons:
        daemon.wait_ready(60)
    for i in range(10):
        put(regions, CN, f"secure-{i}")
    wait_for(lambda: present(regions, SG, [f"secure-{i}" for i in range(10)]), 60, "the writes to cross")
    assert metric_sum(daemons[0].metrics(), "replicatord_peer_reachable", peer=SG) == 1


def refuse_unknown_keys(regions: LocalRegions, region: str) -> None:
    """`region` enforces the generated policies of the local world's identities, and refuses any
    other key but the tests' own, as AWS refuses an access key it does not know."""
    assert regions.config is not None
    topology = load_topology(regions.config)
    documents = policies(topology, Accounts({r: account_id() for r in topology.regions}))
    files = identity_files(topology)
    from replicatord.local.world import OPERATOR_KEY_PAIR, peer_writer_key_pair

    enforced = {instance_key_pair(r)[0]: documents[files["daemon", r]] for r in topology.regions}
    enforced |= {peer_writer_key_pair(r)[0]: documents[files["peer-writer", r]] for r in topology.regions}
    enforced[OPERATOR_KEY_PAIR[0]] = documents[files["operator", region]]
    regions.control(region).behaviour(iam_policies=enforced, iam_known_keys_only=True)


def test_a_stream_disabled_and_enabled_again_while_the_daemons_are_stopped_loses_nothing(regions: LocalRegions) -> None:
    """Beijing's daemon is stopped with records of its stream unread; the stream is disabled and
    enabled again; more is written to the new one. It starts (at `latest`, which must not apply to
    a stream new since its last run) and both streams' records reach Singapore."""
    regions.provision(tuning={**TUNING, "initial_position": "latest"})
    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(60)
    for i in range(20):
        put(regions, CN, f"read-{i}")
    wait_for(lambda: present(regions, SG, [f"read-{i}" for i in range(20)]), 60, "the first writes to cross")
    assert daemons[CN].terminate() == 0
    for i in range(30):
        put(regions, CN, f"unread-{i}")
    ddb = regions.client("dynamodb", CN)
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": False})
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": True,
                                                                 "StreamViewType": "NEW_AND_OLD_IMAGES"})
    for i in range(30):
        put(regions, CN, f"new-stream-{i}")
    daemons[CN] = regions.daemon(CN)
    daemons[CN].wait_ready(60)
    wanted = [f"unread-{i}" for i in range(30)] + [f"new-stream-{i}" for i in range(30)]
    wait_for(lambda: present(regions, SG, wanted), 90, "both streams' records to reach Singapore")
    drained(regions)
    assert_identical(regions, TABLES)
    log = daemons[CN].log_path.read_text()
    assert re.search(r"older stream \S+ of table user-cn was being read: reading what is left of it to its end",
                     log), log[-2000:]


def test_a_stream_enabled_again_as_keys_only_is_a_problem_in_readiness_and_metrics(regions: LocalRegions) -> None:
    regions.provision(tuning=TUNING)
    cn = regions.daemon(CN)
    cn.wait_ready(60)
    ddb = regions.client("dynamodb", CN)
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": False})
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"})
    wait_for(lambda: cn.get("/readyz")[0] == 503, 30, "readiness to name the problem")
    status, text = cn.get("/readyz")
    assert "view type KEYS_ONLY" in text and "NEW_AND_OLD_IMAGES" in text, text
    assert metric_sum(cn.metrics(), "replicatord_stream_problem", pair="user") == 1
    assert any("ERROR" in line and "KEYS_ONLY" in line for line in cn.log_path.read_text().splitlines())
    # Fixed as the error says: the stream is followed again, and what is written now crosses.
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": False})
    ddb.update_table(TableName=TABLES[CN], StreamSpecification={"StreamEnabled": True,
                                                                 "StreamViewType": "NEW_AND_OLD_IMAGES"})
    wait_for(lambda: cn.get("/readyz")[0] == 200, 30, "readiness once the stream is right")
    assert metric_sum(cn.metrics(), "replicatord_stream_problem", pair="user") == 0
    sg = regions.daemon(SG)
    sg.wait_ready(60)
    for i in range(10):
        put(regions, CN, f"after-fix-{i}")
    wait_for(lambda: present(regions, SG, [f"after-fix-{i}" for i in range(10)]), 60, "new writes to cross")


def test_the_preflight_names_the_refused_call_and_the_statement_to_add(regions: LocalRegions) -> None:
    config = regions.provision(tuning=TUNING)
    topology = load_topology(config)
    documents = policies(topology, Accounts({r: account_id() for r in topology.regions}))
    policy = documents[identity_files(topology)["daemon", CN]]
    key = instance_key_pair(CN)
    env = local_env(key)
    allowed = cli("preflight", "--config", str(config), "--region", CN, env=env)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    lacking = {**policy, "Statement": [
        {**s, "Action": [a for a in s["Action"] if a != "sqs:GetQueueAttributes"]} for s in policy["Statement"]]}
    regions.control(CN).behaviour(iam_policies={key[0]: lacking})
    refused = cli("preflight", "--config", str(config), "--region", CN, env=env)
    assert refused.returncode == 5, refused.stdout + refused.stderr
    rows = [line for line in refused.stdout.splitlines() if "REFUSED" in line]
    assert len(rows) == 1 and rows[0].startswith("sqs:GetQueueAttributes"), refused.stdout
    assert '"sqs:GetQueueAttributes"' in refused.stdout and ":ddbreplicatorcn" in refused.stdout
    print("\n" + refused.stdout)
