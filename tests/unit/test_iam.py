"""IAM: the policy evaluator, and the least-privilege policies generated from the topology.

The generated policies are judged by what they allow (the calls each identity makes, written out
here as literal ARNs, not built with the generator's own helpers) and what they refuse, by
parliament's linter, and against the committed files in config/iam/.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicatord import cli
from replicatord.config import Topology, parse_topology
from replicatord.iam import (
    Accounts,
    Call,
    PolicyError,
    allows,
    daemon_policy,
    decide,
    identity_files,
    operator_policy,
    peer_writer_policy,
    policies,
    policy_text,
    statement_for,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "replicatord.example.yaml"
IAM_DIR = ROOT / "config" / "iam"
REGENERATE = "replicatord iam --config config/replicatord.example.yaml --out config/iam"
CN, SG, CNW = "cn-north-1", "ap-southeast-1", "cn-northwest-1"

# The example topology's resources, with the placeholder accounts.
CN_DDB = "arn:aws-cn:dynamodb:cn-north-1:444455556666:table/"
SG_DDB = "arn:aws:dynamodb:ap-southeast-1:111122223333:table/"
CN_KINESIS = "arn:aws-cn:kinesis:cn-north-1:444455556666:stream/"
SG_KINESIS = "arn:aws:kinesis:ap-southeast-1:111122223333:stream/"
CN_SQS = "arn:aws-cn:sqs:cn-north-1:444455556666:"
CN_SSM = "arn:aws-cn:ssm:cn-north-1:444455556666:parameter"
CN_KEY = "arn:aws-cn:kms:cn-north-1:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab"
STREAM_LABEL = "/stream/2024-05-01T00:00:00.000"


def example() -> Topology:
    return parse_topology(EXAMPLE.read_text(), str(EXAMPLE))


def policy(statements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": statements}


def allow(action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def via_ssm(region: str, parameter: str, endpoint: str | None = None) -> tuple[tuple[str, str], ...]:
    """The context SSM's kms:Decrypt carries for a SecureString read."""
    return (("kms:ViaService", endpoint or f"ssm.{region}.amazonaws.com"),
            ("kms:EncryptionContext:PARAMETER_ARN", parameter))


# --- the evaluator ------------------------------------------------------------------------------

TABLE = CN_DDB + "user-cn"


def test_a_matching_allow_allows_and_nothing_matching_is_an_implicit_deny() -> None:
    doc = policy([allow("dynamodb:GetItem", TABLE)])
    assert decide([doc], Call("dynamodb:GetItem", TABLE)) == "allow"
    assert decide([doc], Call("dynamodb:PutItem", TABLE)) == "implicit_deny"
    assert decide([doc], Call("dynamodb:GetItem", TABLE + "-other")) == "implicit_deny"
    assert decide([], Call("dynamodb:GetItem", TABLE)) == "implicit_deny"


def test_an_explicit_deny_wins_over_any_allow_in_any_document() -> None:
    allowing = policy([allow("dynamodb:*", "*")])
    denying = policy([{"Effect": "Deny", "Action": "dynamodb:DeleteItem", "Resource": TABLE}])
    assert decide([allowing, denying], Call("dynamodb:DeleteItem", TABLE)) == "deny"
    assert decide([denying, allowing], Call("dynamodb:DeleteItem", TABLE)) == "deny"
    assert decide([allowing, denying], Call("dynamodb:GetItem", TABLE)) == "allow"
    assert not allows([allowing, denying], Call("dynamodb:DeleteItem", TABLE))


def test_actions_match_case_insensitively_with_wildcards() -> None:
    doc = policy([allow("DynamoDB:Get*", TABLE), allow("sqs:?etQueueUrl", "*")])
    assert allows(doc, Call("dynamodb:GetItem", TABLE))
    assert allows(doc, Call("dynamodb:getsharditerator", TABLE))
    assert allows(doc, Call("sqs:GetQueueUrl", "*"))
    assert not allows(doc, Call("dynamodb:BatchGetItem", TABLE))


