"""Integration: the CLI, provisioning, conditions and the applier against real emulator processes."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicatord.config import Conflict
from replicatord.conflict import DELETE, PUT, Version, decide_apply, mark_condition, put_condition, version_of
from replicatord.local.wan import running_link
from replicatord.local.world import REGIONS, metric_sum, scan_leases, wait_for
from replicatord.records import encode_record, partition_key
from tests.conftest import LocalRegions, cli, replication_put

pytestmark = pytest.mark.integration

CN, SG = REGIONS


def test_provision_is_idempotent_and_keeps_secrets_out_of_sight(regions: LocalRegions) -> None:
    config = str(regions.write_config())
    first = cli("provision", "--config", config)
    assert first.returncode == 0, first.stderr
    assert "created table user-cn (stream NEW_AND_OLD_IMAGES)" in first.stdout
    assert "created Kinesis stream ddb_replication_stream_sg" in first.stdout
    assert "created dead-letter queue ddbreplicatorcn" in first.stdout
    second = cli("provision", "--config", config)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "everything is in place: nothing to change"

    secret = "wJalrXUtnFEMI-not-a-real-secret"
    stored = cli("provision", "--config", config, "--store-peer-credentials", CN, SG, stdin=f"AKIDPEER\n{secret}\n")
    assert stored.returncode == 0, stored.stderr
    assert secret not in stored.stdout + stored.stderr
    ssm = regions.client("ssm", CN)
    param = ssm.get_parameter(Name="/DDBReplication/TableSG/SecretKey", WithDecryption=True)["Parameter"]
    assert (param["Type"], param["Value"]) == ("SecureString", secret)
    assert ssm.get_parameter(Name="/DDBReplication/TableSG/AccessKey")["Parameter"]["Type"] == "String"

    ddb = regions.client("dynamodb", SG)
    spec = ddb.describe_table(TableName="user-sg")["Table"]["StreamSpecification"]
    assert spec == {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    for table, pk in (("replicator_stats", "replicated_count"), ("loader_stats", "loaded_count")):
        assert ddb.get_item(TableName=table, Key={"PK": {"S": pk}})["Item"]["cnt"] == {"N": "0"}


CONFLICT = Conflict()
LOCAL_VERSIONS: list[tuple[str, str] | None] = [None, ("9", CN), ("10", CN), ("10", SG), ("11", SG)]
INCOMING = [Version(Decimal(ts), op, region) for ts in ("10", "10.0") for op in (PUT, DELETE) for region in REGIONS]


def test_dynamodb_conditions_agree_with_decide_apply(regions: LocalRegions) -> None:
    """The condition expressions, evaluated by the emulator, decide as the pure rule does."""
    regions.provision()
    ddb = regions.client("dynamodb", CN)
    n = 0
    for local in LOCAL_VERSIONS:
        for incoming in INCOMING:
            n += 1
            key = {"PK": {"S": f"case-{n}"}}
            local_item = None
            if local is not None:
                local_item = {**key, "last_update_timestamp": {"N": local[0]}, "last_updater_region": {"S": local[1]}}
                ddb.put_item(TableName="user-cn", Item=local_item)
            expected = decide_apply(version_of(local_item, CONFLICT), local is not None, incoming)
            build = put_condition if incoming.op == PUT else mark_condition
            cond = build(key, incoming, CONFLICT)
            kwargs: dict[str, Any] = {
                "TableName": "user-cn", "ConditionExpression": cond.expression,
                "ExpressionAttributeNames": cond.names, "ExpressionAttributeValues": cond.values,
            }
            try:
                if incoming.op == PUT:
                    image = {**key, "last_update_timestamp": {"N": str(incoming.timestamp)},
                             "last_updater_region": {"S": incoming.region}}
                    ddb.put_item(Item=image, **kwargs)
                else:
                    ddb.update_item(Key=key, UpdateExpression="SET #m = :m", **kwargs)
                applied = True
            except ddb.exceptions.ConditionalCheckFailedException:
                applied = False
            assert applied is expected, (local, incoming)


def test_undecodable_records_go_to_the_dead_letter_queue_and_the_pipeline_goes_on(regions: LocalRegions) -> None:
    regions.provision()
    daemon = regions.daemon(SG)
    daemon.wait_ready()
    kinesis = regions.client("kinesis", SG)
    bad = [b"{not json", json.dumps({"v": 1, "op": "PUT"}).encode(),
           encode_record(replication_put("k0", "5", CN, pair="other", v={"S": "x"}))]
    good = encode_record(replication_put("k1", "5", CN, v={"S": "x"}))
    kinesis.put_records(StreamName="ddb_replication_stream_sg", Records=[
        {"Data": data, "PartitionKey": str(i)} for i, data in enumerate([*bad, good])
    ])
    ddb = regions.client("dynamodb", SG)
    wait_for(lambda: "Item" in ddb.get_item(TableName="user-sg", Key={"PK": {"S": "k1"}}), 60,
             "the good record to be applied")
    sqs = regions.client("sqs", SG)
    url = sqs.get_queue_url(QueueName="ddbreplicatorsg")["QueueUrl"]
    messages: list[dict[str, Any]] = []

    def received_all() -> bool:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        messages.extend(json.loads(m["Body"]) for m in got)
        return len(messages) >= 3

    wait_for(received_all, 30, "three dead letters")
    assert {m["reason"] for m in messages} == {"bad_record"}
    details = " | ".join(m["detail"] for m in messages)
    assert "not JSON" in details and "missing field" in details and "pair 'other'" in details
    assert all(m["pipeline"] == "applier" and m["payload"] for m in messages)
    assert metric_sum(daemon.metrics(), "replicatord_dlq_sent_total", reason="bad_record") == 3
    assert daemon.alive()


def test_peer_outage_holds_records_until_the_link_is_back(regions: LocalRegions, tmp_path: Path) -> None:
    """The link to the peer goes down: nothing is lost, readiness says so, all arrives after."""
    regions.provision()
    sg_port = int(regions.endpoints[SG].rsplit(":", 1)[1])
    with running_link("127.0.0.1", sg_port, delay_ms=30, jitter_ms=10) as link:
        # The Beijing daemon reaches Singapore only through the WAN link.
        endpoints = {**regions.endpoints, SG: f"http://127.0.0.1:{link.port}"}
        from replicatord.local.world import DaemonProcess, topology_document, write_topology

        config = write_topology(tmp_path / "cn.yaml", topology_document(endpoints))
        cn = DaemonProcess(config, CN, tmp_path).start()
        regions.daemons.append(cn)
        cn.wait_ready()
        link.set_down(True)
        wait_for(lambda: metric_sum(cn.metrics(), "replicatord_peer_reachable", peer=SG) == 0, 60,
                 "the peer to be reported unreachable")
        # Not a reason to be taken out of service: every instance of the region sees the same.
        status, text = cn.get("/readyz")
        assert status == 200 and "peer unreachable: ap-southeast-1" in text
        ddb = regions.client("dynamodb", CN)
        for i in range(50):
            ddb.put_item(TableName="user-cn", Item={
                "PK": {"S": f"outage-{i}"}, "last_update_timestamp": {"N": f"{time.time():.3f}"},
                "last_updater_region": {"S": CN},
            })
        wait_for(lambda: metric_sum(cn.metrics(), "replicatord_errors_total", pipeline="forwarder") > 0, 60,
                 "the forwarder to notice the outage")
        link.set_down(False)
        kinesis = regions.client("kinesis", SG)

        def all_arrived() -> bool:
            shard = kinesis.list_shards(StreamName="ddb_replication_stream_sg")["Shards"][0]["ShardId"]
            it = kinesis.get_shard_iterator(StreamName="ddb_replication_stream_sg", ShardId=shard,
                                            ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            keys = {json.loads(r["Data"])["keys"]["PK"]["S"] for r in kinesis.get_records(ShardIterator=it)["Records"]}
            return keys >= {f"outage-{i}" for i in range(50)}

        wait_for(all_arrived, 120, "every record to reach Singapore's stream after the outage")
        wait_for(lambda: metric_sum(cn.metrics(), "replicatord_peer_reachable", peer=SG) == 1, 60,
                 "the peer to be reachable again")
        assert cn.terminate() == 0


def test_partition_keys_keep_an_item_on_one_shard() -> None:
    a = partition_key({"PK": {"S": "x"}, "SK": {"N": "1"}})
    b = partition_key({"SK": {"N": "1"}, "PK": {"S": "x"}})
    assert a == b and len(a) <= 256


def test_sigterm_with_a_hung_peer_exits_within_the_drain_bound_and_releases_leases(
    regions: LocalRegions, tmp_path: Path
) -> None:
    """The peer accepts connections and never answers: shutdown is still bounded, leases released."""
    import socket

    from replicatord.local.world import DaemonProcess, topology_document, write_topology

    regions.provision()
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)  # never accepted: requests hang until the client gives up
        port = black_hole.getsockname()[1]
        endpoints = {**regions.endpoints, SG: f"http://127.0.0.1:{port}"}
        doc = topology_document(endpoints, tuning={"drain_timeout_s": 2, "aws_timeout_s": 30})
        config = write_topology(tmp_path / "cn.yaml", doc)
        cn = DaemonProcess(config, CN, tmp_path).start()
        regions.daemons.append(cn)
        wait_for(lambda: cn.get("/healthz")[0] == 200, 60, "the daemon to start")
        ddb = regions.client("dynamodb", CN)
        ddb.put_item(TableName="user-cn", Item={
            "PK": {"S": "stuck"}, "last_update_timestamp": {"N": "1"}, "last_updater_region": {"S": CN},
        })
        wait_for(lambda: metric_sum(cn.metrics(), "replicatord_records_read_total", pipeline="forwarder") >= 1, 60,
                 "the forwarder to hold the record")
        started = time.monotonic()
        assert cn.terminate(timeout_s=60) == 0
        elapsed = time.monotonic() - started
    # 2 s of drain, then cancellation and a bounded lease release; the hung call alone is 30 s.
    assert elapsed < 15, elapsed
    leases = scan_leases(ddb)
    assert leases and all(lease.owner is None for lease in leases if lease.state == "active"), leases
    assert "drain took longer than 2s" in cn.log_path.read_text()


def test_provision_copies_a_0_1_lease_table_and_the_daemon_refuses_the_old_layout(regions: LocalRegions) -> None:
    ddb = regions.client("dynamodb", CN)
    ddb.create_table(TableName="replicatord_leases", BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "lease_key", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "lease_key", "AttributeType": "S"}])
    ddb.put_item(TableName="replicatord_leases", Item={
        "lease_key": {"S": "forwarder/user-cn@2026-01-01T00:00:00/shardId-1"}, "owner": {"S": "old-host-1"},
        "counter": {"N": "5"}, "checkpoint": {"S": "42"}, "state": {"S": "active"}})
    config = str(regions.write_config())
    result = cli("provision", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "copied 1 leases (checkpoints) from replicatord_leases into replicatord_leases_v2" in result.stdout
    (lease,) = scan_leases(ddb)
    assert (lease.key, lease.owner, lease.checkpoint, lease.counter) == (
        "forwarder/user-cn@2026-01-01T00:00:00/shardId-1", None, "42", 5)

    doc = yaml.safe_load(Path(config).read_text())
    doc["regions"][CN]["lease_table"] = "replicatord_leases"  # a topology written for 0.1
    old_config = Path(config).with_name("old.yaml")
    old_config.write_text(yaml.safe_dump(doc))
    run = cli("run", "--config", str(old_config), "--region", CN, "--metrics-listen", "127.0.0.1:0")
    assert run.returncode == 4
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: lease table 'replicatord_leases' in cn-north-1 has the layout of replicatord 0.1"), run.stderr


def test_initial_position_latest_skips_what_was_written_before_the_first_start(regions: LocalRegions) -> None:
    regions.provision(tuning={"initial_position": "latest"})
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}

    def put(pk: str) -> None:
        ddb[CN].put_item(TableName="user-cn", Item={
            "PK": {"S": pk}, "last_update_timestamp": {"N": f"{time.time():.3f}"}, "last_updater_region": {"S": CN}})

    for i in range(5):
        put(f"history-{i}")
    for region in REGIONS:
        regions.daemon(region).wait_ready()
    wait_for(lambda: bool(scan_leases(ddb[CN])), 30, "the forwarder's leases")
    for i in range(5):
        put(f"new-{i}")
    wait_for(lambda: all("Item" in ddb[SG].get_item(TableName="user-sg", Key={"PK": {"S": f"new-{i}"}})
                         for i in range(5)), 120, "the new writes to replicate")
    assert not any("Item" in ddb[SG].get_item(TableName="user-sg", Key={"PK": {"S": f"history-{i}"}})
                   for i in range(5))
