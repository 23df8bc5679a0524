"""A local setup of two or more regions: generated topology, daemons as subprocesses, stats and
metrics readers.

Shared by `replicatord demo` and the end-to-end tests, so both drive the real thing the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.config import Config

from replicatord.config import Region
from replicatord.lease_table import from_item
from replicatord.leases import Lease, latest_since
from replicatord.local.emulators import LOCAL_CREDENTIALS, free_port

# The original deployment's two regions first; then a second region in each partition.
ALL_REGIONS = ("cn-north-1", "ap-southeast-1", "cn-northwest-1", "eu-central-1")
REGIONS = ALL_REGIONS[:2]
LEASE_TABLE: str = Region.model_fields["lease_table"].default
SUFFIX = {"cn-north-1": "cn", "ap-southeast-1": "sg", "cn-northwest-1": "nx", "eu-central-1": "fra"}


def regions_for(count: int) -> tuple[str, ...]:
    """The first `count` local regions (2 to 4)."""
    if not 2 <= count <= len(ALL_REGIONS):
        raise ValueError(f"regions: 2 to {len(ALL_REGIONS)}, not {count}")
    return ALL_REGIONS[:count]


def table_of(region: str) -> str:
    return f"user-{SUFFIX[region]}"


def stream_of(region: str) -> str:
    return f"ddb_replication_stream_{SUFFIX[region]}"

# Each identity of the local world has a key pair of its own (the emulator accepts any), so that
# the local regions can record who made which call and the tests can check every call against the
# policy `replicatord iam` generates for that identity. The secrets are dummies, not secrets.
OPERATOR_KEY_PAIR = ("AKIDLOCALOPERATOR", "local-operator-dummy")


def instance_key_pair(region: str) -> tuple[str, str]:
    """What the instance profile of `region`'s daemon hosts gives them."""
    return f"AKIDLOCALDAEMON{SUFFIX[region].upper()}", f"local-instance-role-{SUFFIX[region]}-dummy"


def peer_writer_key_pair(region: str) -> tuple[str, str]:
    """The access key of `region`'s peer-writer user (stored in SSM of the other partition's regions)."""
    return f"AKIDLOCALPEERWRITER{SUFFIX[region].upper()}", f"local-peer-writer-{SUFFIX[region]}-dummy"


