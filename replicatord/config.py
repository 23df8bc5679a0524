"""The topology file (docs/design.md §2): one YAML file for every host, validated by pydantic.

Every problem is reported as one line naming the field path and the reason
(`ConfigError`), before any task starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

KeyType = Literal["S", "N", "B"]


class ConfigError(Exception):
    """A topology file or per-process setting that cannot be used. One line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Credentials(_Model):
    """How a daemon in another region authenticates in this one.

    `<ssm_prefix>AccessKey` (String) and `<ssm_prefix>SecretKey` (SecureString) are read from
    SSM Parameter Store in the caller's own region. Secret values never appear in this file.
    """

    ssm_prefix: Annotated[str, Field(min_length=1, pattern=r"^/")]


# In the User-Agent of every client replicatord makes, followed by the region whose daemon or
# operator command made it: CloudTrail's userAgent then tells which region's identity wrote a
# peer's stream, and the local IAM check picks that region's policy (local/iam_check.py).
# (Not "region/...": moto takes the region of a request from such a User-Agent token.)
CALLER_TAG = "replicatord-from/"


def partition_of(region: str) -> str:
    """The AWS partition a region belongs to: credentials of one are not valid in another."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


class Outbox(_Model):
    """Store and forward (outbox.py, docs/outbox.md): per pair and peer, a Kinesis stream in this
    region that holds the peer's records while it does not answer."""

    # How long an outbox keeps records: the longest outage to a peer that loses nothing. Kinesis
    # allows 24 to 8760 hours; past 24 hours AWS bills extended retention per shard-hour.
    retention_hours: Annotated[int, Field(ge=24, le=8760)] = 168
    shards: Annotated[int, Field(ge=1, le=500)] = 1


class Region(_Model):
    endpoint_url: str | None = None
    credentials: Credentials | None = None
    proxy: str | None = None
    # The environment variable that holds the proxy's password (in the unit's 0600 EnvironmentFile):
    # topology.yaml is world-readable, so a password never belongs in `proxy`. The URL names the user.
    proxy_password_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None
    # Optional: the addresses (CIDR) the other partition's daemons reach this region from (their
    # NAT or proxy egress). `replicatord iam` then lets this region's peer-writer key work only
    # from there (aws:SourceIp), so a leaked key is useless elsewhere.
    peer_writer_source_ips: list[str] = Field(default_factory=list)

    # Versioned name: the layout changed in 0.2 (a partition per stream); `provision` copies the
    # checkpoints of a 0.1 table named replicatord_leases into it.
    lease_table: str = "replicatord_leases_v2"
    tombstone_table: str = "replicatord_tombstones"
    stats_table: str = "replicator_stats"
    loader_stats_table: str = "loader_stats"
    dead_letter_queue: str
    # Per pair and peer, an outbox in this region (null: none, and a peer that does not answer
    # holds up forwarding to every peer, as before 0.4; records older than the table stream's
    # 24 hours are then lost).
    outbox: Outbox | None = Outbox()

    @model_validator(mode="after")
    def _networks(self) -> Region:
        for network in self.peer_writer_source_ips:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"peer_writer_source_ips: {network!r} is not an address or a network (CIDR)") from None
        return self


class Pair(_Model):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    tables: dict[str, str]
    streams: dict[str, str]
    # Key schema, hash key first then an optional range key (used by `provision`; the daemon
    # reads the real schema from DescribeTable).
    key: dict[str, KeyType] = Field(default_factory=lambda: {"PK": "S"})  # type: ignore[arg-type]
    kinesis_shards: Annotated[int, Field(ge=1, le=500)] = 1
    # Optional names of the outboxes, region -> peer -> Kinesis stream in that region (default:
    # outbox_stream(), the peer's stream name + "-outbox-" + the region).
    outboxes: dict[str, dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]]] = Field(
        default_factory=dict)

    def outbox_stream(self, region: str, peer: str) -> str:
        """The Kinesis stream in `region` that holds this pair's records for `peer` while diverted."""
        return self.outboxes.get(region, {}).get(peer) or f"{self.streams[peer]}-outbox-{region}"[:128]

    @model_validator(mode="after")
    def _key_size(self) -> Pair:
        if not 1 <= len(self.key) <= 2:
            raise ValueError("key: one hash key and at most one range key")
        return self


