"""`replicatord provision --template-dir DIR`: one CloudFormation template per region, from the topology.

What `provision` creates by API calls (the quick path: ops/provision.py), as infrastructure as
code for a change-reviewed production account: each pair's table (stream NEW_AND_OLD_IMAGES, the
topology's key schema), the stats, lease and tombstone tables (TTL on the tombstones' expiry),
the replication streams and outboxes, the dead-letter queue, and the identities of
`replicatord iam` with the policies that module generates (never a copy): the daemons' instance
role and profile, the peer-writer user (a topology across partitions only) and, optionally, the
operator's policy as a managed policy. Not the peers' key pairs in SSM: CloudFormation cannot
create a SecureString parameter; the outputs say how to store them.

Pure: topology -> template (a dict) per region; `template_text` is its YAML. Account ids and the
partition come from pseudo parameters: the policies are generated with placeholder account ids
and their ARNs rewritten into `Fn::Sub` (the partition field and the account field of every ARN
the generator made for this template); what differs per account is a parameter with a default
that works for the topology as given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from replicatord.aws import StartupError, peer_credential_names
from replicatord.config import ConfigError, Topology, partition_of
from replicatord.iam import Accounts, daemon_policy, identity_files, operator_policy, peer_writer_policy
from replicatord.lease_table import LEASE_TABLE_KEY
from replicatord.ops.provision import STATS_COUNTERS
from replicatord.tombstones import EXPIRES_AT, TOMB_KEY

FORMAT_VERSION = "2010-09-09"
STREAM_VIEW = "NEW_AND_OLD_IMAGES"
# What `provision` gives the dead-letter queue: 14 days (the longest SQS keeps a message) and the
# classic message size limit.
DLQ_RETENTION_S = 1_209_600
DLQ_MAX_MESSAGE_BYTES = 262_144
KINESIS_DEFAULT_RETENTION_HOURS = 24
KINESIS_MAX_RETENTION_HOURS = 8760

# The account id the policy generator is given for each region: marks, in its output, every ARN
# it made, so that exactly those are rewritten (a NUL never occurs in a name of the topology).
_MARK = "\x00account={}\x00"
_MARKED = re.compile("\x00account=([^\x00:]*)\x00")


def camel(name: str) -> str:
    """`cn-north-1` -> `CnNorth1`: a name's alphanumeric runs, capitalized (logical ids allow no more)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name) if part)


def _ref(name: str) -> dict[str, str]:
    return {"Ref": name}


def _attr(name: str, attribute: str) -> dict[str, list[str]]:
    return {"Fn::GetAtt": [name, attribute]}