def test_resources_match_case_sensitively_with_wildcards() -> None:
    doc = policy([allow("dynamodb:GetRecords", CN_DDB + "user-*/stream/*")])
    assert allows(doc, Call("dynamodb:GetRecords", CN_DDB + "user-cn" + STREAM_LABEL))
    assert not allows(doc, Call("dynamodb:GetRecords", CN_DDB + "User-cn" + STREAM_LABEL))
    assert not allows(doc, Call("dynamodb:GetRecords", CN_DDB.upper() + "user-cn" + STREAM_LABEL))


def test_not_action_and_not_resource_match_everything_else() -> None:
    doc = policy([
        {"Effect": "Allow", "NotAction": "dynamodb:Delete*", "Resource": TABLE},
        {"Effect": "Allow", "Action": "sqs:SendMessage", "NotResource": CN_SQS + "secret-*"},
    ])
    assert allows(doc, Call("dynamodb:PutItem", TABLE))
    assert not allows(doc, Call("dynamodb:DeleteItem", TABLE))
    assert not allows(doc, Call("dynamodb:PutItem", CN_DDB + "other"))
    assert allows(doc, Call("sqs:SendMessage", CN_SQS + "ddbreplicatorcn"))
    assert not allows(doc, Call("sqs:SendMessage", CN_SQS + "secret-queue"))


def test_string_equals_and_string_like_conditions() -> None:
    doc = policy([allow("kms:Decrypt", "*", Condition={
        "StringEquals": {"kms:ViaService": ["ssm.cn-north-1.amazonaws.com", "ssm.cn-north-1.amazonaws.com.cn"]},
        "StringLike": {"kms:EncryptionContext:PARAMETER_ARN": CN_SSM + "/DDBReplication/*"},
    })])
    param = CN_SSM + "/DDBReplication/TableSG/SecretKey"
    assert allows(doc, Call("kms:Decrypt", CN_KEY, via_ssm(CN, param)))
    assert allows(doc, Call("kms:Decrypt", CN_KEY, via_ssm(CN, param, "ssm.cn-north-1.amazonaws.com.cn")))
    # Every operator must hold; values are compared exactly (StringEquals) or as a glob (StringLike).
    assert not allows(doc, Call("kms:Decrypt", CN_KEY, via_ssm(CN, param, "SSM.cn-north-1.amazonaws.com")))
    assert not allows(doc, Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SSM + "/Other/SecretKey")))
    assert not allows(doc, Call("kms:Decrypt", CN_KEY, (("kms:EncryptionContext:PARAMETER_ARN", param),)))


def test_if_exists_matches_a_missing_key_and_the_plain_operator_does_not() -> None:
    plain = policy([allow("sqs:SendMessage", "*", Condition={"StringEquals": {"aws:SourceVpc": "vpc-1"}})])
    if_exists = policy([allow("sqs:SendMessage", "*", Condition={"StringEqualsIfExists": {"aws:SourceVpc": "vpc-1"}})])
    no_key = Call("sqs:SendMessage", CN_SQS + "q")
    other_vpc = Call("sqs:SendMessage", CN_SQS + "q", (("aws:SourceVpc", "vpc-2"),))
    assert not allows(plain, no_key)
    assert allows(if_exists, no_key)
    assert not allows(if_exists, other_vpc)
    assert allows(if_exists, Call("sqs:SendMessage", CN_SQS + "q", (("aws:sourcevpc", "vpc-1"),)))


@pytest.mark.parametrize("operator", ["NumericLessThan", "DateGreaterThan", "ForAnyValue:StringEquals"])
def test_an_operator_the_evaluator_does_not_know_is_an_error_not_a_guess(operator: str) -> None:
    doc = policy([allow("sqs:SendMessage", "*", Condition={operator: {"aws:SomeKey": "1"}})])
    with pytest.raises(PolicyError, match=operator):
        allows(doc, Call("sqs:SendMessage", "*", (("aws:SomeKey", "1"),)))


# --- the committed files ------------------------------------------------------------------------

def test_config_iam_holds_exactly_what_the_generator_makes_of_the_example() -> None:
    expected = {name: policy_text(doc) for name, doc in policies(example(), Accounts()).items()}
    found = {path.name: path.read_text() for path in IAM_DIR.glob("*.json")}
    assert sorted(found) == sorted(expected), (
        f"config/iam/ has other files than the generator makes: run `{REGENERATE}` and delete "
        f"{sorted(set(found) - set(expected))}")
    stale = [name for name in expected if found[name] != expected[name]]
    assert not stale, f"config/iam/{stale[0]} is not what the generator makes: run `{REGENERATE}`"