class Conflict(_Model):
    timestamp_attribute: str = "last_update_timestamp"
    region_attribute: str = "last_updater_region"
    # Set on an item by replicatord just before it deletes it, so that the forwarder knows the
    # REMOVE is not an application delete (docs/design.md §4).
    marker_attribute: str = "replicatord:deleting"
    # What the forwarder does with a local change whose image lacks the version attributes:
    # dead_letter: send it to the dead-letter queue, not replicated; stamp: write the version
    # attributes onto the local item (the stream's ApproximateCreationDateTime and this region),
    # and that change replicates.
    missing_version: Literal["dead_letter", "stamp"] = "dead_letter"
    # Deletes made by DynamoDB's TTL (REMOVE records with userIdentity Service/dynamodb):
    # replicate them as a delete of the version they removed (as Global Tables does), or skip
    # them (each region expires its own items).
    ttl_deletes: Literal["replicate", "skip"] = "replicate"
    # How long a delete's tombstone is kept: longer than the longest replication delay.
    tombstone_ttl_s: Annotated[float, Field(gt=0)] = 72 * 3600
    # A replicated change whose version timestamp is further ahead of this host's clock than this
    # is refused (dead-lettered, never applied), and operator commands report such an item instead
    # of copying it: a version from the future wins every conflict for ever. Applications stamp
    # epoch seconds; their clocks and ours may differ by this much at most.
    max_future_s: Annotated[float, Field(gt=0)] = 24 * 3600


class Metrics(_Model):
    listen: str = "0.0.0.0:9108"


class Tuning(_Model):
    """Timings and sizes; units are in the names."""

    poll_interval_ms: Annotated[int, Field(ge=10, le=10_000)] = 250
    # Reads (GetRecords) of one Kinesis shard are at least this far apart, records or not: Kinesis
    # allows 5 per second per shard for all consumers together.
    min_read_interval_ms: Annotated[int, Field(ge=0, le=10_000)] = 200
    # The same for DynamoDB Streams, which has no per-second read limit (but at most two readers
    # per shard): while records come, its shards are read this often.
    stream_read_interval_ms: Annotated[int, Field(ge=0, le=10_000)] = 100
    # A shard that found nothing for 10 s is read this often (0: as poll_interval_ms).
    idle_poll_interval_ms: Annotated[int, Field(ge=0, le=60_000)] = 500
    # While records come, a shard's checkpoint is written at most this often (and always when
    # the shard is caught up): a crash replays at most this much of the stream.
    checkpoint_interval_ms: Annotated[int, Field(ge=0, le=60_000)] = 1000
    get_records_limit: Annotated[int, Field(ge=1, le=1000)] = 1000
    apply_concurrency: Annotated[int, Field(ge=1, le=1024)] = 32
    shard_refresh_s: Annotated[float, Field(gt=0)] = 10.0
    # Leases, as in the Kinesis Client Library: a lease whose counter has not moved for
    # failover_s is expired and may be taken; holders renew well within that.
    failover_s: Annotated[float, Field(gt=0)] = 10.0
    renew_interval_s: Annotated[float, Field(gt=0)] = 3.0
    lease_take_interval_s: Annotated[float, Field(gt=0)] = 1.0
    drain_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    backoff_base_ms: Annotated[int, Field(ge=1)] = 100
    backoff_max_ms: Annotated[int, Field(ge=1)] = 5_000
    aws_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # After the peer refuses the key pair (rotated or revoked), SSM is read again at most this often.
    peer_credentials_refresh_s: Annotated[float, Field(gt=0)] = 30.0
    # Where a pipeline starts the first time it runs on a stream (no lease of it yet): the oldest
    # record still in the stream (trim_horizon: the last 24 hours are replicated), or the changes
    # made from the first start on (latest: bring existing data over with backfill instead).
    initial_position: Literal["trim_horizon", "latest"] = "trim_horizon"
    # A record whose write fails with an error not known to be passing (an unknown AWS error
    # code, access denied, a missing resource) is tried this many times, then dead-lettered.
    # Known passing conditions (throttling, 5xx, unreachable) are retried until they pass.
    max_record_attempts: Annotated[int, Field(ge=1, le=1000)] = 10
    # Optional: such a record is dead-lettered at its next failure once it is older than this
    # (time since it entered the stream), whatever its attempts.
    max_record_age_s: Annotated[float, Field(gt=0)] | None = None
    # Memory (README, "Memory"): pages read ahead are held within this budget, daemon-wide (a page
    # a shard must read is always read); the applier decodes and applies a page this many bytes
    # of payload at a time (a larger record alone).
    read_ahead_budget_mib: Annotated[int, Field(ge=0, le=4096)] = 64
    apply_chunk_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # With an outbox: puts to a peer that have failed for this long divert its records to the
    # outbox (at once if the peer probe finds it unreachable).
    outbox_after_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _renew_within_failover(self) -> Tuning:
        if self.renew_interval_s * 2 > self.failover_s:
            raise ValueError("tuning.renew_interval_s: renew at least twice per failover_s")
        return self