@dataclass
class _Builder:
    """The template of one region, resource by resource."""

    topology: Topology
    region: str
    parameters: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    # (kind, physical name) -> (logical id, what the topology calls it): one resource per name.
    _named: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    @property
    def partition(self) -> str:
        return partition_of(self.region)

    def same_partition_peers(self) -> list[str]:
        return [p for p in self.topology.regions if p != self.region and partition_of(p) == self.partition]

    def other_partition_peers(self) -> list[str]:
        return [p for p in self.topology.regions if partition_of(p) != self.partition]

    def logical_id(self, base: str) -> str:
        logical, n = base, 2
        while logical in self.resources:
            logical, n = f"{base}{n}", n + 1
        return logical

    def named(self, kind: str, name: str, base: str, resource: dict[str, Any], what: str) -> None:
        """Add `resource` (physical name `name`) unless the same is there already (two uses of one
        name); two different resources under one name are one line naming both uses."""
        seen = self._named.get((kind, name))
        if seen is None:
            logical = self.logical_id(base)
            self.resources[logical] = resource
            self._named[kind, name] = (logical, what)
        elif self.resources[seen[0]]["Properties"] != resource["Properties"]:
            raise StartupError(f"regions.{self.region}: {kind} {name} is both {seen[1]} and {what}, which need "
                               "different settings: give them different names")

    # -- parameters ---------------------------------------------------------------------------

    def parameter(self, name: str, spec: dict[str, Any], condition_if_given: bool = False) -> None:
        self.parameters[name] = spec
        if condition_if_given:
            self.conditions[f"{name}Given"] = {"Fn::Not": [{"Fn::Equals": [_ref(name), ""]}]}

    # -- policies: iam.py's documents, ARNs in Fn::Sub -------------------------------------------

    def account_var(self, region: str) -> str | None:
        """The Fn::Sub variable that stands for `region`'s account (None: this stack's account)."""
        return None if region == self.region else f"{camel(region)}Account"

    def policy(self, document: Mapping[str, Any]) -> Any:
        return self._intrinsic(document)

    def _intrinsic(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: self._intrinsic(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._intrinsic(item) for item in value]
        if isinstance(value, str) and _MARKED.search(value):
            return self._arn(value)
        return value

    def _arn(self, text: str) -> Any:
        """An ARN the generator made (its account field marked): partition and account from pseudo
        parameters (a same-partition peer's account from its parameter), in Fn::Sub. The key of
        the SecureStrings is the KmsKeyArn parameter when given."""
        parts = text.split(":", 5)
        if len(parts) != 6 or parts[0] != "arn" or not _MARKED.fullmatch(parts[4]):
            raise ValueError(f"not an ARN made for the template: {text!r}")  # a bug, not bad input
        _, partition, service, region, marked, resource = parts
        owner = _MARKED.fullmatch(marked)
        assert owner is not None
        if partition != self.partition:
            raise ValueError(f"ARN of another partition in {self.region}'s policies: {text!r}")
        var = self.account_var(owner.group(1))
        account = "${AWS::AccountId}" if var is None else "${" + var + "}"
        body = f"arn:${{AWS::Partition}}:{service}:{region}:{account}:{resource.replace('${', '${!')}"
        sub: Any = {"Fn::Sub": body} if var is None else {"Fn::Sub": [body, {var: self._account_of(owner.group(1))}]}
        if service == "kms" and region == self.region and resource == "key/*" and "KmsKeyArn" in self.parameters:
            return {"Fn::If": ["KmsKeyArnGiven", _ref("KmsKeyArn"), sub]}
        return sub

    def _account_of(self, region: str) -> Any:
        name = f"AccountId{camel(region)}"
        return {"Fn::If": [f"{name}Given", _ref(name), _ref("AWS::AccountId")]}


def _table(name: str, key: Mapping[str, str], stream: bool = False, ttl: str | None = None,
           keep: bool = False) -> dict[str, Any]:
    names = list(key)
    properties: dict[str, Any] = {
        "TableName": name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": n, "AttributeType": key[n]} for n in names],
        "KeySchema": [{"AttributeName": n, "KeyType": kind} for n, kind in zip(names, ("HASH", "RANGE"), strict=False)],
    }
    if stream:
        properties["StreamSpecification"] = {"StreamViewType": STREAM_VIEW}
    if ttl is not None:
        properties["TimeToLiveSpecification"] = {"AttributeName": ttl, "Enabled": True}
    # The pairs' tables hold the application's data: kept when the stack goes (or is replaced),
    # and an existing table can be imported into the stack (an import needs DeletionPolicy).
    policy = "Retain" if keep else "Delete"
    return {"Type": "AWS::DynamoDB::Table", "DeletionPolicy": policy, "UpdateReplacePolicy": policy,
            "Properties": properties}


def _stream(name: str, shards: int, retention: Any) -> dict[str, Any]:
    return {"Type": "AWS::Kinesis::Stream", "DeletionPolicy": "Delete", "UpdateReplacePolicy": "Delete",
            "Properties": {"Name": name, "ShardCount": shards, "RetentionPeriodHours": retention}}


def template(topology: Topology, region: str) -> dict[str, Any]:
    """The CloudFormation template of `region` (a dict, intrinsic functions in their long form)."""
    if region not in topology.regions:
        raise StartupError(f"unknown region {region!r} (regions: {', '.join(topology.regions)})")
    b = _Builder(topology, region)
    me = topology.regions[region]
    files = identity_files(topology)
    peer_writer = ("peer-writer", region) in files
    accounts = Accounts({r: _MARK.format(r) for r in topology.regions})
    needs_key_pairs = [p for p in b.other_partition_peers() if topology.regions[p].credentials is not None]

    b.parameter("ReplicationStreamRetentionHours", {
        "Type": "Number", "Default": KINESIS_DEFAULT_RETENTION_HOURS, "MinValue": KINESIS_DEFAULT_RETENTION_HOURS,
        "MaxValue": KINESIS_MAX_RETENTION_HOURS,
        "Description": "Hours the replication streams (peers' records for this region) keep a record"})
    if me.outbox is not None:
        b.parameter("OutboxRetentionHours", {
            "Type": "Number", "Default": me.outbox.retention_hours, "MinValue": KINESIS_DEFAULT_RETENTION_HOURS,
            "MaxValue": KINESIS_MAX_RETENTION_HOURS,
            "Description": f"Hours an outbox keeps a peer's records: the longest outage to a peer that loses "
                           f"nothing (regions.{region}.outbox.retention_hours)"})
    if peer_writer:
        b.parameter("PeerWriterUserName", {
            "Type": "String", "Default": f"replicatord-peer-writer-{region}", "AllowedPattern": r"^[\w+=,.@-]{1,64}$",
            "Description": "The IAM user whose access key the other partition's daemons use to put records here"})
    if needs_key_pairs:
        b.parameter("KmsKeyArn", {
            "Type": "String", "Default": "", "AllowedPattern": r"^(arn:[a-z-]+:kms:[a-z0-9-]+:[0-9]{12}:key/[\w-]+)?$",
            "Description": "The KMS key of the peers' SecureString key pairs in SSM (empty: any key, used through "
                           "SSM for those parameters only, e.g. the AWS managed aws/ssm key)"}, condition_if_given=True)
    for peer in b.same_partition_peers():
        b.parameter(f"AccountId{camel(peer)}", {
            "Type": "String", "Default": "", "AllowedPattern": r"^([0-9]{12})?$",
            "Description": f"The account of {peer}, whose replication streams the daemons here write "
                           "(empty: this stack's account)"}, condition_if_given=True)
    b.parameter("OperatorPolicy", {
        "Type": "String", "Default": "true", "AllowedValues": ["true", "false"],
        "Description": "Also create the operator's managed policy (status, verify, backfill, dlq, pause, "
                       "preflight), to attach to the operators' role"})
    b.conditions["CreateOperatorPolicy"] = {"Fn::Equals": [_ref("OperatorPolicy"), "true"]}

    for pair in topology.pairs:
        b.named("table", pair.tables[region], f"Table{camel(pair.name)}",
                _table(pair.tables[region], pair.key, stream=True, keep=True), f"pair {pair.name}'s table")
        b.named("stream", pair.streams[region], f"Stream{camel(pair.name)}",
                _stream(pair.streams[region], pair.kinesis_shards, _ref("ReplicationStreamRetentionHours")),
                f"pair {pair.name}'s stream")
        if me.outbox is not None:
            for peer in topology.regions:
                if peer != region:
                    name = pair.outbox_stream(region, peer)
                    b.named("stream", name, f"Outbox{camel(pair.name)}To{camel(peer)}",
                            _stream(name, me.outbox.shards, _ref("OutboxRetentionHours")),
                            f"pair {pair.name}'s outbox for {peer}")
    for attribute in STATS_COUNTERS:
        name = getattr(me, attribute)
        b.named("table", name, camel(attribute), _table(name, {"PK": "S"}), attribute)
    b.named("table", me.lease_table, "LeaseTable", _table(me.lease_table, LEASE_TABLE_KEY), "lease_table")
    b.named("table", me.tombstone_table, "TombstoneTable", _table(me.tombstone_table, {TOMB_KEY: "S"}, ttl=EXPIRES_AT),
            "tombstone_table")
    b.named("queue", me.dead_letter_queue, "DeadLetterQueue", {
        "Type": "AWS::SQS::Queue", "DeletionPolicy": "Delete", "UpdateReplacePolicy": "Delete",
        "Properties": {"QueueName": me.dead_letter_queue, "MessageRetentionPeriod": DLQ_RETENTION_S,
                       "MaximumMessageSize": DLQ_MAX_MESSAGE_BYTES}}, "dead_letter_queue")

    b.resources["InstanceRole"] = {"Type": "AWS::IAM::Role", "Properties": {
        "Description": f"replicatord daemons in {region} (through InstanceProfile)",
        "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": {"Fn::Sub": "ec2.${AWS::URLSuffix}"}},
            "Action": "sts:AssumeRole"}]},
        "Policies": [{"PolicyName": "replicatord-daemon",
                      "PolicyDocument": b.policy(daemon_policy(topology, region, accounts))}]}}
    b.resources["InstanceProfile"] = {"Type": "AWS::IAM::InstanceProfile",
                                      "Properties": {"Roles": [_ref("InstanceRole")]}}
    if peer_writer:
        b.resources["PeerWriterUser"] = {"Type": "AWS::IAM::User",
                                         "Properties": {"UserName": _ref("PeerWriterUserName")}}
        # A policy of its own rather than the user's Policies: the same on AWS, and moto honours it.
        b.resources["PeerWriterPolicy"] = {"Type": "AWS::IAM::Policy", "Properties": {
            "PolicyName": "replicatord-peer-writer", "Users": [_ref("PeerWriterUser")],
            "PolicyDocument": b.policy(peer_writer_policy(topology, region, accounts))}}
    b.resources["OperatorManagedPolicy"] = {"Type": "AWS::IAM::ManagedPolicy", "Condition": "CreateOperatorPolicy",
                                            "Properties": {
        "Description": f"replicatord operator commands for {region} (replicatord iam: operator-{region}-policy.json)",
        "PolicyDocument": b.policy(operator_policy(topology, region, accounts))}}

    _outputs(b, peer_writer, needs_key_pairs)
    return {
        "AWSTemplateFormatVersion": FORMAT_VERSION,
        "Description": _description(topology, region, peer_writer, needs_key_pairs),
        "Parameters": b.parameters,
        "Rules": {"RightRegion": {"Assertions": [{
            "Assert": {"Fn::Equals": [_ref("AWS::Region"), region]},
            "AssertDescription": f"this template is {region}'s: deploy it there (one template per region)"}]}},
        "Conditions": b.conditions,
        "Resources": b.resources,
        "Outputs": b.outputs,
    }