def test_every_identity_of_the_example_has_its_file() -> None:
    assert identity_files(example()) == {
        ("daemon", CN): "replicatord-cn-north-1-policy.json",
        ("peer-writer", CN): "peer-writer-cn-north-1-policy.json",
        ("operator", CN): "operator-cn-north-1-policy.json",
        ("daemon", SG): "replicatord-ap-southeast-1-policy.json",
        ("peer-writer", SG): "peer-writer-ap-southeast-1-policy.json",
        ("operator", SG): "operator-ap-southeast-1-policy.json",
    }


def test_a_topology_within_one_partition_has_no_peer_writer_users() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["regions"] = {"eu-west-1": doc["regions"][SG], "eu-central-1": doc["regions"][CN]}
    for pair in doc["pairs"]:
        pair["tables"] = {"eu-west-1": "user-ie", "eu-central-1": "user-de"}
        pair["streams"] = {"eu-west-1": "stream_ie", "eu-central-1": "stream_de"}
    kinds = {kind for kind, _ in identity_files(parse_topology(yaml.safe_dump(doc)))}
    assert kinds == {"daemon", "operator"}


# --- the daemon's instance role -----------------------------------------------------------------

CN_SG_ACCESS = CN_SSM + "/DDBReplication/TableSG/AccessKey"
CN_SG_SECRET = CN_SSM + "/DDBReplication/TableSG/SecretKey"

DAEMON_CALLS = [
    # startup checks, the applier's conditional writes and reads, the forwarder's stamping
    *(Call(f"dynamodb:{a}", CN_DDB + "user-cn") for a in ("DescribeTable", "GetItem", "PutItem", "UpdateItem",
                                                          "DeleteItem")),
    # the forwarder reads the table's stream; ListStreams(TableName=...) at startup
    *(Call(f"dynamodb:{a}", CN_DDB + "user-cn" + STREAM_LABEL) for a in ("DescribeStream", "GetShardIterator",
                                                                         "GetRecords")),
    Call("dynamodb:ListStreams", "*"),
    *(Call(f"dynamodb:{a}", CN_DDB + "replicatord_tombstones") for a in ("DescribeTable", "BatchGetItem",
                                                                         "UpdateItem")),
    # leases; a TransactWriteItems renewal is authorized as one UpdateItem per item
    *(Call(f"dynamodb:{a}", CN_DDB + "replicatord_leases_v2") for a in ("DescribeTable", "Query", "GetItem",
                                                                        "PutItem", "UpdateItem", "DeleteItem")),
    Call("dynamodb:DescribeTable", CN_DDB + "replicator_stats"),
    Call("dynamodb:UpdateItem", CN_DDB + "replicator_stats"),
    *(Call(f"kinesis:{a}", CN_KINESIS + "ddb_replication_stream_cn") for a in ("DescribeStreamSummary", "ListShards",
                                                                               "GetShardIterator", "GetRecords")),
    *(Call(f"sqs:{a}", CN_SQS + "ddbreplicatorcn") for a in ("GetQueueUrl", "GetQueueAttributes", "SendMessage")),
    # the other partition's key pair, both halves read WithDecryption=True
    Call("ssm:GetParameter", CN_SG_ACCESS),
    Call("ssm:GetParameter", CN_SG_SECRET),
    Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET)),
    Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SG_ACCESS, "ssm.cn-north-1.amazonaws.com.cn")),
]

