"""`replicatord preflight --region R`: one harmless call of every kind the daemon makes, with the
daemon's own credentials, and what IAM said of each.

Run on a daemon host before the first start (and after any policy change). Each call is the
daemon's own call on the daemon's own resources, made so that it changes nothing:

- reads as they are (DescribeTable, ListStreams, the streams' first page, a lease Query, ...);
- writes under a condition that cannot hold (`attribute_exists(k) AND attribute_not_exists(k)`):
  DynamoDB authorizes the call before it evaluates the condition, so ConditionalCheckFailed
  means allowed, and nothing is written;
- PutRecords of a probe record on each peer's stream and outbox, which appliers count and skip
  (records.Probe); SendMessage of a probe letter to the dead-letter queue, which `dlq list`
  shows with reason `preflight` and `dlq purge --reason preflight --yes` removes.

A refused call gets the statement to add (iam.statement_for); the exit status is 0 only when
every call was allowed and every resource exists.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from replicatord.aws import Aws, StartupError, peer_credential_names
from replicatord.config import Pair, Settings, Topology, partition_of
from replicatord.dlq import bodies
from replicatord.errors import AccessDenied, ClockSkew, ConditionFailed, NotFound, ReplicatorError
from replicatord.iam import Call, statement_for
from replicatord.metrics import Metrics
from replicatord.records import Probe, encode_probe

log = logging.getLogger(__name__)

PROBE_VALUE = "replicatord-preflight"
ALLOWED, REFUSED, FAILED, SKIPPED = "allowed", "REFUSED", "FAILED", "not tried"


@dataclass(frozen=True)
class Outcome:
    action: str  # the IAM action, e.g. dynamodb:PutItem
    resource: str  # the ARN it was authorized on ("*" for actions without a resource)
    result: str  # ALLOWED, REFUSED, FAILED or SKIPPED
    detail: str = ""


class Preflight:
    """The checks of one region, in the order the daemon makes its calls."""

    def __init__(self, aws: Aws, topology: Topology, region: str) -> None:
        self.aws = aws
        self.topology = topology
        self.region = region
        self.me = topology.regions[region]
        self.partition = partition_of(region)
        self.account = "ACCOUNT"
        self.identity = "(unknown)"
        self.outcomes: list[Outcome] = []

    def arn(self, service: str, resource: str, region: str | None = None, account: str | None = None) -> str:
        return f"arn:{self.partition}:{service}:{region or self.region}:{account or self.account}:{resource}"

    async def check(self, action: str, resource: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Make one call; record what it showed; its answer, or None if it did not succeed."""
        try:
            answer = await call()
        except ConditionFailed:
            self.outcomes.append(Outcome(action, resource, ALLOWED, "condition refused, as meant: nothing written"))
            return None
        except AccessDenied as exc:
            self.outcomes.append(Outcome(action, resource, REFUSED, str(exc)))
            return None
        except NotFound as exc:
            self.outcomes.append(Outcome(action, resource, FAILED, f"not found ({exc}): run 'replicatord provision'"))
            return None
        except ClockSkew as exc:
            self.outcomes.append(Outcome(action, resource, FAILED, f"this host's clock is off: {exc}"))
            return None
        except ReplicatorError as exc:
            self.outcomes.append(Outcome(action, resource, FAILED, str(exc)))
            return None
        self.outcomes.append(Outcome(action, resource, ALLOWED))
        return answer

    def skip(self, action: str, resource: str, why: str) -> None:
        self.outcomes.append(Outcome(action, resource, SKIPPED, why))

    async def run(self) -> list[Outcome]:
        await self._who()
        for pair in self.topology.pairs:
            await self._table(pair.tables[self.region])
            await self._kinesis(pair.streams[self.region])
            await self._outboxes(pair)
        await self._leases()
        await self._tombstones()
        await self._stats()
        await self._queue()
        for peer in self.topology.regions:
            if peer != self.region:
                await self._peer(peer)
        return self.outcomes

    async def _who(self) -> None:
        """The account and identity the calls are made as (sts:GetCallerIdentity needs no permission)."""
        client = await self.aws.open_local("sts")
        try:
            answer = await self.aws.call("sts", "get_caller_identity", client=client)
        except ReplicatorError as exc:
            log.warning("cannot tell which identity this is (sts:GetCallerIdentity): %s", exc)
            return
        self.account, self.identity = str(answer["Account"]), str(answer["Arn"])

    # -- DynamoDB -----------------------------------------------------------------------------

    async def _describe(self, table: str) -> dict[str, Any] | None:
        answer = await self.check("dynamodb:DescribeTable", self.arn("dynamodb", f"table/{table}"),
                                  lambda: self.aws.call("dynamodb", "describe_table", TableName=table))
        return dict(answer["Table"]) if answer else None

    def _conditional_writes(self, table: str, key: dict[str, Any], operations: tuple[str, ...]) -> list[
            tuple[str, Callable[[], Awaitable[Any]]]]:
        """Writes that cannot take effect: the condition asks for the key to exist and not exist."""
        name = next(iter(key))
        never: dict[str, Any] = {"ConditionExpression": "attribute_exists(#k) AND attribute_not_exists(#k)",
                                 "ExpressionAttributeNames": {"#k": name}}
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "PutItem": lambda: self.aws.call("dynamodb", "put_item", TableName=table, Item=key, **never),
            "UpdateItem": lambda: self.aws.call(
                "dynamodb", "update_item", TableName=table, Key=key, UpdateExpression="SET #p = :p",
                ConditionExpression=never["ConditionExpression"],
                ExpressionAttributeNames={**never["ExpressionAttributeNames"], "#p": "replicatord_preflight"},
                ExpressionAttributeValues={":p": {"S": PROBE_VALUE}}),
            "DeleteItem": lambda: self.aws.call("dynamodb", "delete_item", TableName=table, Key=key, **never),
        }
        return [(operation, calls[operation]) for operation in operations]

    async def _writes(self, table: str, key: dict[str, Any], operations: tuple[str, ...]) -> None:
        for operation, call in self._conditional_writes(table, key, operations):
            await self.check(f"dynamodb:{operation}", self.arn("dynamodb", f"table/{table}"), call)

    async def _table(self, table: str) -> None:
        described = await self._describe(table)
        table_arn = self.arn("dynamodb", f"table/{table}")
        await self.check("dynamodb:ListStreams", "*",
                         lambda: self.aws.call("dynamodbstreams", "list_streams", TableName=table))
        if described is None:
            for action in ("GetItem", "PutItem", "UpdateItem", "DeleteItem"):
                self.skip(f"dynamodb:{action}", table_arn, "the table could not be described")
            return
        key = probe_key(described)
        await self.check("dynamodb:GetItem", table_arn,
                         lambda: self.aws.call("dynamodb", "get_item", TableName=table, Key=key, ConsistentRead=True))
        await self._writes(table, key, ("PutItem", "UpdateItem", "DeleteItem"))
        await self._stream(table, described.get("LatestStreamArn"))

    async def _stream(self, table: str, stream_arn: str | None) -> None:
        resource = self.arn("dynamodb", f"table/{table}/stream/*")
        if not stream_arn:
            for action in ("DescribeStream", "GetShardIterator", "GetRecords"):
                self.skip(f"dynamodb:{action}", resource, "the table has no stream (run 'replicatord provision')")
            return
        described = await self.check("dynamodb:DescribeStream", stream_arn, lambda: self.aws.call(
            "dynamodbstreams", "describe_stream", StreamArn=stream_arn, Limit=1))
        shards = (described or {}).get("StreamDescription", {}).get("Shards", [])
        if not shards:
            for action in ("GetShardIterator", "GetRecords"):
                self.skip(f"dynamodb:{action}", stream_arn, "no shard to read")
            return
        iterator = await self.check("dynamodb:GetShardIterator", stream_arn, lambda: self.aws.call(
            "dynamodbstreams", "get_shard_iterator", StreamArn=stream_arn, ShardId=shards[-1]["ShardId"],
            ShardIteratorType="LATEST"))
        if iterator is None:
            self.skip("dynamodb:GetRecords", stream_arn, "no iterator")
            return
        await self.check("dynamodb:GetRecords", stream_arn, lambda: self.aws.call(
            "dynamodbstreams", "get_records", ShardIterator=iterator["ShardIterator"], Limit=1))

    async def _leases(self) -> None:
        table = self.me.lease_table
        if await self._describe(table) is None:
            return
        partition = {"stream_id": {"S": "preflight"}, "shard_id": {"S": "probe"}}
        await self.check("dynamodb:Query", self.arn("dynamodb", f"table/{table}"), lambda: self.aws.call(
            "dynamodb", "query", TableName=table, KeyConditionExpression="#s = :s",
            ExpressionAttributeNames={"#s": "stream_id"}, ExpressionAttributeValues={":s": {"S": "preflight"}}))
        await self.check("dynamodb:GetItem", self.arn("dynamodb", f"table/{table}"), lambda: self.aws.call(
            "dynamodb", "get_item", TableName=table, Key=partition, ConsistentRead=True))
        await self._writes(table, partition, ("PutItem", "UpdateItem", "DeleteItem"))

    async def _tombstones(self) -> None:
        table = self.me.tombstone_table
        if await self._describe(table) is None:
            return
        key = {"tomb_key": {"S": PROBE_VALUE}}
        await self.check("dynamodb:BatchGetItem", self.arn("dynamodb", f"table/{table}"), lambda: self.aws.call(
            "dynamodb", "batch_get_item", RequestItems={table: {"Keys": [key], "ConsistentRead": True}}))
        await self._writes(table, key, ("UpdateItem",))

    async def _stats(self) -> None:
        table = self.me.stats_table
        if await self._describe(table) is None:
            return
        await self._writes(table, {"PK": {"S": PROBE_VALUE}}, ("UpdateItem",))

    # -- Kinesis, SQS, SSM, peers ---------------------------------------------------------------

    async def _kinesis(self, stream: str) -> None:
        resource = self.arn("kinesis", f"stream/{stream}")
        await self.check("kinesis:DescribeStreamSummary", resource, lambda: self.aws.call(
            "kinesis", "describe_stream_summary", StreamName=stream))
        listed = await self.check("kinesis:ListShards", resource, lambda: self.aws.call(
            "kinesis", "list_shards", StreamName=stream))
        shards = (listed or {}).get("Shards", [])
        if not shards:
            self.skip("kinesis:GetShardIterator", resource, "no shard listed")
            return
        iterator = await self.check("kinesis:GetShardIterator", resource, lambda: self.aws.call(
            "kinesis", "get_shard_iterator", StreamName=stream, ShardId=shards[-1]["ShardId"],
            ShardIteratorType="LATEST"))
        if iterator is not None:
            await self.check("kinesis:GetRecords", resource, lambda: self.aws.call(
                "kinesis", "get_records", ShardIterator=iterator["ShardIterator"], Limit=1))

    async def _outboxes(self, pair: Pair) -> None:
        """Each peer's outbox here: read by its shipper, written by the forwarder (a probe record,
        which the shipper ships and the peer's appliers count and skip)."""
        if self.me.outbox is None:
            return
        for peer in self.topology.regions:
            if peer == self.region:
                continue
            stream = pair.outbox_stream(self.region, peer)
            await self._kinesis(stream)
            data = encode_probe(Probe(pair.name, self.region, time.time()))
            await self.check("kinesis:PutRecords", self.arn("kinesis", f"stream/{stream}"), functools.partial(
                self.aws.call, "kinesis", "put_records", StreamName=stream,
                Records=[{"Data": data, "PartitionKey": PROBE_VALUE}]))

    async def _queue(self) -> None:
        name = self.me.dead_letter_queue
        resource = self.arn("sqs", name)
        found = await self.check("sqs:GetQueueUrl", resource, lambda: self.aws.call(
            "sqs", "get_queue_url", QueueName=name))
        if found is None:
            for action in ("GetQueueAttributes", "SendMessage"):
                self.skip(f"sqs:{action}", resource, "the queue's URL is unknown")
            return
        url = found["QueueUrl"]
        await self.check("sqs:GetQueueAttributes", resource, lambda: self.aws.call(
            "sqs", "get_queue_attributes", QueueUrl=url, AttributeNames=["MaximumMessageSize"]))
        envelope = {"reason": "preflight", "pair": self.topology.pairs[0].name, "pipeline": "preflight",
                    "region": self.region, "time": time.time(), "content": "preflight",
                    "detail": f"a probe of sqs:SendMessage by 'replicatord preflight' as {self.identity}; "
                              "remove it with 'replicatord dlq purge --reason preflight --yes'"}
        (body,) = bodies(envelope, f"preflight {time.time():.0f}")
        await self.check("sqs:SendMessage", resource, lambda: self.aws.call(
            "sqs", "send_message", QueueUrl=url, MessageBody=body))

    async def _peer(self, peer: str) -> None:
        settings: Settings = self.aws.settings
        if not settings.peer_uses_own_role(peer):
            credentials = self.topology.regions[peer].credentials
            for name in peer_credential_names(credentials.ssm_prefix) if credentials else ():
                await self.check("ssm:GetParameter", self.arn("ssm", f"parameter{name}"), functools.partial(
                    self.aws.call, "ssm", "get_parameter", Name=name, WithDecryption=True))
        try:
            client = self.aws.peers.get(peer) or await self.aws.open_peer(peer)
        except StartupError as exc:
            self.skip("kinesis:PutRecords", f"(streams of {peer})", str(exc))
            return
        peer_account = self.account if settings.peer_uses_own_role(peer) else "PEER_ACCOUNT"
        for pair in self.topology.pairs:
            stream = pair.streams[peer]
            resource = f"arn:{partition_of(peer)}:kinesis:{peer}:{peer_account}:stream/{stream}"
            await self.check("kinesis:DescribeStreamSummary", resource, functools.partial(
                self.aws.call, "kinesis", "describe_stream_summary", client=client, StreamName=stream))
            data = encode_probe(Probe(pair.name, self.region, time.time()))
            await self.check("kinesis:PutRecords", resource, functools.partial(
                self.aws.call, "kinesis", "put_records", client=client, StreamName=stream,
                Records=[{"Data": data, "PartitionKey": PROBE_VALUE}]))


