"""`replicatord provision`: create, idempotently, everything the daemons need in every region.

Per region: each pair's table (stream NEW_AND_OLD_IMAGES, on-demand) and Kinesis stream, the
stats tables with their counters at 0, the lease table and the dead-letter queue. A second run
changes nothing and says so. Peer credentials are never read from the YAML: they come from
the environment or stdin and go to SSM (the secret as a SecureString).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from replicatord.aws import StartupError, make_non_dumpable, peer_credential_names
from replicatord.config import ConfigError, Topology
from replicatord.errors import ConditionFailed, NotFound, ReplicatorError, classify
from replicatord.lease_table import LEASE_TABLE_KEY, LEGACY_LEASE_KEY, LEGACY_LEASE_TABLE, from_legacy
from replicatord.tombstones import EXPIRES_AT, TOMB_KEY

STATS_COUNTERS = {"stats_table": "replicated_count", "loader_stats_table": "loaded_count"}


def _is(exc: ClientError, kind: type[ReplicatorError]) -> bool:
    """Whether boto3's error is of that kind, by the one table of error codes (errors.classify)."""
    return isinstance(classify(exc), kind)


class RegionProvisioner:
    def __init__(self, topology: Topology, region: str, report: Callable[[str], None]) -> None:
        self.topology = topology
        self.region = region
        self.config = topology.regions[region]
        self.report = report
        self.changes = 0
        session = boto3.session.Session(region_name=region)
        cfg = Config(retries={"mode": "standard", "max_attempts": 5})
        self.ddb: Any = session.client("dynamodb", endpoint_url=self.config.endpoint_url, config=cfg)
        self.kinesis: Any = session.client("kinesis", endpoint_url=self.config.endpoint_url, config=cfg)
        self.sqs: Any = session.client("sqs", endpoint_url=self.config.endpoint_url, config=cfg)
        self.ssm: Any = session.client("ssm", endpoint_url=self.config.endpoint_url, config=cfg)

    def _did(self, what: str) -> None:
        self.changes += 1
        self.report(f"{self.region}: {what}")

    def table(self, name: str, key: Mapping[str, str], stream: bool) -> bool:
        """Create the table (or enable its stream); True if it was created."""
        try:
            desc = self.ddb.describe_table(TableName=name)["Table"]
        except ClientError as exc:
            if not _is(exc, NotFound):
                raise
        else:
            spec = desc.get("StreamSpecification") or {}
            if stream and not (spec.get("StreamEnabled") and spec.get("StreamViewType") == "NEW_AND_OLD_IMAGES"):
                if spec.get("StreamEnabled"):
                    raise StartupError(
                        f"{self.region}: table {name} streams {spec.get('StreamViewType')}; replicatord needs "
                        "NEW_AND_OLD_IMAGES (disable the stream, then run provision again)"
                    )
                self.ddb.update_table(
                    TableName=name,
                    StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
                )
                self._did(f"enabled the NEW_AND_OLD_IMAGES stream on table {name}")
            return False
        names = list(key)
        kwargs: dict[str, Any] = {
            "TableName": name,
            "KeySchema": [{"AttributeName": n, "KeyType": kt} for n, kt in zip(names, ("HASH", "RANGE"), strict=False)],
            "AttributeDefinitions": [{"AttributeName": n, "AttributeType": key[n]} for n in names],
            "BillingMode": "PAY_PER_REQUEST",
        }
        if stream:
            kwargs["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
        self.ddb.create_table(**kwargs)
        self.ddb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        self._did(f"created table {name}" + (" (stream NEW_AND_OLD_IMAGES)" if stream else ""))
        return True

    def migrate_leases(self, table: str) -> None:
        """Copy the checkpoints of a replicatord 0.1 lease table (one `lease_key` hash key) into the
        new one, without owners: the daemons take the leases from where the old ones stopped."""
        try:
            legacy = self.ddb.describe_table(TableName=LEGACY_LEASE_TABLE)["Table"]
        except ClientError as exc:
            if _is(exc, NotFound):
                return
            raise
        if [k["AttributeName"] for k in legacy["KeySchema"]] != [LEGACY_LEASE_KEY]:
            return
        copied = 0
        for page in self.ddb.get_paginator("scan").paginate(TableName=LEGACY_LEASE_TABLE, ConsistentRead=True):
            for item in page["Items"]:
                self.ddb.put_item(TableName=table, Item=from_legacy(item))
                copied += 1
        self._did(f"copied {copied} leases (checkpoints) from {LEGACY_LEASE_TABLE} into {table}; "
                  f"delete {LEGACY_LEASE_TABLE} once the daemons run on the new version")

    def ttl(self, table: str, attribute: str) -> None:
        desc = self.ddb.describe_time_to_live(TableName=table).get("TimeToLiveDescription", {})
        if desc.get("TimeToLiveStatus") in ("ENABLED", "ENABLING") and desc.get("AttributeName") == attribute:
            return
        self.ddb.update_time_to_live(
            TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute}
        )
        self._did(f"enabled TTL on {table}.{attribute}")

    def counter(self, table: str, pk: str) -> None:
        try:
            self.ddb.put_item(
                TableName=table,
                Item={"PK": {"S": pk}, "cnt": {"N": "0"}},
                ConditionExpression="attribute_not_exists(PK)",
            )
        except ClientError as exc:
            if not _is(exc, ConditionFailed):
                raise
            return
        self._did(f"set {table} {pk} = 0")

    def kinesis_stream(self, name: str, shards: int, retention_hours: int | None = None) -> None:
        """The stream, and (for an outbox) at least `retention_hours` of retention."""
        try:
            summary = self.kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        except ClientError as exc:
            if not _is(exc, NotFound):
                raise
            self.kinesis.create_stream(StreamName=name, ShardCount=shards)
            self.kinesis.get_waiter("stream_exists").wait(StreamName=name,
                                                          WaiterConfig={"Delay": 1, "MaxAttempts": 60})
            self._did(f"created Kinesis stream {name} ({shards} shard{'s' if shards > 1 else ''})")
            summary = {"RetentionPeriodHours": 24}
        if retention_hours is not None and int(summary.get("RetentionPeriodHours") or 24) < retention_hours:
            self.kinesis.increase_stream_retention_period(StreamName=name, RetentionPeriodHours=retention_hours)
            self._did(f"set the retention of {name} to {retention_hours} hours")

    def queue(self, name: str) -> None:
        try:
            self.sqs.get_queue_url(QueueName=name)
            return
        except ClientError as exc:
            if not _is(exc, NotFound):
                raise
        # 14 days: the longest SQS keeps a message, time for an operator to look.
        self.sqs.create_queue(
            QueueName=name, Attributes={"MessageRetentionPeriod": "1209600", "MaximumMessageSize": "262144"}
        )
        self._did(f"created dead-letter queue {name}")

    def store_peer_credentials(self, peer: str, access_key: str, secret_key: str) -> None:
        target = self.topology.regions[peer].credentials
        if target is None:
            raise StartupError(f"regions.{peer}.credentials: missing, no SSM prefix to store the key pair under")
        access_name, secret_name = peer_credential_names(target.ssm_prefix)
        self.ssm.put_parameter(Name=access_name, Value=access_key, Type="String", Overwrite=True)
        self.ssm.put_parameter(Name=secret_name, Value=secret_key, Type="SecureString", Overwrite=True)
        self._did(f"stored {peer}'s key pair in SSM {access_name} and {secret_name} (SecureString)")

    def everything(self) -> None:
        for pair in self.topology.pairs:
            self.table(pair.tables[self.region], pair.key, stream=True)
            self.kinesis_stream(pair.streams[self.region], pair.kinesis_shards)
            if self.config.outbox is not None:
                for peer in self.topology.regions:
                    if peer != self.region:
                        self.kinesis_stream(pair.outbox_stream(self.region, peer), self.config.outbox.shards,
                                            self.config.outbox.retention_hours)
        for attr, pk in STATS_COUNTERS.items():
            table = getattr(self.config, attr)
            self.table(table, {"PK": "S"}, stream=False)
            self.counter(table, pk)
        if self.table(self.config.lease_table, LEASE_TABLE_KEY, stream=False):
            self.migrate_leases(self.config.lease_table)
        self.table(self.config.tombstone_table, {TOMB_KEY: "S"}, stream=False)
        self.ttl(self.config.tombstone_table, EXPIRES_AT)
        self.queue(self.config.dead_letter_queue)