DAEMON_REFUSED = [
    # the daemon never writes loader_stats (the loader does)
    Call("dynamodb:UpdateItem", CN_DDB + "loader_stats"),
    Call("dynamodb:PutItem", CN_DDB + "loader_stats"),
    # other tables, the peer's tables, calls the daemon does not make
    Call("dynamodb:PutItem", CN_DDB + "orders"),
    Call("dynamodb:PutItem", SG_DDB + "user-sg"),
    Call("dynamodb:Scan", CN_DDB + "user-cn"),
    Call("dynamodb:ConditionCheckItem", CN_DDB + "user-cn"),
    Call("dynamodb:DeleteTable", CN_DDB + "user-cn"),
    Call("dynamodb:GetItem", CN_DDB + "replicatord_tombstones"),
    Call("dynamodb:Scan", CN_DDB + "replicatord_leases_v2"),
    Call("dynamodb:GetRecords", CN_DDB + "orders" + STREAM_LABEL),
    Call("kinesis:DescribeStream", CN_KINESIS + "ddb_replication_stream_cn"),
    Call("kinesis:PutRecords", CN_KINESIS + "ddb_replication_stream_cn"),
    Call("kinesis:GetRecords", CN_KINESIS + "other_stream"),
    Call("sqs:ReceiveMessage", CN_SQS + "ddbreplicatorcn"),
    Call("sqs:SendMessage", CN_SQS + "other-queue"),
    # SSM outside the two parameters, and the bulk read it does not use
    Call("ssm:GetParameter", CN_SSM + "/DDBReplication/TableSG/Other"),
    Call("ssm:GetParameter", CN_SSM + "/DDBReplication/TableCN/SecretKey"),
    Call("ssm:GetParameter", CN_SSM + "/Prod/DatabasePassword"),
    Call("ssm:GetParameters", CN_SG_SECRET),
    # KMS only through SSM, for those parameters
    Call("kms:Decrypt", CN_KEY),
    Call("kms:Decrypt", CN_KEY, (("kms:EncryptionContext:PARAMETER_ARN", CN_SG_SECRET),)),
    Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET, "s3.cn-north-1.amazonaws.com.cn")),
    Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SSM + "/Prod/DatabasePassword")),
    Call("kms:Encrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET)),
]


@pytest.mark.parametrize("call", DAEMON_CALLS, ids=lambda c: f"{c.action} {c.resource.rsplit(':', 1)[-1]}")
def test_the_daemon_policy_allows_every_call_a_daemon_makes(call: Call) -> None:
    assert allows(daemon_policy(example(), CN, Accounts()), call)


@pytest.mark.parametrize("call", DAEMON_REFUSED, ids=lambda c: f"{c.action} {c.resource.rsplit(':', 1)[-1]}")
def test_the_daemon_policy_refuses_what_a_daemon_does_not_need(call: Call) -> None:
    assert not allows(daemon_policy(example(), CN, Accounts()), call)


def test_list_streams_has_a_statement_of_its_own_on_star() -> None:
    # ListStreams has no resource type: IAM authorizes it against "*", so it must not share a
    # statement (and so its resources) with the stream actions.
    (statement,) = [s for s in daemon_policy(example(), CN, Accounts())["Statement"]
                    if "dynamodb:ListStreams" in s["Action"]]
    assert statement["Action"] == ["dynamodb:ListStreams"]
    assert statement["Resource"] == "*"


def test_only_list_streams_has_a_star_resource() -> None:
    for name, doc in policies(example(), Accounts()).items():
        for statement in doc["Statement"]:
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            assert ("*" in resources) == (statement["Action"] == ["dynamodb:ListStreams"]), (name, statement)
            assert all(r == "*" or not r.endswith(":*") for r in resources), (name, statement)


def test_the_peer_writer_user_can_only_put_on_its_region_streams() -> None:
    doc = peer_writer_policy(example(), SG, Accounts())
    assert allows(doc, Call("kinesis:PutRecords", SG_KINESIS + "ddb_replication_stream_sg"))
    assert allows(doc, Call("kinesis:DescribeStreamSummary", SG_KINESIS + "ddb_replication_stream_sg"))
    for call in (Call("kinesis:PutRecord", SG_KINESIS + "ddb_replication_stream_sg"),
                 Call("kinesis:ListShards", SG_KINESIS + "ddb_replication_stream_sg"),
                 Call("kinesis:GetRecords", SG_KINESIS + "ddb_replication_stream_sg"),
                 Call("kinesis:PutRecords", SG_KINESIS + "other"),
                 Call("kinesis:PutRecords", CN_KINESIS + "ddb_replication_stream_cn"),
                 Call("dynamodb:PutItem", SG_DDB + "user-sg")):
        assert not allows(doc, call), call


