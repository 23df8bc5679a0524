"""`replicatord provision --template-dir`: the CloudFormation templates generated from the topology.

cfn-lint (with the resource specifications of the region each template is for: China's differ)
on the example topology and a three-region mesh; then what the templates hold, table by table,
and the IAM policies against iam.py's own output for that region with the pseudo parameters
resolved.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.api import ManualArgs, lint

from replicatord import cli
from replicatord.aws import StartupError
from replicatord.config import Topology, load_topology, partition_of
from replicatord.iam import Accounts, daemon_policy, operator_policy, peer_writer_policy
from replicatord.local.world import regions_for, topology_document
from replicatord.ops.cloudformation import template, template_text, templates, write_templates

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "replicatord.example.yaml"
ACCOUNT = "123456789012"
PEER_ACCOUNT = "210987654321"


def example() -> Topology:
    return load_topology(EXAMPLE)


def mesh(count: int = 3, **kwargs: Any) -> Topology:
    return Topology.model_validate(topology_document(dict.fromkeys(regions_for(count)), **kwargs))


def china_only() -> Topology:
    """Two regions of one partition: no border, so no peer writer and no key pairs."""
    return Topology.model_validate(topology_document(dict.fromkeys(("cn-north-1", "cn-northwest-1"))))


def with_changes(topology: Topology, regions: dict[str, dict[str, Any]] | None = None,
                 pair: dict[str, Any] | None = None) -> Topology:
    doc = topology.model_dump()
    for region, changes in (regions or {}).items():
        doc["regions"][region].update(changes)
    doc["pairs"][0].update(pair or {})
    return Topology.model_validate(doc)


# -- cfn-lint ------------------------------------------------------------------------------------


def lint_findings(text: str, region: str) -> list[str]:
    """cfn-lint's errors, warnings and informational findings, with the specs of `region`."""
    matches = lint(text, config=ManualArgs(regions=[region], include_checks=["I"]))
    return [f"{m.rule.id} line {m.linenumber}: {m.message}" for m in matches]


@pytest.mark.parametrize(("topology", "region"), [
    *[pytest.param(example, r, id=f"example-{r}") for r in ("cn-north-1", "ap-southeast-1")],
    *[pytest.param(mesh, r, id=f"mesh-{r}") for r in regions_for(3)],
    *[pytest.param(lambda: mesh(4, outbox=None), r, id=f"mesh4-no-outbox-{r}") for r in regions_for(4)],
    pytest.param(china_only, "cn-north-1", id="china-only"),
])
def test_the_templates_are_cfn_lint_clean(topology: Any, region: str) -> None:
    text = template_text(template(topology(), region))
    assert lint_findings(text, region) == []


def test_cfn_lint_bites() -> None:
    """The lint above is live: a wrong stream view type and too long a retention are found."""
    document = template(example(), "cn-north-1")
    document["Resources"]["TableUser"]["Properties"]["StreamSpecification"]["StreamViewType"] = "NEW_AND_OLD"
    document["Resources"]["OutboxUserToApSoutheast1"]["Properties"]["RetentionPeriodHours"] = 9999
    found = lint_findings(template_text(document), "cn-north-1")
    assert any(f.startswith("E3030") and "NEW_AND_OLD" in f for f in found), found
    assert any(f.startswith("E3034") and "9999" in f for f in found), found


# -- resolving the pseudo parameters, as CloudFormation does ------------------------------------