SECRET_VARIABLES = ("REPLICATORD_PEER_ACCESS_KEY_ID", "REPLICATORD_PEER_SECRET_ACCESS_KEY")


def read_key_pair(access_key_id: str | None = None, secret_file: str | None = None) -> tuple[str, str]:
    """The peer's key pair for --store-peer-credentials. The access key id from the flag, else
    the first line of stdin (or a prompt); the secret from `secret_file`, else without echo at a
    terminal (getpass), else the next line of stdin. Never from the environment: a variable
    leaks into /proc/<pid>/environ, child processes and shell history."""
    if any(os.environ.get(name) for name in SECRET_VARIABLES):
        raise ConfigError([f"--store-peer-credentials: {' and '.join(SECRET_VARIABLES)} are not read (the "
                           "environment leaks secrets): unset them, give --access-key-id and --secret-file or "
                           "answer the prompt"])
    make_non_dumpable()
    tty = sys.stdin.isatty()
    lines = iter(()) if tty or (access_key_id and secret_file) else iter(sys.stdin.read().splitlines())
    if access_key_id is None:
        access_key_id = input("access key id: ").strip() if tty else next(lines, "").strip()
    if secret_file is not None:
        secret = _secret_from_file(secret_file)
    elif tty:
        secret = getpass.getpass("secret access key (not shown): ").strip()
    else:
        secret = next(lines, "").strip()
    if not access_key_id or not secret:
        raise StartupError("--store-peer-credentials: give the access key id (--access-key-id, or the first line "
                           "of stdin) and the secret (--secret-file, the prompt, or the next line of stdin)")
    return access_key_id, secret


