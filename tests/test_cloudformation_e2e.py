"""End to end: the CloudFormation templates of `provision --template-dir` deployed into the local
regions through their CloudFormation API (moto's), and the two daemons replicating a load both
ways on what the stacks created, under the IAM policies the stacks deployed.

What moto's CloudFormation (5.2.5) does with the templates, read in moto/*/models.py and
moto/cloudformation/parsing.py, and what this test checks therefore:
- AWS::DynamoDB::Table: KeySchema, AttributeDefinitions, BillingMode and StreamSpecification are
  honoured (checked); TimeToLiveSpecification is ignored: the tombstone table's TTL stays DISABLED
  (not checked here; tests/unit/test_cloudformation.py checks the template has it).
- AWS::Kinesis::Stream: ShardCount and RetentionPeriodHours honoured (checked, with a parameter
  given to one stack).
- AWS::SQS::Queue: MessageRetentionPeriod and MaximumMessageSize honoured (checked).
- AWS::IAM::Role (Policies), InstanceProfile, User, Policy (Users), ManagedPolicy: created, and
  their documents read back and compared with iam.py's. Two moto quirks: `AWS::Partition` is
  "aws" in every region (so the Chinese stack's ARNs say arn:aws:), and a role's inline policy
  from CloudFormation is stored as the Python repr of the document, not JSON. moto's own IAM is
  not enforced; the local regions enforce, per access key, the documents read back from the
  stacks (the partition put right), so the daemons run with exactly what CloudFormation deployed.
- Rules (the template's region assertion) are not evaluated by moto.
"""

from __future__ import annotations

import ast
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from replicatord.config import Topology, load_topology, partition_of
from replicatord.iam import Accounts, daemon_policy, operator_policy, peer_writer_policy
from replicatord.local.compare import scan_items
from replicatord.local.iam_recorder import account_id
from replicatord.local.load import load
from replicatord.local.world import (
    OPERATOR_KEY_PAIR,
    REGIONS,
    acting_as,
    instance_key_pair,
    metric_sum,
    peer_writer_key_pair,
    wait_drained,
    wait_for,
)
from replicatord.ops.provision import RegionProvisioner
from tests.conftest import LocalRegions, assert_identical, cli, quick_tuning

pytestmark = pytest.mark.e2e

CN, SG = REGIONS
TABLES = {CN: "user-cn", SG: "user-sg"}
STREAMS = {CN: "ddb_replication_stream_cn", SG: "ddb_replication_stream_sg"}
OUTBOXES = {CN: "ddb_replication_stream_sg-outbox-cn-north-1", SG: "ddb_replication_stream_cn-outbox-ap-southeast-1"}
STACK = "replicatord"
# Given to Singapore's stack: the parameter reaches the outbox.
PARAMETERS = {CN: {}, SG: {"OutboxRetentionHours": "200"}}
EACH = 300  # items loaded into each region
DELETES = 10  # of its own items, deleted in each region after the load
DRAIN_S = 180