def resolve(document: dict[str, Any], value: Any, region: str, parameters: dict[str, Any] | None = None) -> Any:
    """`value` of `document` with Ref, Fn::Sub, Fn::If and the conditions evaluated in `region`
    of account ACCOUNT (parameters: their defaults, then `parameters`)."""
    params = {name: spec.get("Default") for name, spec in document.get("Parameters", {}).items()}
    params |= parameters or {}
    names = {"AWS::Partition": partition_of(region), "AWS::AccountId": ACCOUNT, "AWS::Region": region,
             "AWS::URLSuffix": "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com", **params}

    def condition(name: str) -> bool:
        return bool(walk(document["Conditions"][name], names))

    def walk(v: Any, scope: dict[str, Any]) -> Any:
        if isinstance(v, list):
            return [walk(x, scope) for x in v]
        if not isinstance(v, dict):
            return v
        if set(v) == {"Ref"}:
            return scope[v["Ref"]]
        if set(v) == {"Fn::If"}:
            name, yes, no = v["Fn::If"]
            return walk(yes if condition(name) else no, scope)
        if set(v) == {"Fn::Equals"}:
            a, b = (walk(x, scope) for x in v["Fn::Equals"])
            return str(a) == str(b)
        if set(v) == {"Fn::Not"}:
            return not walk(v["Fn::Not"][0], scope)
        if set(v) == {"Fn::Sub"}:
            body, variables = (v["Fn::Sub"], {}) if isinstance(v["Fn::Sub"], str) else v["Fn::Sub"]
            inner = scope | {k: walk(x, scope) for k, x in variables.items()}
            text = re.sub(r"\$\{([^!}][^}]*)\}", lambda m: str(inner[m.group(1)]), body)
            return text.replace("${!", "${")
        return {k: walk(x, scope) for k, x in v.items()}

    return walk(value, names)


def resources(document: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in document["Resources"].items() if r["Type"] == kind}


def by_name(document: dict[str, Any], kind: str, name_property: str) -> dict[str, dict[str, Any]]:
    return {r["Properties"][name_property]: r for r in resources(document, kind).values()}


# -- what the templates hold ---------------------------------------------------------------------


@pytest.mark.parametrize(("region", "table", "stream", "ttl", "key", "kept"), [
    ("cn-north-1", "user-cn", "NEW_AND_OLD_IMAGES", None, [("PK", "S", "HASH")], "Retain"),
    ("cn-north-1", "replicatord_tombstones", None, "expires_at", [("tomb_key", "S", "HASH")], "Delete"),
    ("cn-north-1", "replicatord_leases_v2", None, None, [("stream_id", "S", "HASH"), ("shard_id", "S", "RANGE")],
     "Delete"),
    ("cn-north-1", "replicator_stats", None, None, [("PK", "S", "HASH")], "Delete"),
    ("cn-north-1", "loader_stats", None, None, [("PK", "S", "HASH")], "Delete"),
    ("ap-southeast-1", "user-sg", "NEW_AND_OLD_IMAGES", None, [("PK", "S", "HASH")], "Retain"),
    ("ap-southeast-1", "replicatord_tombstones", None, "expires_at", [("tomb_key", "S", "HASH")], "Delete"),
])
def test_tables(region: str, table: str, stream: str | None, ttl: str | None, key: list[tuple[str, str, str]],
                kept: str) -> None:
    tables = by_name(template(example(), region), "AWS::DynamoDB::Table", "TableName")
    assert len(tables) == 5
    resource = tables[table]
    props = resource["Properties"]
    assert props.get("StreamSpecification") == ({"StreamViewType": stream} if stream else None)
    assert props.get("TimeToLiveSpecification") == ({"AttributeName": ttl, "Enabled": True} if ttl else None)
    assert [(k["AttributeName"], k["KeyType"]) for k in props["KeySchema"]] == [(n, kt) for n, _, kt in key]
    assert props["AttributeDefinitions"] == [{"AttributeName": n, "AttributeType": t} for n, t, _ in key]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert (resource["DeletionPolicy"], resource["UpdateReplacePolicy"]) == (kept, kept)


def test_the_pair_key_schema_comes_from_the_topology() -> None:
    topology = with_changes(example(), pair={"key": {"tenant": "S", "seq": "N"}})
    props = by_name(template(topology, "cn-north-1"), "AWS::DynamoDB::Table", "TableName")["user-cn"]["Properties"]
    assert props["KeySchema"] == [{"AttributeName": "tenant", "KeyType": "HASH"},
                                  {"AttributeName": "seq", "KeyType": "RANGE"}]
    assert props["AttributeDefinitions"] == [{"AttributeName": "tenant", "AttributeType": "S"},
                                             {"AttributeName": "seq", "AttributeType": "N"}]