def _secret_from_file(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as handle:
            secret = handle.readline().strip()
    except OSError as exc:
        raise ConfigError([f"--secret-file: cannot read {path}: {exc.strerror}"]) from None
    if mode & 0o077:
        print(f"warning: --secret-file {path} can be read by other users (chmod 600)", file=sys.stderr)
    return secret


def provision(
    topology: Topology,
    regions: list[str] | None = None,
    store_peer_credentials: list[str] | None = None,
    report: Callable[[str], None] = print,
    access_key_id: str | None = None,
    secret_file: str | None = None,
) -> int:
    unknown = [r for r in (regions or []) + (store_peer_credentials or []) if r not in topology.regions]
    if unknown:
        raise StartupError(f"unknown region {unknown[0]!r} (regions: {', '.join(topology.regions)})")
    changes = 0
    try:
        if store_peer_credentials:
            in_region, peer = store_peer_credentials
            if in_region == peer:
                raise StartupError("--store-peer-credentials: a region never holds its own credentials")
            access, secret = read_key_pair(access_key_id, secret_file)
            worker = RegionProvisioner(topology, in_region, report)
            worker.store_peer_credentials(peer, access, secret)
            return 0
        for region in regions or list(topology.regions):
            worker = RegionProvisioner(topology, region, report)
            worker.everything()
            changes += worker.changes
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise StartupError(f"{exc.operation_name}: {error.get('Code')}: {error.get('Message')}") from None
    except BotoCoreError as exc:
        raise StartupError(str(exc)) from None
    if not changes:
        report("everything is in place: nothing to change")
    return 0