def with_source_ips() -> Topology:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["regions"][SG]["peer_writer_source_ips"] = ["203.0.113.0/28", "198.51.100.7"]
    return parse_topology(yaml.safe_dump(document))


def test_the_peer_writer_key_works_only_from_the_source_addresses_the_topology_gives() -> None:
    doc = peer_writer_policy(with_source_ips(), SG, Accounts())
    stream = SG_KINESIS + "ddb_replication_stream_sg"
    for address, allowed in (("203.0.113.9", True), ("198.51.100.7", True), ("203.0.113.16", False),
                             ("192.0.2.1", False)):
        assert allows(doc, Call("kinesis:PutRecords", stream, (("aws:SourceIp", address),))) is allowed, address
    assert not allows(doc, Call("kinesis:PutRecords", stream))  # no address known: refused
    assert "Condition" not in peer_writer_policy(example(), SG, Accounts())["Statement"][0]


def test_given_account_ids_go_into_the_arns() -> None:
    accounts = Accounts.parse([f"{CN}=123456789012"], example())
    doc = daemon_policy(example(), CN, accounts)
    assert allows(doc, Call("dynamodb:PutItem", "arn:aws-cn:dynamodb:cn-north-1:123456789012:table/user-cn"))
    assert not allows(doc, Call("dynamodb:PutItem", CN_DDB + "user-cn"))
    assert accounts.placeholders(example()) == [SG]


# --- the operator's role ------------------------------------------------------------------------

OPERATOR_CALLS = {
    "provision": [
        *(Call(f"dynamodb:{a}", CN_DDB + "user-cn") for a in ("DescribeTable", "CreateTable", "UpdateTable")),
        *(Call(f"dynamodb:{a}", CN_DDB + t) for a in ("DescribeTable", "CreateTable", "PutItem")
          for t in ("replicator_stats", "loader_stats")),
        *(Call(f"dynamodb:{a}", CN_DDB + "replicatord_leases_v2") for a in ("DescribeTable", "CreateTable",
                                                                            "PutItem")),
        Call("dynamodb:DescribeTable", CN_DDB + "replicatord_leases"),
        Call("dynamodb:Scan", CN_DDB + "replicatord_leases"),
        *(Call(f"dynamodb:{a}", CN_DDB + "replicatord_tombstones") for a in ("DescribeTable", "CreateTable",
                                                                             "DescribeTimeToLive",
                                                                             "UpdateTimeToLive")),
        *(Call(f"kinesis:{a}", CN_KINESIS + "ddb_replication_stream_cn") for a in ("DescribeStreamSummary",
                                                                                   "CreateStream", "DescribeStream")),
        Call("sqs:GetQueueUrl", CN_SQS + "ddbreplicatorcn"),
        Call("sqs:CreateQueue", CN_SQS + "ddbreplicatorcn"),
        Call("ssm:PutParameter", CN_SG_ACCESS),
        Call("ssm:PutParameter", CN_SG_SECRET),
        Call("kms:Encrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET)),
        Call("kms:GenerateDataKey", CN_KEY, via_ssm(CN, CN_SG_SECRET)),
    ],
    "status": [
        Call("dynamodb:Scan", CN_DDB + "replicatord_leases_v2"),
        Call("dynamodb:Query", CN_DDB + "replicatord_leases_v2"),
        Call("dynamodb:DescribeTable", CN_DDB + "user-cn"),
        Call("dynamodb:GetShardIterator", CN_DDB + "user-cn" + STREAM_LABEL),
        Call("dynamodb:GetRecords", CN_DDB + "user-cn" + STREAM_LABEL),
        Call("dynamodb:GetItem", CN_DDB + "replicator_stats"),
        Call("dynamodb:GetItem", CN_DDB + "loader_stats"),
        *(Call(f"kinesis:{a}", CN_KINESIS + "ddb_replication_stream_cn") for a in ("DescribeStreamSummary",
                                                                                   "GetShardIterator", "GetRecords")),
        Call("sqs:GetQueueUrl", CN_SQS + "ddbreplicatorcn"),
        Call("sqs:GetQueueAttributes", CN_SQS + "ddbreplicatorcn"),
        Call("ssm:GetParameter", CN_SG_ACCESS),
        Call("ssm:GetParameter", CN_SG_SECRET),
        Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET)),
    ],
    "dlq": [
        *(Call(f"sqs:{a}", CN_SQS + "ddbreplicatorcn") for a in ("GetQueueUrl", "ReceiveMessage",
                                                                 "ChangeMessageVisibility", "DeleteMessage",
                                                                 "SendMessage")),
        # redrive: the applier's and the forwarder's writes, and the applier's counter
        *(Call(f"dynamodb:{a}", CN_DDB + "user-cn") for a in ("GetItem", "PutItem", "UpdateItem", "DeleteItem")),
        Call("dynamodb:BatchGetItem", CN_DDB + "replicatord_tombstones"),
        Call("dynamodb:UpdateItem", CN_DDB + "replicatord_tombstones"),
        Call("dynamodb:UpdateItem", CN_DDB + "replicator_stats"),
    ],
    "verify/backfill": [
        *(Call(f"dynamodb:{a}", CN_DDB + "user-cn") for a in ("DescribeTable", "Scan", "BatchGetItem", "GetItem",
                                                              "PutItem", "UpdateItem", "DeleteItem")),
        Call("dynamodb:BatchGetItem", CN_DDB + "replicatord_tombstones"),
        Call("dynamodb:UpdateItem", CN_DDB + "replicatord_tombstones"),
        *(Call(f"dynamodb:{a}", CN_DDB + "replicatord_leases_v2") for a in ("Query", "PutItem", "DeleteItem",
                                                                            "Scan")),
        Call("kinesis:GetShardIterator", CN_KINESIS + "ddb_replication_stream_cn"),
        Call("kinesis:GetRecords", CN_KINESIS + "ddb_replication_stream_cn"),
    ],
    "pause/resume": [
        Call("dynamodb:PutItem", CN_DDB + "replicatord_leases_v2"),
        Call("dynamodb:DeleteItem", CN_DDB + "replicatord_leases_v2"),
    ],
}