@pytest.mark.parametrize(("region", "stream", "shards", "retention"), [
    ("cn-north-1", "ddb_replication_stream_cn", 1, 24),
    ("cn-north-1", "ddb_replication_stream_sg-outbox-cn-north-1", 1, 168),
    ("ap-southeast-1", "ddb_replication_stream_sg", 1, 24),
    ("ap-southeast-1", "ddb_replication_stream_cn-outbox-ap-southeast-1", 1, 168),
])
def test_kinesis_streams_and_outboxes(region: str, stream: str, shards: int, retention: int) -> None:
    document = template(example(), region)
    streams = by_name(document, "AWS::Kinesis::Stream", "Name")
    assert len(streams) == 2
    props = streams[stream]["Properties"]
    assert props["ShardCount"] == shards
    assert resolve(document, props["RetentionPeriodHours"], region) == retention


def test_outbox_settings_and_names_come_from_the_topology() -> None:
    topology = with_changes(mesh(), regions={"cn-north-1": {"outbox": {"retention_hours": 72, "shards": 3}}},
                            pair={"outboxes": {"cn-north-1": {"ap-southeast-1": "to-singapore"}}})
    document = template(topology, "cn-north-1")
    assert document["Parameters"]["OutboxRetentionHours"]["Default"] == 72
    streams = by_name(document, "AWS::Kinesis::Stream", "Name")
    outboxes = {name for name in streams if name != "ddb_replication_stream_cn"}
    assert outboxes == {"to-singapore", "ddb_replication_stream_nx-outbox-cn-north-1"}
    assert {streams[n]["Properties"]["ShardCount"] for n in outboxes} == {3}
    assert resolve(document, streams["to-singapore"]["Properties"]["RetentionPeriodHours"], "cn-north-1",
                   {"OutboxRetentionHours": 500}) == 500


def test_no_outbox_no_outbox_streams_nor_parameter() -> None:
    document = template(mesh(outbox=None), "cn-north-1")
    assert set(by_name(document, "AWS::Kinesis::Stream", "Name")) == {"ddb_replication_stream_cn"}
    assert "OutboxRetentionHours" not in document["Parameters"]
    assert not any(s.get("Sid") == "Outboxes" for s in daemon_statements(document, "cn-north-1"))


def test_dead_letter_queue_as_provision_makes_it() -> None:
    queue = by_name(template(example(), "ap-southeast-1"), "AWS::SQS::Queue", "QueueName")["ddbreplicatorsg"]
    assert queue["Properties"] == {"QueueName": "ddbreplicatorsg", "MessageRetentionPeriod": 1209600,
                                   "MaximumMessageSize": 262144}


def daemon_statements(document: dict[str, Any], region: str) -> list[dict[str, Any]]:
    role = document["Resources"]["InstanceRole"]["Properties"]
    return list(resolve(document, role["Policies"][0]["PolicyDocument"], region)["Statement"])


# -- IAM: iam.py's policies, modulo the placeholders -------------------------------------------------