def _store_command(topology: Topology, in_region: str, peer: str) -> str:
    credentials = topology.regions[peer].credentials
    assert credentials is not None
    access, secret = peer_credential_names(credentials.ssm_prefix)
    return (f"replicatord provision --config FILE --store-peer-credentials {in_region} {peer} --access-key-id ID "
            f"--secret-file FILE, or in {in_region}: aws ssm put-parameter --name {access} --type String and "
            f"--name {secret} --type SecureString")


def _outputs(b: _Builder, peer_writer: bool, needs_key_pairs: list[str]) -> None:
    out = b.outputs
    out["InstanceProfileName"] = {"Description": "Attach to the daemons' instances", "Value": _ref("InstanceProfile")}
    out["InstanceProfileArn"] = {"Value": _attr("InstanceProfile", "Arn")}
    out["InstanceRoleArn"] = {"Value": _attr("InstanceRole", "Arn")}
    if peer_writer:
        out["PeerWriterUserName"] = {"Value": _ref("PeerWriterUser")}
        out["PeerWriterUserArn"] = {"Value": _attr("PeerWriterUser", "Arn")}
        # Under this region's ssm_prefix, in every region of the other partition (identity_files
        # makes a peer writer only where there is one; the topology without credentials: none).
        readers = b.other_partition_peers() if b.topology.regions[b.region].credentials is not None else []
        steps = "; ".join(_store_command(b.topology, p, b.region) for p in readers) or (
            f"give regions.{b.region}.credentials.ssm_prefix in the topology")
        out["PeerWriterKeyPair"] = {
            "Description": "Not created by this stack (CloudFormation makes no SecureString, and a secret "
                           "in a stack is readable): create the user's access key and store it where the "
                           "other partition's daemons read it",
            "Value": {"Fn::Sub": "aws iam create-access-key --user-name ${PeerWriterUser}; then "
                                 + steps.replace("${", "${!")}}
    if needs_key_pairs:
        out["PeerKeyPairsHere"] = {
            "Description": f"The daemons in {b.region} read these peers' key pairs from SSM here",
            "Value": "; ".join(_store_command(b.topology, b.region, p) for p in needs_key_pairs)}
    out["OperatorPolicyArn"] = {"Condition": "CreateOperatorPolicy", "Value": _ref("OperatorManagedPolicy")}