OPERATOR_REFUSED = [
    Call("dynamodb:DeleteTable", CN_DDB + "user-cn"),
    Call("dynamodb:PutItem", CN_DDB + "orders"),
    Call("dynamodb:PutItem", CN_DDB + "replicatord_leases"),
    Call("dynamodb:UpdateItem", CN_DDB + "loader_stats"),
    Call("dynamodb:PutItem", SG_DDB + "user-sg"),
    Call("sqs:DeleteQueue", CN_SQS + "ddbreplicatorcn"),
    Call("sqs:PurgeQueue", CN_SQS + "ddbreplicatorcn"),
    Call("sqs:SetQueueAttributes", CN_SQS + "ddbreplicatorcn"),
    Call("kinesis:DeleteStream", CN_KINESIS + "ddb_replication_stream_cn"),
    Call("kinesis:PutRecords", CN_KINESIS + "ddb_replication_stream_cn"),
    Call("ssm:PutParameter", CN_SSM + "/Prod/DatabasePassword"),
    Call("ssm:DeleteParameter", CN_SG_SECRET),
    Call("kms:Decrypt", CN_KEY),
    Call("kms:Encrypt", CN_KEY, via_ssm(CN, CN_SSM + "/Prod/DatabasePassword")),
]


@pytest.mark.parametrize(("command", "call"), [(c, call) for c, calls in OPERATOR_CALLS.items() for call in calls],
                         ids=lambda v: v if isinstance(v, str) else f"{v.action} {v.resource.rsplit(':', 1)[-1]}")
def test_the_operator_policy_allows_every_call_of_the_operator_commands(command: str, call: Call) -> None:
    assert allows(operator_policy(example(), CN, Accounts()), call), command


@pytest.mark.parametrize("call", OPERATOR_REFUSED, ids=lambda c: f"{c.action} {c.resource.rsplit(':', 1)[-1]}")
def test_the_operator_policy_refuses_what_no_command_needs(call: Call) -> None:
    assert not allows(operator_policy(example(), CN, Accounts()), call)