class Topology(_Model):
    regions: dict[str, Region]
    pairs: Annotated[list[Pair], Field(min_length=1)]
    conflict: Conflict = Conflict()
    metrics: Metrics = Metrics()
    tuning: Tuning = Tuning()

    @model_validator(mode="after")
    def _pairs_cover_regions(self) -> Topology:
        if len(self.regions) < 2:
            raise ValueError("regions: at least two regions are needed")
        names = set(self.regions)
        seen: set[str] = set()
        for i, pair in enumerate(self.pairs):
            if pair.name in seen:
                raise ValueError(f"pairs[{i}].name: duplicate pair name {pair.name!r}")
            seen.add(pair.name)
            for field in ("tables", "streams"):
                got = set(getattr(pair, field))
                if got != names:
                    missing = sorted(names - got)
                    extra = sorted(got - names)
                    why = f"missing {missing}" if missing else f"unknown regions {extra}"
                    raise ValueError(f"pairs[{i}].{field}: must name every region ({why})")
            for region, peers in pair.outboxes.items():
                unknown = sorted(({region} | set(peers)) - names) or sorted({region} & set(peers))
                if unknown:
                    raise ValueError(f"pairs[{i}].outboxes.{region}: not a region and its peers: {unknown}")
        return self


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (YAML keeps the last silently), a
    key that is a list or a map, and aliases (an alias bomb would make validation walk an
    exponential tree; a topology file has no use for them)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported in a topology file",
                                              event.start_mark)
        return super().compose_node(parent, index)  # type: ignore[arg-type]


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, list | dict | set):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a name, not a {type(key).__name__}", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_topology(text: str, source: str = "<config>") -> Topology:
    """Parse and validate a topology document; raise ConfigError with one line per problem."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError([f"{source}: invalid YAML{where}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar the constructors cannot take
        raise ConfigError([f"{source}: invalid YAML: {type(exc).__name__}: {str(exc)[:200]}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping at the top level"])
    try:
        return Topology.model_validate(data)
    except RecursionError:
        raise ConfigError([f"{source}: nested too deeply"]) from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            loc = _format_loc(tuple(err["loc"]))
            if msg.startswith(("pairs[", "regions:")):
                lines.append(f"{source}: {msg}")
            elif err["type"] == "extra_forbidden":
                lines.append(f"{source}: {loc}: unknown key")
            else:
                lines.append(f"{source}: {loc}: {msg}")
        raise ConfigError(lines) from None


def load_topology(path: str | Path) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_topology(text, str(path))


@dataclass(frozen=True)
class Settings:
    """Per-process settings: flags first, then the environment, then the shared file."""

    topology: Topology
    region: str
    instance_id: str
    metrics_host: str
    metrics_port: int

    @property
    def me(self) -> Region:
        return self.topology.regions[self.region]

    @property
    def peers(self) -> list[str]:
        return [name for name in self.topology.regions if name != self.region]

    def peer_uses_own_role(self, peer: str) -> bool:
        """A peer in this region's partition is reached with the instance's own role; a peer
        across the partition border with the key pair its `credentials` name in SSM."""
        return partition_of(peer) == partition_of(self.region)


def parse_listen(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError([f"{what}: expected HOST:PORT, got {value!r}"])
    return host, int(port)


def resolve_settings(
    topology: Topology,
    region: str | None,
    instance_id: str | None = None,
    metrics_listen: str | None = None,
) -> Settings:
    region = region or os.environ.get("REPLICATORD_REGION")
    if not region:
        raise ConfigError(["--region: missing (or set REPLICATORD_REGION)"])
    if region not in topology.regions:
        known = ", ".join(sorted(topology.regions))
        raise ConfigError([f"--region: {region!r} is not in the topology (regions: {known})"])
    instance_id = (
        instance_id or os.environ.get("REPLICATORD_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"
    )
    listen = metrics_listen or os.environ.get("REPLICATORD_METRICS_LISTEN")
    if listen:
        host, port = parse_listen(listen, "--metrics-listen")
    else:
        host, port = parse_listen(topology.metrics.listen, "metrics.listen")
    return Settings(topology, region, instance_id, host, port)


def proxy_with_password(region: str, config: Region, environ: Mapping[str, str]) -> str | None:
    """The proxy URL others use to reach `region`, with the password from the variable that
    `proxy_password_env` names; ConfigError (one line) if it is unset or the URL has no user."""
    if config.proxy is None or config.proxy_password_env is None:
        return config.proxy
    password = environ.get(config.proxy_password_env)
    if not password:
        raise ConfigError([f"regions.{region}.proxy_password_env: {config.proxy_password_env} is not set (put it "
                           "in /etc/replicatord/replicatord.env, mode 0600)"])
    scheme, sep, rest = config.proxy.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not sep or not at or not userinfo or ":" in userinfo:
        raise ConfigError([f"regions.{region}.proxy: with proxy_password_env, give the user and no password "
                           "(http://USER@HOST:PORT)"])
    return f"{scheme}://{userinfo}:{urllib.parse.quote(password, safe='')}@{hostport}"


def proxy_password_in_file(config: Region) -> bool:
    """Whether the topology's proxy URL holds a password (the file is meant to be world-readable)."""
    if config.proxy is None:
        return False
    rest = config.proxy.partition("://")[2] or config.proxy
    userinfo, at, _ = rest.rpartition("@")
    return bool(at) and ":" in userinfo


def redact_url(url: str) -> str:
    """`url` with the secret of its user info replaced by ``***``, for logs and printed plans.

    ``http://user:s3cret@host:3128`` becomes ``http://user:***@host:3128``: the user name stays
    (it tells an operator which proxy account is configured; it authenticates nothing alone),
    the password goes. User info without a password (``http://token@host``) may itself be a
    token, so all of it becomes ``***``. A URL without user info comes back unchanged.

    Everything between the scheme and the last ``@`` counts as user info, so a password holding
    an unescaped ``@``, ``/``, ``?`` or ``#`` is hidden too (a URL parser would cut it into
    the path and print it); a URL with an ``@`` in its path is over-redacted, which is harmless.
    """
    scheme, sep, rest = url.partition("://")
    # No scheme ("user:pass@host:3128", which botocore accepts for a proxy), or a "://" that sits
    # inside the password: then all of the URL is scanned for user info.
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        scheme, sep, rest = "", "", url
    userinfo, at, hostport = rest.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{shown}@{hostport}"