def identities(regions: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """Access key id -> (identity kind as `iam.identity_files` names it, its region; None: any)."""
    found: dict[str, tuple[str, str | None]] = {OPERATOR_KEY_PAIR[0]: ("operator", None)}
    for region in regions:
        found[instance_key_pair(region)[0]] = ("daemon", region)
        found[peer_writer_key_pair(region)[0]] = ("peer-writer", region)
    return found


def key_pair_env(pair: tuple[str, str]) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": pair[0], "AWS_SECRET_ACCESS_KEY": pair[1], "AWS_SESSION_TOKEN": "local"}


def topology_document(
    endpoints: Mapping[str, str],
    proxies: Mapping[str, str] | None = None,
    kinesis_shards: int = 1,
    tuning: Mapping[str, Any] | None = None,
    outbox: Mapping[str, Any] | None | bool = True,
) -> dict[str, Any]:
    """The original deployment's names (user-cn/user-sg, ...) pointed at local endpoints; every
    region with the default outbox (`outbox`: True), these outbox settings, or none (None)."""
    regions = {
        region: {
            "endpoint_url": url,
            "credentials": {"ssm_prefix": f"/DDBReplication/Table{SUFFIX[region].upper()}/"},
            "proxy": (proxies or {}).get(region),
            "dead_letter_queue": f"ddbreplicator{SUFFIX[region]}",
            **({} if outbox is True else {"outbox": None if outbox is False else outbox}),
        }
        for region, url in endpoints.items()
    }
    doc: dict[str, Any] = {
        "regions": regions,
        "pairs": [
            {
                "name": "user",
                "tables": {r: table_of(r) for r in endpoints},
                "streams": {r: stream_of(r) for r in endpoints},
                "kinesis_shards": kinesis_shards,
            }
        ],
        "metrics": {"listen": "127.0.0.1:0"},
    }
    if tuning:
        doc["tuning"] = dict(tuning)
    return doc


def write_topology(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@contextlib.contextmanager
def acting_as(pair: tuple[str, str]) -> Iterator[None]:
    """This process's default credentials are `pair`'s for the block (then as they were)."""
    changed = key_pair_env(pair)
    before = {name: os.environ.get(name) for name in changed}
    os.environ.update(changed)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_env(pair: tuple[str, str] = OPERATOR_KEY_PAIR) -> dict[str, str]:
    """The environment of a process of the local world: an operator command, unless `pair` is
    another identity's key pair."""
    env = {**os.environ, **key_pair_env(pair)}
    env.pop("AWS_PROFILE", None)
    return env


def client(service: str, region: str, endpoint_url: str) -> Any:
    session: Any = boto3.session.Session(
        aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=LOCAL_CREDENTIALS["AWS_SESSION_TOKEN"],
        region_name=region,
    )
    retries = Config(retries={"mode": "standard", "max_attempts": 10})
    return session.client(service, endpoint_url=endpoint_url, config=retries)


def read_counter(ddb: Any, table: str, pk: str) -> int:
    item = ddb.get_item(TableName=table, Key={"PK": {"S": pk}}, ConsistentRead=True).get("Item")
    return int(item["cnt"]["N"]) if item else 0


def scan_leases(ddb: Any, table: str = LEASE_TABLE) -> list[Lease]:
    """Every lease of a region's lease table (a consistent Scan: for tests and tools, not the daemon)."""
    return [from_item(item) for page in ddb.get_paginator("scan").paginate(TableName=table, ConsistentRead=True)
            for item in page["Items"]]


def wait_for(condition: Callable[[], bool], deadline_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll `condition` until true; raise TimeoutError naming `what` after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        if condition():
            return
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


class Drained:
    """A wait_for condition: every shard the daemons read, of every pair in every region (and of
    every outbox), is checkpointed at its stream's last record, and nothing moved since the
    previous poll.

    Positions, not the daemons' counters: a count stands still while a daemon waits on a slow
    call, and positions survive restarts. Work still to do always starts at a record past some
    checkpoint: a change not yet forwarded, a record not yet applied, or what an apply or a repair
    just wrote. Each poll reads the streams on from where the previous one stopped.

    A shard without a lease (new since the last lease sync) counts as drained while it is empty.
    For the emulators: an empty page is the end of what a shard holds now (records are there as
    soon as they are written).
    """

    def __init__(self, client: Callable[[str, str], Any], pipelines: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """`client(service, region)`; `pipelines`: region -> (table, Kinesis stream) of every pair."""
        self.pipelines = pipelines
        self.clients = {(service, region): client(service, region)
                        for service in ("dynamodb", "dynamodbstreams", "kinesis") for region in pipelines}
        self.tails: dict[tuple[str, str], tuple[str | None, str | None]] = {}  # -> (iterator, last sequence)
        self.last: list[tuple[str, str, str | None, str | None]] = []

    def __call__(self) -> bool:
        now = self.positions()
        quiet, self.last = now == self.last, now
        # An empty shard of a `latest` start keeps its marker until a record comes.
        return quiet and all(checkpoint == end or (end is None and latest_since(checkpoint) is not None)
                             for _, _, checkpoint, end in now)

    def positions(self) -> list[tuple[str, str, str | None, str | None]]:
        """(region, shard, its checkpoint, its stream's last sequence number) for every shard."""
        found = []
        for region, pairs in self.pipelines.items():
            ddb, streams, kinesis = (self.clients[s, region] for s in ("dynamodb", "dynamodbstreams", "kinesis"))
            checkpoints: dict[str, str | None] = {}
            for lease in scan_leases(ddb):
                pipeline, rest = lease.key.split("/", 1)
                stream, shard = rest.rsplit("/", 1)
                # A shipper's role names its peer (shipper:P); its outbox's name is enough here.
                checkpoints[f"{pipeline.split(':')[0]}/{stream.split('@')[0]}/{shard}"] = lease.checkpoint
            outboxes = [name for name in kinesis.list_streams().get("StreamNames", []) if "-outbox-" in name]
            for outbox in outboxes:
                for shard in kinesis.list_shards(StreamName=outbox)["Shards"]:
                    key = f"shipper/{outbox}/{shard['ShardId']}"
                    end = self._tail(region, key, kinesis, {"StreamName": outbox, "ShardId": shard["ShardId"]},
                                     lambda r: r["SequenceNumber"])
                    found.append((region, key, checkpoints.get(key), end))
            for table, stream in pairs:
                arn = ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
                for shard in streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
                    key = f"forwarder/{table}/{shard['ShardId']}"
                    end = self._tail(region, key, streams, {"StreamArn": arn, "ShardId": shard["ShardId"]},
                                     lambda r: r["dynamodb"]["SequenceNumber"])
                    found.append((region, key, checkpoints.get(key), end))
                for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
                    key = f"applier/{stream}/{shard['ShardId']}"
                    end = self._tail(region, key, kinesis, {"StreamName": stream, "ShardId": shard["ShardId"]},
                                     lambda r: r["SequenceNumber"])
                    found.append((region, key, checkpoints.get(key), end))
        return found

    def _tail(self, region: str, key: str, client: Any, shard: dict[str, str],
              sequence_of: Callable[[Any], str]) -> str | None:
        """The sequence number of the shard's last record (None while it is empty). `client` is
        the DynamoDB Streams or the Kinesis client: the same calls. Iterators expire between
        polls (the AWS-behaviour layer): then a new one starts after the last record seen."""
        iterator, last = self.tails.get((region, key), ("", None))
        while iterator is not None:
            if not iterator:
                where = ({"ShardIteratorType": "TRIM_HORIZON"} if last is None else
                         {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", self._sequence_param(client): last})
                iterator = client.get_shard_iterator(**shard, **where)["ShardIterator"]
            try:
                page = client.get_records(ShardIterator=iterator, Limit=1000)
            except client.exceptions.ExpiredIteratorException:
                iterator = ""
                continue
            if page["Records"]:
                last = sequence_of(page["Records"][-1])
            iterator = page.get("NextShardIterator")  # None: a closed shard, read to its end
            if not page["Records"]:
                break
        self.tails[region, key] = (iterator, last)
        return last

    @staticmethod
    def _sequence_param(client: Any) -> str:
        return "SequenceNumber" if client.meta.service_model.service_name == "dynamodbstreams" \
            else "StartingSequenceNumber"


def wait_drained(client: Callable[[str, str], Any], pipelines: Mapping[str, Sequence[tuple[str, str]]],
                 deadline_s: float, what: str = "both regions' pipelines to drain") -> None:
    # Polls a second apart: quiet for a whole poll interval (the daemons poll every 250 ms).
    wait_for(Drained(client, pipelines), deadline_s, what, interval_s=1.0)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to {'name{labels}': value}; label order as exposed."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric_sum(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for sample, value in metrics.items():
        base, _, rest = sample.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


class DaemonProcess:
    """`replicatord run` as a subprocess, with its log in a file and its metrics port known."""

    def __init__(self, config: Path, region: str, log_dir: Path, instance_id: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = {**local_env(instance_key_pair(region)), **(env or {})}
        self.region = region
        self.port = free_port()
        self.instance_id = instance_id or f"{region}-{self.port}"
        self.log_path = log_dir / f"daemon-{self.instance_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "replicatord.cli", "run", "--config", str(self.config),
             "--region", self.region, "--instance-id", self.instance_id,
             "--metrics-listen", f"127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        log.close()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except (urllib.error.URLError, OSError):
            return 0, ""

    def metrics(self) -> dict[str, float]:
        status, body = self.get("/metrics")
        return parse_metrics(body) if status == 200 else {}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, deadline_s: float = 30) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"daemon {self.instance_id} exited: {self.log_tail()}")
            return self.get("/readyz")[0] == 200

        wait_for(ready, deadline_s, f"daemon {self.instance_id} to be ready")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        return ""

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILL after `timeout_s`)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def provision_local(config: Path, report: Callable[[str], None] = print, only: Sequence[str] | None = None) -> None:
    """Provision the regions of `config` (or `only` these), as the operator, and store in each
    region the (dummy) key pair of every peer's peer-writer user across the partition border (with
    `only`: the pairs that involve those regions, both ways); a peer in the same partition needs
    none."""
    from replicatord.config import load_topology, partition_of
    from replicatord.ops.provision import RegionProvisioner, provision

    topology = load_topology(config)
    with acting_as(OPERATOR_KEY_PAIR):
        provision(topology, regions=list(only) if only else None, report=report)
        for region in topology.regions:
            for peer in topology.regions:
                if partition_of(peer) != partition_of(region) and (not only or region in only or peer in only):
                    RegionProvisioner(topology, region, report).store_peer_credentials(
                        peer, *peer_writer_key_pair(peer))