# --- three regions, two partitions --------------------------------------------------------------

def three_regions() -> Topology:
    """The example plus cn-northwest-1 beside cn-north-1 (same partition, another account)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    cnw = copy.deepcopy(doc["regions"][CN])
    cnw.update(dead_letter_queue="ddbreplicatorcnw", credentials={"ssm_prefix": "/DDBReplication/TableCNW/"})
    doc["regions"][CNW] = cnw
    doc["pairs"][0]["tables"][CNW] = "user-cnw"
    doc["pairs"][0]["streams"][CNW] = "ddb_replication_stream_cnw"
    return parse_topology(yaml.safe_dump(doc))


def test_a_china_daemon_writes_its_china_peer_with_its_role_and_reads_ssm_only_for_the_global_peer() -> None:
    topology = three_regions()
    accounts = Accounts.parse([f"{CNW}=777788889999"], topology)
    doc = daemon_policy(topology, CN, accounts)
    cnw_stream = "arn:aws-cn:kinesis:cn-northwest-1:777788889999:stream/ddb_replication_stream_cnw"
    assert allows(doc, Call("kinesis:PutRecords", cnw_stream))
    assert allows(doc, Call("kinesis:DescribeStreamSummary", cnw_stream))
    assert not allows(doc, Call("kinesis:PutRecords", SG_KINESIS + "ddb_replication_stream_sg"))
    assert allows(doc, Call("ssm:GetParameter", CN_SG_SECRET))
    assert allows(doc, Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET)))
    cnw_secret = CN_SSM + "/DDBReplication/TableCNW/SecretKey"
    assert not allows(doc, Call("ssm:GetParameter", cnw_secret))
    assert not allows(doc, Call("kms:Decrypt", CN_KEY, via_ssm(CN, cnw_secret)))


def test_the_global_daemon_reads_the_key_pairs_of_both_china_regions() -> None:
    doc = daemon_policy(three_regions(), SG, Accounts())
    ssm = "arn:aws:ssm:ap-southeast-1:111122223333:parameter/DDBReplication/"
    for name in ("TableCN/AccessKey", "TableCN/SecretKey", "TableCNW/AccessKey", "TableCNW/SecretKey"):
        assert allows(doc, Call("ssm:GetParameter", ssm + name)), name
        assert allows(doc, Call("kms:Decrypt", "arn:aws:kms:ap-southeast-1:111122223333:key/k",
                                via_ssm(SG, ssm + name))), name
    assert not allows(doc, Call("kms:Decrypt", "arn:aws:kms:ap-southeast-1:111122223333:key/k",
                                via_ssm(SG, ssm + "TableCN/SecretKey", "ssm.ap-southeast-1.amazonaws.com.cn")))
    assert not any(s["Sid"] == "SamePartitionPeerStreams" for s in doc["Statement"])


def test_every_arn_names_its_region_partition() -> None:
    topology = three_regions()
    expected = {CN: "arn:aws-cn:", CNW: "arn:aws-cn:", SG: "arn:aws:"}
    for (_, region), name in identity_files(topology).items():
        doc = policies(topology, Accounts())[name]
        for statement in doc["Statement"]:
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            for resource in resources:
                assert resource == "*" or resource.startswith(expected[resource.split(":")[3]]), (name, resource)
                # a China identity lives in a China account: it names no resource of the global partition
                assert resource == "*" or resource.startswith(expected[region]), (name, resource)
    assert ("peer-writer", CNW) in identity_files(topology)


# --- parliament ---------------------------------------------------------------------------------

@cache
def _analyze() -> Callable[..., Any]:
    with warnings.catch_warnings():
        # parliament reads its data files at import without closing them: a ResourceWarning of its
        # own, which this suite's filterwarnings = error would pin on whatever test runs next.
        warnings.simplefilter("ignore", ResourceWarning)
        from parliament import analyze_policy_string
    return analyze_policy_string


def _findings(document: dict[str, Any]) -> list[tuple[str, Any]]:
    analyzed = _analyze()(policy_text(document), include_community_auditors=True)
    return [(f.issue, f.location) for f in analyzed.findings
            # The community auditor classes sqs:CreateQueue as permissions management (a queue can
            # be created with a Policy attribute). `provision` creates the dead-letter queue, and
            # the statement names that one queue: expected, and only this exact finding is dropped.
            if not (f.issue == "PERMISSIONS_MANAGEMENT_ACTIONS" and f.location.get("actions") == ["sqs:createqueue"])]


@pytest.mark.parametrize("topology", [example(), three_regions(), with_source_ips()],
                         ids=["example", "three-regions", "source-ips"])
def test_parliament_finds_nothing_in_any_generated_policy(topology: Topology) -> None:
    for name, document in policies(topology, Accounts()).items():
        assert _findings(document) == [], name


def test_parliament_is_really_looking() -> None:
    # The same check on a policy with known problems: what the filter above lets through.
    bad = policy([allow(["dynamodb:PutItem", "s3:GetObject"], "arn:aws:dynamodb:us-east-1:111122223333:table/t"),
                  allow("dynamodb:ListStreams", "arn:aws:dynamodb:us-east-1:111122223333:table/t/stream/*")])
    issues = {issue for issue, _ in _findings(bad)}
    assert issues >= {"RESOURCE_MISMATCH"}, issues


# --- statement_for (preflight) ------------------------------------------------------------------

def test_statement_for_a_refused_call_allows_that_call_and_no_other() -> None:
    doc = daemon_policy(example(), CN, Accounts())
    refused = Call("dynamodb:PutItem", CN_DDB + "loader_stats")
    assert not allows(doc, refused)
    fixed = {**doc, "Statement": [*doc["Statement"], statement_for(refused)]}
    assert allows(fixed, refused)
    assert not allows(fixed, Call("dynamodb:PutItem", CN_DDB + "orders"))
    assert not allows(fixed, Call("dynamodb:DeleteItem", CN_DDB + "loader_stats"))
    assert statement_for(refused)["Sid"] == "AllowDynamodbPutItem"


def test_statement_for_keeps_the_call_context_as_its_condition() -> None:
    call = Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SSM + "/Other/SecretKey"))
    statement = statement_for(call)
    assert allows(policy([statement]), call)
    assert not allows(policy([statement]), Call("kms:Decrypt", CN_KEY))
    assert not allows(policy([statement]), Call("kms:Decrypt", CN_KEY, via_ssm(CN, CN_SG_SECRET)))


# --- the `iam` command --------------------------------------------------------------------------

def test_iam_out_writes_one_file_per_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "iam"
    assert cli.main(["iam", "--config", str(EXAMPLE), "--account", f"{SG}=123456789012", "--out", str(out)]) == 0
    expected = policies(example(), Accounts.parse([f"{SG}=123456789012"], example()))
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: policy_text(d) for n, d in expected.items()}
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(out / name) for name in expected]
    # one warning line for the region left on its placeholder
    assert captured.err == (f"warning: placeholder account ids for {CN} (444455556666): "
                            "give --account REGION=ACCOUNT_ID\n")
    assert "123456789012" in (out / "replicatord-ap-southeast-1-policy.json").read_text()


def test_iam_prints_every_policy_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    accounts = [f"{CN}=123456789012", f"{SG}=210987654321"]
    assert cli.main(["iam", "-c", str(EXAMPLE), *(f"--account={a}" for a in accounts)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == policies(example(), Accounts.parse(accounts, example()))
    assert captured.err == ""


@pytest.mark.parametrize(("value", "needle"), [
    ("cn-north-1", "expected REGION=ACCOUNT_ID (12 digits), got 'cn-north-1'"),
    ("cn-north-1=4444-5555-6666", "expected REGION=ACCOUNT_ID (12 digits)"),
    ("cn-north-1=12345678901", "expected REGION=ACCOUNT_ID (12 digits)"),
    ("eu-west-1=123456789012", "'eu-west-1' is not in the topology"),
])
def test_a_bad_account_is_one_line_and_exit_3(value: str, needle: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["iam", "--config", str(EXAMPLE), "--account", value, "--out", str(tmp_path / "out")])
    assert code == cli.EXIT_CONFIG == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: --account: "), captured.err
    assert needle in captured.err
    assert not (tmp_path / "out").exists()