def probe_key(described: dict[str, Any]) -> dict[str, Any]:
    """A key of the table that no application writes (its attribute types from the table)."""
    types = {a["AttributeName"]: a["AttributeType"] for a in described.get("AttributeDefinitions", [])}
    values = {"S": PROBE_VALUE, "N": "-1234567890123456789", "B": base64.b64encode(PROBE_VALUE.encode()).decode()}
    key = {}
    for element in described.get("KeySchema", []):
        kind = types.get(element["AttributeName"], "S")
        key[element["AttributeName"]] = {kind: values[kind] if kind != "B" else base64.b64decode(values["B"])}
    return key


async def preflight(topology: Topology, region: str) -> tuple[list[Outcome], str]:
    """Run every check of `region` with the default credentials; the outcomes and the identity."""
    settings = Settings(topology, region, "replicatord-preflight", "127.0.0.1", 0)
    async with Aws(settings, Metrics()) as aws:
        checks = Preflight(aws, topology, region)
        outcomes = await checks.run()
        return outcomes, checks.identity


def render(outcomes: list[Outcome], identity: str, region: str) -> str:
    """The table (call, resource, result), then the statements to add for what was refused."""
    lines = [f"preflight of {region} as {identity}", ""]
    width = max(len(o.action) for o in outcomes)
    for o in outcomes:
        detail = f"  ({o.detail})" if o.detail and o.result != ALLOWED else ""
        lines.append(f"{o.action.ljust(width)}  {o.result:<9}  {o.resource}{detail}")
    refused = [o for o in outcomes if o.result == REFUSED]
    failed = [o for o in outcomes if o.result in (FAILED, SKIPPED)]
    lines.append("")
    lines.append(f"{len(outcomes) - len(refused) - len(failed)} allowed, {len(refused)} refused, "
                 f"{len(failed)} failed or not tried")
    if refused:
        statements = [statement_for(Call(o.action, o.resource)) for o in refused]
        lines += ["", "add to the policy of this identity (or regenerate it: 'replicatord iam'):",
                  json.dumps({"Version": "2012-10-17", "Statement": statements}, indent=2)]
    return "\n".join(lines)


def passed(outcomes: list[Outcome]) -> bool:
    return all(o.result == ALLOWED for o in outcomes)