def deployed_policies(document: dict[str, Any], region: str,
                      parameters: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The policy documents of the template, resolved, by identity kind."""
    res = document["Resources"]
    found = {"daemon": res["InstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"],
             "operator": res["OperatorManagedPolicy"]["Properties"]["PolicyDocument"]}
    if "PeerWriterPolicy" in res:
        found["peer-writer"] = res["PeerWriterPolicy"]["Properties"]["PolicyDocument"]
    return {kind: resolve(document, doc, region, parameters) for kind, doc in found.items()}


GENERATORS = {"daemon": daemon_policy, "operator": operator_policy, "peer-writer": peer_writer_policy}


@pytest.mark.parametrize(("topology", "region", "kinds"), [
    *[pytest.param(example, r, {"daemon", "operator", "peer-writer"}, id=f"example-{r}")
      for r in ("cn-north-1", "ap-southeast-1")],
    *[pytest.param(mesh, r, {"daemon", "operator", "peer-writer"}, id=f"mesh-{r}") for r in regions_for(3)],
    # One partition only: no border, no peer writer.
    pytest.param(china_only, "cn-northwest-1", {"daemon", "operator"}, id="china-only"),
])
def test_policies_are_iam_py_s_for_the_region(topology: Any, region: str, kinds: set[str]) -> None:
    topo = topology()
    document = template(topo, region)
    accounts = Accounts(dict.fromkeys(topo.regions, ACCOUNT))
    got = deployed_policies(document, region)
    assert set(got) == kinds
    for kind, policy in got.items():
        assert policy == GENERATORS[kind](topo, region, accounts), kind
    # No partition nor account written out: both from pseudo parameters.
    text = yaml.safe_dump(document["Resources"])
    assert "arn:aws" not in text and not re.search(r"[0-9]{12}", text)


def test_parameters_change_the_policies_as_iam_py_would() -> None:
    """A same-partition peer in another account, and the key of the SecureStrings given."""
    topo = mesh()
    document = template(topo, "cn-north-1")
    key = f"arn:aws-cn:kms:cn-north-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    got = deployed_policies(document, "cn-north-1", {"AccountIdCnNorthwest1": PEER_ACCOUNT, "KmsKeyArn": key})
    accounts = Accounts({"cn-north-1": ACCOUNT, "ap-southeast-1": ACCOUNT, "cn-northwest-1": PEER_ACCOUNT})
    expected = daemon_policy(topo, "cn-north-1", accounts)
    for statement in expected["Statement"]:
        if statement["Sid"] == "PeerCredentialsViaSsm":
            statement["Resource"] = key
    assert got["daemon"] == expected
    peer_streams = [s for s in expected["Statement"] if s["Sid"] == "SamePartitionPeerStreams"]
    assert peer_streams[0]["Resource"] == f"arn:aws-cn:kinesis:cn-northwest-1:{PEER_ACCOUNT}:stream/" \
                                          "ddb_replication_stream_nx"


def test_identities() -> None:
    document = template(example(), "cn-north-1")
    res = document["Resources"]
    trust = resolve(document, res["InstanceRole"]["Properties"]["AssumeRolePolicyDocument"], "cn-north-1")
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com.cn"},
                                   "Action": "sts:AssumeRole"}]
    assert res["InstanceProfile"]["Properties"]["Roles"] == [{"Ref": "InstanceRole"}]
    assert resolve(document, res["PeerWriterUser"]["Properties"]["UserName"], "cn-north-1") == \
        "replicatord-peer-writer-cn-north-1"
    assert res["PeerWriterPolicy"]["Properties"]["Users"] == [{"Ref": "PeerWriterUser"}]
    assert res["OperatorManagedPolicy"]["Condition"] == "CreateOperatorPolicy"
    assert resolve(document, {"Fn::If": ["CreateOperatorPolicy", 1, 0]}, "cn-north-1", {"OperatorPolicy": "false"}) == 0
    # No secret in a stack: no access key, no SSM parameter.
    kinds = {r["Type"] for r in res.values()}
    assert not kinds & {"AWS::IAM::AccessKey", "AWS::SSM::Parameter"}


def test_outputs_tell_how_to_store_the_key_pairs() -> None:
    document = template(example(), "cn-north-1")
    outputs = document["Outputs"]
    assert {"InstanceProfileName", "InstanceProfileArn", "InstanceRoleArn", "PeerWriterUserName",
            "PeerWriterUserArn", "PeerWriterKeyPair", "PeerKeyPairsHere", "OperatorPolicyArn"} <= set(outputs)
    mine = resolve(document, outputs["PeerWriterKeyPair"]["Value"], "cn-north-1",
                   {"PeerWriterUser": "replicatord-peer-writer-cn-north-1"})
    assert "create-access-key --user-name replicatord-peer-writer-cn-north-1" in mine
    assert "--store-peer-credentials ap-southeast-1 cn-north-1" in mine
    assert "/DDBReplication/TableCN/SecretKey --type SecureString" in mine
    here = outputs["PeerKeyPairsHere"]["Value"]
    assert "--store-peer-credentials cn-north-1 ap-southeast-1" in here and "/DDBReplication/TableSG/" in here
    assert "SecureString" in document["Description"] and len(document["Description"]) <= 1024


def test_a_template_refuses_another_region() -> None:
    rule = template(example(), "cn-north-1")["Rules"]["RightRegion"]["Assertions"][0]
    assert rule["Assert"] == {"Fn::Equals": [{"Ref": "AWS::Region"}, "cn-north-1"]}


def test_logical_ids_stay_unique_and_shared_names_make_one_resource() -> None:
    doc = topology_document(dict.fromkeys(("cn-north-1", "ap-southeast-1")))
    doc["pairs"].append({**copy.deepcopy(doc["pairs"][0]), "name": "user_",
                         "tables": {"cn-north-1": "user2-cn", "ap-southeast-1": "user2-sg"},
                         "streams": {"cn-north-1": "s2-cn", "ap-southeast-1": "s2-sg"}})
    doc["regions"]["cn-north-1"]["loader_stats_table"] = "replicator_stats"
    document = template(Topology.model_validate(doc), "cn-north-1")
    assert {"TableUser", "TableUser2"} <= set(document["Resources"])
    assert sorted(by_name(document, "AWS::DynamoDB::Table", "TableName")) == [
        "replicator_stats", "replicatord_leases_v2", "replicatord_tombstones", "user-cn", "user2-cn"]


def test_one_name_for_two_different_tables_is_one_line() -> None:
    topology = with_changes(example(), regions={"cn-north-1": {"lease_table": "replicator_stats"}})
    with pytest.raises(StartupError) as caught:
        template(topology, "cn-north-1")
    assert "\n" not in str(caught.value) and "replicator_stats" in str(caught.value)


def test_templates_of_every_region() -> None:
    assert list(templates(mesh())) == list(regions_for(3))
    assert list(templates(mesh(), ["cn-northwest-1"])) == ["cn-northwest-1"]


# -- the command ---------------------------------------------------------------------------------


def test_provision_template_dir_writes_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import boto3

    def no_aws(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("provision --template-dir made an AWS client")

    monkeypatch.setattr(boto3.session, "Session", no_aws)
    assert cli.main(["provision", "--config", str(EXAMPLE), "--template-dir", str(tmp_path / "cfn")]) == 0
    written = sorted(p.name for p in (tmp_path / "cfn").iterdir())
    assert written == ["ap-southeast-1.yaml", "cn-north-1.yaml"]
    assert yaml.safe_load((tmp_path / "cfn" / "cn-north-1.yaml").read_text()) == template(example(), "cn-north-1")
    assert capsys.readouterr().out.count("wrote") == 2
    assert cli.main(["provision", "--config", str(EXAMPLE), "--template-dir", str(tmp_path / "one"),
                     "--only-region", "ap-southeast-1"]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["ap-southeast-1.yaml"]


@pytest.mark.parametrize(("extra", "code", "message"), [
    (["--only-region", "eu-west-9"], cli.EXIT_STARTUP, "unknown region 'eu-west-9'"),
    (["--store-peer-credentials", "cn-north-1", "ap-southeast-1"], cli.EXIT_CONFIG, "--template-dir: writes"),
])
def test_provision_template_dir_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    extra: list[str], code: int, message: str) -> None:
    args = ["provision", "--config", str(EXAMPLE), "--template-dir", str(tmp_path), *extra]
    assert cli.main(args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_an_unwritable_template_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(cli.ConfigError) as caught:
        write_templates(example(), blocker / "sub", report=lambda _line: None)
    assert len(caught.value.lines) == 1 and "--template-dir" in caught.value.lines[0]
