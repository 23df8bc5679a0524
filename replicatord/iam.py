"""IAM policies: what a call needs, and whether a policy allows it.

`allows(policy, call)` evaluates an identity-based policy document the way IAM does for one
request (docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_evaluation-logic.html):
an explicit Deny wins, else a matching Allow is needed, else the call is refused (implicit
deny). Actions match case-insensitively, resources case-sensitively, both with the `*` and
`?` wildcards; the condition operators the project's policies use are supported, and any other
is an error rather than a guess.

Used by the local regions (to refuse what a policy does not allow, and to record what each
identity called), by the tests (every recorded call against the generated policies), and by
`replicatord preflight` (the statement to add for a refused call: `statement_for`).

`policies(topology, accounts)` generates the least-privilege policy of every identity from the
topology (`replicatord iam`, config/iam/): the daemons' instance role, the peer-writer user and
the operator's role of each region, each statement scoped to the resources the topology names.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from replicatord.aws import peer_credential_names
from replicatord.config import ConfigError, Topology, partition_of
from replicatord.lease_table import LEGACY_LEASE_TABLE


@dataclass(frozen=True)
class Call:
    """One authorization IAM makes for a request: an action on a resource, with the request's
    condition keys. A request may need several (TransactWriteItems: one per item)."""

    action: str  # service:Operation, e.g. dynamodb:PutItem
    resource: str  # an ARN, or "*" for actions without a resource type
    context: tuple[tuple[str, str], ...] = field(default=())

    def context_value(self, key: str) -> str | None:
        for name, value in self.context:
            if name.lower() == key.lower():
                return value
        return None


class PolicyError(ValueError):
    """A policy this evaluator cannot judge (an unknown condition operator): never guessed."""


@cache
def _pattern(glob: str, ignore_case: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def glob_match(glob: str, value: str, ignore_case: bool = False) -> bool:
    return _pattern(glob, ignore_case).fullmatch(value) is not None


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _string_condition(operator: str, key: str, wanted: list[str], call: Call) -> bool:
    if_exists = operator.endswith("IfExists")
    base = operator.removesuffix("IfExists")
    actual = call.context_value(key)
    negated = base in ("StringNotEquals", "StringNotLike", "StringNotEqualsIgnoreCase", "ArnNotEquals", "ArnNotLike")
    if actual is None:
        # A missing key: IfExists operators and negated operators match, the others do not.
        return if_exists or negated
    if base in ("StringEquals", "StringNotEquals", "ArnEquals", "ArnNotEquals"):
        found = actual in wanted
    elif base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        found = actual.lower() in (w.lower() for w in wanted)
    elif base in ("StringLike", "StringNotLike", "ArnLike", "ArnNotLike"):
        found = any(glob_match(w, actual) for w in wanted)
    elif base == "Bool":
        found = actual.lower() in (w.lower() for w in wanted)
    elif base in ("IpAddress", "NotIpAddress"):
        found = _in_networks(actual, wanted)
        return not found if base == "NotIpAddress" else found
    else:
        raise PolicyError(f"condition operator {operator} is not supported by this evaluator")
    return not found if negated else found


def _in_networks(address: str, networks: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)
    except ValueError as exc:
        raise PolicyError(f"not an address or network: {exc}") from None


def _conditions_hold(condition: Mapping[str, Any] | None, call: Call) -> bool:
    for operator, tests in (condition or {}).items():
        if operator.startswith(("ForAnyValue:", "ForAllValues:")):
            raise PolicyError(f"condition operator {operator} is not supported by this evaluator")
        for key, wanted in tests.items():
            if not _string_condition(operator, key, _listed(wanted), call):
                return False
    return True


def _statement_matches(statement: Mapping[str, Any], call: Call) -> bool:
    if "NotAction" in statement:
        if any(glob_match(a, call.action, ignore_case=True) for a in _listed(statement["NotAction"])):
            return False
    elif not any(glob_match(a, call.action, ignore_case=True) for a in _listed(statement.get("Action"))):
        return False
    if "NotResource" in statement:
        if any(glob_match(r, call.resource) for r in _listed(statement["NotResource"])):
            return False
    elif not any(glob_match(r, call.resource) for r in _listed(statement.get("Resource"))):
        return False
    return _conditions_hold(statement.get("Condition"), call)


def allowing_statements(policy: Mapping[str, Any], call: Call) -> list[str]:
    """The Sids of the Allow statements of `policy` that match `call` (which statements a call
    uses: the tests fail on a statement no call of the suite uses)."""
    return [str(statement.get("Sid", "")) for statement in statements(policy)
            if statement.get("Effect") == "Allow" and _statement_matches(statement, call)]


def statements(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = policy.get("Statement", [])
    return [found] if isinstance(found, Mapping) else list(found)


def decide(policies: Sequence[Mapping[str, Any]], call: Call) -> str:
    """"allow", "deny" (an explicit Deny matched) or "implicit_deny", over every policy of one identity."""
    allowed = False
    for policy in policies:
        for statement in statements(policy):
            if not _statement_matches(statement, call):
                continue
            if statement.get("Effect") == "Deny":
                return "deny"
            if statement.get("Effect") == "Allow":
                allowed = True
    return "allow" if allowed else "implicit_deny"


def allows(policy: Mapping[str, Any] | Sequence[Mapping[str, Any]], call: Call) -> bool:
    """Whether `policy` (one document, or the list of an identity's documents) allows `call`."""
    documents = [policy] if isinstance(policy, Mapping) else list(policy)
    return decide(documents, call) == "allow"


# --- generated policies -------------------------------------------------------------------------
#
# One identity per (kind, region): the daemons' instance role, the peer-writer IAM user whose key
# pair daemons of the other partition use, and the operator's role. Each statement names the
# topology's resources; only actions without a resource type get "*".

POLICY_VERSION = "2012-10-17"
# Documentation account ids (docs.aws.amazon.com uses 111122223333), one per partition so that a
# generated file shows at a glance which partition it is for.
PLACEHOLDER_ACCOUNTS = {"aws": "111122223333", "aws-cn": "444455556666", "aws-us-gov": "210987654321"}
KINDS = ("daemon", "peer-writer", "operator")
_FILE_PREFIX = {"daemon": "replicatord", "peer-writer": "peer-writer", "operator": "operator"}


@dataclass(frozen=True)
class Statement:
    """One Allow statement: its actions on its resources, under an optional condition."""

    sid: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    condition: Mapping[str, Mapping[str, tuple[str, ...]]] | None = None

    def document(self) -> dict[str, Any]:
        """The statement as IAM JSON: actions and resources sorted, a single value unlisted."""
        out: dict[str, Any] = {
            "Sid": self.sid,
            "Effect": "Allow",
            "Action": sorted(set(self.actions)),
            "Resource": _one_or_list(self.resources),
        }
        if self.condition:
            out["Condition"] = {op: {key: _one_or_list(values) for key, values in tests.items()}
                                for op, tests in self.condition.items()}
        return out


def _one_or_list(values: Sequence[str]) -> str | list[str]:
    unique = sorted(set(values))
    return unique[0] if len(unique) == 1 else unique


@dataclass(frozen=True)
class Accounts:
    """The account id of each region: the ones given, else the placeholder of its partition."""

    given: Mapping[str, str] = field(default_factory=dict)

    def of(self, region: str) -> str:
        return self.given.get(region) or PLACEHOLDER_ACCOUNTS[partition_of(region)]

    def placeholders(self, topology: Topology) -> list[str]:
        """The regions of `topology` that get a placeholder account id."""
        return [region for region in topology.regions if region not in self.given]

    def placeholder_warning(self, topology: Topology) -> str | None:
        """One line naming the regions that get a placeholder account id (None: there are none)."""
        regions = self.placeholders(topology)
        if not regions:
            return None
        shown = ", ".join(f"{region} ({self.of(region)})" for region in regions)
        return f"placeholder account ids for {shown}: give --account REGION=ACCOUNT_ID"

    @classmethod
    def parse(cls, values: Sequence[str] | None, topology: Topology) -> Accounts:
        """`--account REGION=ACCOUNT_ID` (repeatable); ConfigError with one line per bad value."""
        given: dict[str, str] = {}
        problems = []
        for value in values or []:
            region, sep, account = value.partition("=")
            if not sep or not re.fullmatch(r"[0-9]{12}", account):
                problems.append(f"--account: expected REGION=ACCOUNT_ID (12 digits), got {value!r}")
            elif region not in topology.regions:
                known = ", ".join(topology.regions)
                problems.append(f"--account: {region!r} is not in the topology (regions: {known})")
            elif given.get(region, account) != account:
                problems.append(f"--account: {region} given twice ({given[region]} and {account})")
            else:
                given[region] = account
        if problems:
            raise ConfigError(problems)
        return cls(given)


def arn(service: str, region: str, accounts: Accounts, resource: str) -> str:
    return f"arn:{partition_of(region)}:{service}:{region}:{accounts.of(region)}:{resource}"


def _tables(region: str, accounts: Accounts, names: Sequence[str], suffix: str = "") -> tuple[str, ...]:
    return tuple(arn("dynamodb", region, accounts, f"table/{name}{suffix}") for name in names)


def _streams(topology: Topology, region: str, accounts: Accounts) -> tuple[str, ...]:
    """The Kinesis stream of every pair in `region`."""
    return tuple(arn("kinesis", region, accounts, f"stream/{pair.streams[region]}") for pair in topology.pairs)


def _outboxes(topology: Topology, region: str, accounts: Accounts) -> tuple[str, ...]:
    """The outbox of every pair and peer in `region` (none if the region has `outbox: null`)."""
    if topology.regions[region].outbox is None:
        return ()
    return tuple(arn("kinesis", region, accounts, f"stream/{pair.outbox_stream(region, peer)}")
                 for pair in topology.pairs for peer in topology.regions if peer != region)


def _other_partition(topology: Topology, region: str) -> list[str]:
    return [peer for peer in topology.regions if partition_of(peer) != partition_of(region)]


def _same_partition_peers(topology: Topology, region: str) -> list[str]:
    return [peer for peer in topology.regions if peer != region and partition_of(peer) == partition_of(region)]


def peer_parameters(topology: Topology, region: str, accounts: Accounts) -> tuple[str, ...]:
    """The SSM parameters in `region` holding the key pairs of peers in another partition."""
    names: list[str] = []
    for peer in _other_partition(topology, region):
        credentials = topology.regions[peer].credentials
        if credentials is not None:
            names += peer_credential_names(credentials.ssm_prefix)
    # A parameter's ARN is "parameter" + its name, which starts with "/".
    return tuple(arn("ssm", region, accounts, f"parameter{name}") for name in names)


def ssm_endpoints(region: str) -> tuple[str, ...]:
    """What `kms:ViaService` holds for SSM's calls to KMS in `region`. AWS documents the
    SERVICE.REGION.amazonaws.com form; China endpoints end in .com.cn, so both are allowed there."""
    name = f"ssm.{region}.amazonaws.com"
    return (name, name + ".cn") if partition_of(region) == "aws-cn" else (name,)


def _kms_via_ssm(sid: str, actions: tuple[str, ...], region: str, accounts: Accounts,
                 parameters: tuple[str, ...]) -> Statement:
    """KMS for SSM's encryption of `parameters` only: any key, but only through SSM in this
    region and only for these parameters (SSM sends their ARN as the encryption context)."""
    return Statement(sid, actions, (arn("kms", region, accounts, "key/*"),), {
        "StringEquals": {"kms:ViaService": ssm_endpoints(region)},
        "StringLike": {"kms:EncryptionContext:PARAMETER_ARN": parameters},
    })


def _peer_statements(topology: Topology, region: str, accounts: Accounts, operator: bool) -> list[Statement]:
    """Reaching the peers: the other partition's key pair from SSM, the same partition's streams
    with this identity's own credentials."""
    out = []
    parameters = peer_parameters(topology, region, accounts)
    if parameters:
        ssm = ("ssm:GetParameter", "ssm:PutParameter") if operator else ("ssm:GetParameter",)
        kms = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey") if operator else ("kms:Decrypt",)
        out += [Statement("PeerCredentials", ssm, parameters),
                _kms_via_ssm("PeerCredentialsViaSsm", kms, region, accounts, parameters)]
    peer_streams = tuple(s for peer in _same_partition_peers(topology, region)
                         for s in _streams(topology, peer, accounts))
    if peer_streams:
        out.append(Statement("SamePartitionPeerStreams",
                             ("kinesis:PutRecords", "kinesis:DescribeStreamSummary"), peer_streams))
    return out


def _outbox_statements(topology: Topology, region: str, accounts: Accounts,
                       actions: tuple[str, ...]) -> list[Statement]:
    outboxes = _outboxes(topology, region, accounts)
    return [Statement("Outboxes", actions, outboxes)] if outboxes else []


def _document(statements: Sequence[Statement]) -> dict[str, Any]:
    return {"Version": POLICY_VERSION, "Statement": [s.document() for s in statements]}


def daemon_policy(topology: Topology, region: str, accounts: Accounts) -> dict[str, Any]:
    """The instance role of the daemons in `region`: exactly the calls a daemon makes."""
    me = topology.regions[region]
    user_tables = [pair.tables[region] for pair in topology.pairs]
    return _document([
        Statement("UserTables", ("dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:PutItem",
                                 "dynamodb:UpdateItem", "dynamodb:DeleteItem"),
                  _tables(region, accounts, user_tables)),
        Statement("UserTableStreams", ("dynamodb:DescribeStream", "dynamodb:GetShardIterator",
                                       "dynamodb:GetRecords"),
                  _tables(region, accounts, user_tables, "/stream/*")),
        # ListStreams has no resource type: a statement naming tables or streams never matches it.
        Statement("ListStreams", ("dynamodb:ListStreams",), ("*",)),
        Statement("Tombstones", ("dynamodb:DescribeTable", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"),
                  _tables(region, accounts, [me.tombstone_table])),
        # Renewals are TransactWriteItems of Update items: IAM authorizes each as dynamodb:UpdateItem.
        Statement("Leases", ("dynamodb:DescribeTable", "dynamodb:Query", "dynamodb:GetItem", "dynamodb:PutItem",
                             "dynamodb:UpdateItem", "dynamodb:DeleteItem"),
                  _tables(region, accounts, [me.lease_table])),
        Statement("StatsCounter", ("dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:UpdateItem"),
                  _tables(region, accounts, [me.stats_table])),
        Statement("ReplicationStreams", ("kinesis:DescribeStreamSummary", "kinesis:ListShards",
                                         "kinesis:GetShardIterator", "kinesis:GetRecords"),
                  _streams(topology, region, accounts)),
        Statement("DeadLetterQueue", ("sqs:GetQueueUrl", "sqs:GetQueueAttributes", "sqs:SendMessage"),
                  (arn("sqs", region, accounts, me.dead_letter_queue),)),
        *_outbox_statements(topology, region, accounts, ("kinesis:PutRecords", "kinesis:DescribeStreamSummary",
                                                         "kinesis:ListShards", "kinesis:GetShardIterator",
                                                         "kinesis:GetRecords")),
        *_peer_statements(topology, region, accounts, operator=False),
    ])


def peer_writer_policy(topology: Topology, region: str, accounts: Accounts) -> dict[str, Any]:
    """The IAM user in `region`'s account whose key pair the other partition's daemons use: it
    can put records on this region's streams and nothing else."""
    source_ips = topology.regions[region].peer_writer_source_ips
    condition = {"IpAddress": {"aws:SourceIp": tuple(source_ips)}} if source_ips else None
    return _document([Statement("PutReplicationRecords", ("kinesis:PutRecords", "kinesis:DescribeStreamSummary"),
                                _streams(topology, region, accounts), condition)])


def operator_policy(topology: Topology, region: str, accounts: Accounts) -> dict[str, Any]:
    """The role an operator uses in `region` for provision, status, verify [--repair], backfill,
    dlq, pause/resume and preflight: every call those make in this region (config/iam/README.md
    lists which command needs what)."""
    me = topology.regions[region]
    user_tables = [pair.tables[region] for pair in topology.pairs]
    return _document([
        Statement("UserTables", ("dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:UpdateTable",
                                 "dynamodb:Scan", "dynamodb:BatchGetItem", "dynamodb:GetItem", "dynamodb:PutItem",
                                 "dynamodb:UpdateItem", "dynamodb:DeleteItem"),
                  _tables(region, accounts, user_tables)),
        Statement("UserTableStreams", ("dynamodb:GetShardIterator", "dynamodb:GetRecords"),
                  _tables(region, accounts, user_tables, "/stream/*")),
        Statement("Tombstones", ("dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:DescribeTimeToLive",
                                 "dynamodb:UpdateTimeToLive", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"),
                  _tables(region, accounts, [me.tombstone_table])),
        Statement("Leases", ("dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:Query", "dynamodb:Scan",
                             "dynamodb:PutItem", "dynamodb:DeleteItem"),
                  _tables(region, accounts, [me.lease_table])),
        Statement("LegacyLeases", ("dynamodb:DescribeTable", "dynamodb:Scan"),
                  _tables(region, accounts, [LEGACY_LEASE_TABLE])),
        Statement("StatsCounter", ("dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:PutItem",
                                   "dynamodb:GetItem", "dynamodb:UpdateItem"),
                  _tables(region, accounts, [me.stats_table])),
        Statement("LoaderStatsCounter", ("dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:PutItem",
                                         "dynamodb:GetItem"),
                  _tables(region, accounts, [me.loader_stats_table])),
        Statement("ReplicationStreams", ("kinesis:CreateStream", "kinesis:DescribeStream",
                                         "kinesis:DescribeStreamSummary", "kinesis:GetShardIterator",
                                         "kinesis:GetRecords"),
                  _streams(topology, region, accounts)),
        # The Batch variants of DeleteMessage and ChangeMessageVisibility are authorized as these.
        Statement("DeadLetterQueue", ("sqs:CreateQueue", "sqs:GetQueueUrl", "sqs:GetQueueAttributes",
                                      "sqs:ReceiveMessage", "sqs:ChangeMessageVisibility", "sqs:DeleteMessage",
                                      "sqs:SendMessage"),
                  (arn("sqs", region, accounts, me.dead_letter_queue),)),
        *_outbox_statements(topology, region, accounts, ("kinesis:CreateStream", "kinesis:DescribeStream",
                                                         "kinesis:DescribeStreamSummary",
                                                         "kinesis:IncreaseStreamRetentionPeriod",
                                                         "kinesis:GetShardIterator", "kinesis:GetRecords")),
        *_peer_statements(topology, region, accounts, operator=True),
    ])


def identity_files(topology: Topology) -> dict[tuple[str, str], str]:
    """The file of each identity, by (kind, region); a peer-writer user only exists in a
    topology that spans partitions (daemons of another partition use its key pair)."""
    files = {}
    for region in topology.regions:
        for kind in KINDS:
            if kind == "peer-writer" and not _other_partition(topology, region):
                continue
            files[(kind, region)] = f"{_FILE_PREFIX[kind]}-{region}-policy.json"
    return files


_BUILDERS = {"daemon": daemon_policy, "peer-writer": peer_writer_policy, "operator": operator_policy}


def policies(topology: Topology, accounts: Accounts) -> dict[str, dict[str, Any]]:
    """Every identity's policy document, by file name (sorted)."""
    docs = {name: _BUILDERS[kind](topology, region, accounts)
            for (kind, region), name in identity_files(topology).items()}
    return dict(sorted(docs.items()))


def policy_text(document: Mapping[str, Any]) -> str:
    """A policy document as its file holds it."""
    return json.dumps(document, indent=2) + "\n"


def write_policies(documents: Mapping[str, Mapping[str, Any]], directory: Path) -> list[Path]:
    """One file per document in `directory` (created if missing); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, document in documents.items():
        path = directory / name
        path.write_text(policy_text(document))
        written.append(path)
    return written


def statement_for(call: Call) -> dict[str, Any]:
    """The narrowest statement that allows `call`: its action on its resource, conditioned on the
    request's context keys (what `replicatord preflight` prints for a refused call)."""
    service, _, operation = call.action.partition(":")
    sid = re.sub(r"[^A-Za-z0-9]", "", f"Allow{service.title()}{operation[:1].upper()}{operation[1:]}")
    condition = {"StringEquals": {key: (value,) for key, value in call.context}} if call.context else None
    return Statement(sid, (call.action,), (call.resource,), condition).document()