def _description(topology: Topology, region: str, peer_writer: bool, needs_key_pairs: list[str]) -> str:
    pairs = ", ".join(p.name for p in topology.pairs)
    text = (f"replicatord in {region} (pairs: {pairs}): tables, streams, outboxes, dead-letter queue, "
            "instance role and profile" + (", peer-writer user" if peer_writer else "")
            + ". Generated by replicatord provision --template-dir; do not edit.")
    if needs_key_pairs or peer_writer:
        text += (" Not created: the peers' key pairs in SSM (SecureString): see the outputs, or "
                 "replicatord provision --store-peer-credentials.")
    return text[:1024]


def templates(topology: Topology, regions: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """The template of every region (or of `regions`), by region."""
    return {region: template(topology, region) for region in (regions or topology.regions)}


class _Dumper(yaml.SafeDumper):
    """Block style, and lists indented under their key (as cfn-lint and most CloudFormation YAML)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def template_text(document: Mapping[str, Any]) -> str:
    """A template as YAML (intrinsic functions in their long form: plain YAML, no tags)."""
    return yaml.dump(dict(document), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120,
                     allow_unicode=True)


def write_templates(topology: Topology, directory: Path, regions: list[str] | None = None,
                    report: Callable[[str], None] = print) -> list[Path]:
    """`DIR/<region>.yaml` for every region (or `regions`); creates nothing in AWS."""
    unknown = [r for r in regions or [] if r not in topology.regions]
    if unknown:
        raise StartupError(f"unknown region {unknown[0]!r} (regions: {', '.join(topology.regions)})")
    documents = templates(topology, regions)
    written = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for region, document in documents.items():
            path = directory / f"{region}.yaml"
            path.write_text(template_text(document))
            written.append(path)
            report(f"{region}: wrote {path}")
    except OSError as exc:
        raise ConfigError([f"--template-dir: cannot write the templates: {exc.strerror}: {exc.filename}"]) from None
    return written