def deploy(regions: LocalRegions, region: str, template: str, parameters: dict[str, str]) -> dict[str, str]:
    """Create the stack and wait for CREATE_COMPLETE; its outputs."""
    cfn = regions.client("cloudformation", region)
    cfn.create_stack(StackName=STACK, TemplateBody=template, Capabilities=["CAPABILITY_NAMED_IAM"],
                     Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()])
    cfn.get_waiter("stack_create_complete").wait(StackName=STACK, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    stack = cfn.describe_stacks(StackName=STACK)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def check_resources(regions: LocalRegions, topology: Topology) -> None:
    """What the stacks created, where moto honours the template's properties."""
    for region in REGIONS:
        me = topology.regions[region]
        ddb = regions.client("dynamodb", region)
        keys = {TABLES[region]: ["PK"], me.stats_table: ["PK"], me.loader_stats_table: ["PK"],
                me.lease_table: ["stream_id", "shard_id"], me.tombstone_table: ["tomb_key"]}
        assert sorted(ddb.list_tables()["TableNames"]) == sorted(keys)
        for table, key in keys.items():
            desc = ddb.describe_table(TableName=table)["Table"]
            assert [k["AttributeName"] for k in desc["KeySchema"]] == key, table
            assert desc["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST", table
            stream = desc.get("StreamSpecification") or {}
            wanted = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"} if table == TABLES[region] else {}
            assert stream == wanted, table
        kinesis = regions.client("kinesis", region)
        outbox_hours = int(PARAMETERS[region].get("OutboxRetentionHours", 168))
        for stream, hours in ((STREAMS[region], 24), (OUTBOXES[region], outbox_hours)):
            summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
            assert (summary["RetentionPeriodHours"], summary["OpenShardCount"]) == (hours, 1), stream
        sqs = regions.client("sqs", region)
        url = sqs.get_queue_url(QueueName=me.dead_letter_queue)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert (attributes["MessageRetentionPeriod"], attributes["MaximumMessageSize"]) == ("1209600", "262144")


def document(value: Any) -> dict[str, Any]:
    """A policy document as moto's IAM gives it back: a dict, a JSON text, or (a role's inline
    policy created by CloudFormation) the Python repr of a dict."""
    if isinstance(value, dict):
        return value
    try:
        parsed: dict[str, Any] = json.loads(value)
    except ValueError:
        parsed = ast.literal_eval(value)
    return parsed


def as_aws_would(policy: dict[str, Any], region: str) -> dict[str, Any]:
    """The ARNs in `region`'s partition, as AWS resolves `${AWS::Partition}` (moto: "aws" everywhere)."""
    partition = partition_of(region)
    resolved: dict[str, Any] = json.loads(json.dumps(policy).replace('"arn:aws:', f'"arn:{partition}:'))
    return resolved


def deployed_policies(regions: LocalRegions, outputs: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per region, the documents of the stack's identities (by kind), read back from IAM."""
    found: dict[str, dict[str, Any]] = {}
    for region in REGIONS:
        iam = regions.client("iam", region)
        profile = iam.get_instance_profile(InstanceProfileName=outputs[region]["InstanceProfileName"])
        [role] = profile["InstanceProfile"]["Roles"]
        assert role["Arn"] == outputs[region]["InstanceRoleArn"]
        assert json.dumps(role["AssumeRolePolicyDocument"]).count("ec2.amazonaws.com") == 1
        [name] = iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]
        daemon = document(iam.get_role_policy(RoleName=role["RoleName"], PolicyName=name)["PolicyDocument"])
        user = outputs[region]["PeerWriterUserName"]
        assert iam.get_user(UserName=user)["User"]["Arn"] == outputs[region]["PeerWriterUserArn"]
        assert user == f"replicatord-peer-writer-{region}"
        [name] = iam.list_user_policies(UserName=user)["PolicyNames"]
        writer = document(iam.get_user_policy(UserName=user, PolicyName=name)["PolicyDocument"])
        arn = outputs[region]["OperatorPolicyArn"]
        version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
        operator = document(iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"])
        found[region] = {kind: as_aws_would(policy, region)
                         for kind, policy in (("daemon", daemon), ("peer-writer", writer), ("operator", operator))}
    return found


def enforce(regions: LocalRegions, deployed: dict[str, dict[str, Any]]) -> None:
    """Each region refuses every key but the identities' (and the tests' own) what the deployed
    documents do not allow, as AWS would."""
    for region in REGIONS:
        policies = {instance_key_pair(r)[0]: deployed[r]["daemon"] for r in REGIONS}
        policies |= {peer_writer_key_pair(r)[0]: deployed[r]["peer-writer"] for r in REGIONS}
        policies[OPERATOR_KEY_PAIR[0]] = deployed[region]["operator"]
        regions.control(region).behaviour(iam_policies=policies, iam_known_keys_only=True)


def load_both_ways(regions: LocalRegions) -> None:
    errors: list[BaseException] = []

    def run(region: str) -> None:
        try:
            load(TABLES[region], region, EACH, batched=True, processes=1, endpoint_url=regions.endpoints[region])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in REGIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors


def test_the_generated_templates_deploy_and_the_daemons_converge_on_what_they_created(
        regions: LocalRegions, tmp_path: Path) -> None:
    started = time.monotonic()
    config = regions.write_config(tuning=quick_tuning())
    topology = load_topology(config)
    # The operator's command: one template per region, and nothing created.
    written = cli("provision", "--config", str(config), "--template-dir", str(tmp_path / "cfn"))
    assert written.returncode == 0, written.stderr
    assert not any(regions.client("dynamodb", r).list_tables()["TableNames"] for r in REGIONS)

    outputs = {r: deploy(regions, r, (tmp_path / "cfn" / f"{r}.yaml").read_text(), PARAMETERS[r]) for r in REGIONS}
    deployed_s = time.monotonic() - started
    check_resources(regions, topology)
    deployed = deployed_policies(regions, outputs)
    accounts = Accounts(dict.fromkeys(REGIONS, account_id()))
    for region in REGIONS:
        assert deployed[region] == {"daemon": daemon_policy(topology, region, accounts),
                                    "peer-writer": peer_writer_policy(topology, region, accounts),
                                    "operator": operator_policy(topology, region, accounts)}, region
    enforce(regions, deployed)

    # The key pairs CloudFormation does not store: as provision_local (and an operator) does.
    with acting_as(OPERATOR_KEY_PAIR):
        for region in REGIONS:
            for peer in REGIONS:
                if partition_of(peer) != partition_of(region):
                    RegionProvisioner(topology, region, lambda _line: None).store_peer_credentials(
                        peer, *peer_writer_key_pair(peer))

    daemons = {r: regions.daemon(r) for r in REGIONS}
    for daemon in daemons.values():
        daemon.wait_ready(60)
    load_both_ways(regions)
    pipelines = {r: [(TABLES[r], STREAMS[r])] for r in REGIONS}
    wait_drained(regions.client, pipelines, DRAIN_S)
    ddb = {r: regions.client("dynamodb", r) for r in REGIONS}
    deleted = []
    for region in REGIONS:
        items = scan_items(ddb[region], TABLES[region])[1]
        own = sorted(k for k, item in items.items() if item["last_updater_region"]["S"] == region)[:DELETES]
        for item_key in own:
            ddb[region].delete_item(TableName=TABLES[region], Key={"PK": items[item_key]["PK"]})
            deleted.append(items[item_key]["PK"])

    def gone() -> bool:
        return all("Item" not in ddb[r].get_item(TableName=TABLES[r], Key={"PK": pk})
                   for r in REGIONS for pk in deleted)

    wait_for(gone, DRAIN_S, "the deletes to reach the other region")
    wait_drained(regions.client, pipelines, DRAIN_S)
    assert_identical(regions, TABLES, counts=2 * EACH - len(REGIONS) * DELETES)
    for region, daemon in daemons.items():
        assert daemon.alive(), daemon.log_tail()
        assert metric_sum(daemon.metrics(), "replicatord_dlq_sent_total") == 0, region
        assert regions.control(region).stats()["faults"].get("iam_denied", 0) == 0, region
    print(f"\nCloudFormation: both stacks CREATE_COMPLETE {deployed_s:.1f}s after the start; "
          f"{2 * EACH} items and {len(deleted)} deletes converged in {time.monotonic() - started:.1f}s")
