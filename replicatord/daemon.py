"""The daemon: startup() -> main_loop() -> shutdown(), as in uvicorn's server.

startup() checks everything it needs (tables, streams, queue, SSM parameters) and fails with
one line before any task starts. Signal handlers only set the stop event. On stop, every
shard consumer finishes or abandons its page, checkpoints and releases its lease, bounded by
`tuning.drain_timeout_s`; what is still running then is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from replicatord.aio import poll, run_together
from replicatord.applier import Applier
from replicatord.aws import LEASES, Aws, StartupError, make_non_dumpable
from replicatord.budget import ByteBudget
from replicatord.checkpointer import RELEASE_TIMEOUT_S
from replicatord.config import Pair, Settings
from replicatord.consumer import Processor
from replicatord.dlq import MAX_BODY_BYTES, DeadLetterQueue
from replicatord.errors import NotFound, ReplicatorError
from replicatord.forwarder import Forwarder
from replicatord.health import HttpServer, readiness
from replicatord.lease_table import LEASE_TABLE_KEY, LEGACY_LEASE_KEY, LeaseTable
from replicatord.metrics import Metrics
from replicatord.outbox import MODE_VALUE, Happened, Mode, Route
from replicatord.pipeline import PauseWatch, Pipeline, Shared
from replicatord.provenance import Provenance
from replicatord.renewal import RenewalBatcher
from replicatord.shipper import OutboxCount, Shipper
from replicatord.sources import (
    APPLIER,
    FORWARDER,
    DynamoStreamSource,
    KinesisSource,
    StreamSource,
    oldest_unprocessed,
    shipper_role,
)
from replicatord.streams import Forwarding
from replicatord.tombstones import TombstoneTable

log = logging.getLogger(__name__)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness, the watchdog and stopping; no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# A peer this daemon feeds direct: its outbox is read this often (for the gauges, and in case
# another instance of the region diverted); a diverted or draining one at every probe.
OUTBOX_CHECK_DIRECT_S = 30.0


def ignore_environment_proxies() -> list[str]:
    """Drop HTTP(S)_PROXY and ALL_PROXY (any case) from this process's environment: the proxy of
    the border path is the topology's, per peer, and must never capture DynamoDB, SQS, SSM or
    instance-metadata (credentials) traffic. Returns the names dropped."""
    dropped = [name for name in list(os.environ) if name.upper() in PROXY_VARIABLES]
    for name in dropped:
        del os.environ[name]
    if dropped:
        log.warning("ignoring %s from the environment: only the topology's per-peer proxies are used",
                    ", ".join(sorted(dropped)))
    return dropped


class Daemon:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.stop = asyncio.Event()
        self.aws = Aws(settings, self.metrics)
        self.pipelines: list[Pipeline] = []
        self.appliers: list[Applier] = []
        self.forwarding: dict[str, Forwarding] = {}  # pair -> its forwarder pipelines
        # Pages read and not yet handled, every pipeline together (budget.py).
        self.budget = ByteBudget(settings.topology.tuning.read_ahead_budget_mib * 1024 * 1024)
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[Pipeline, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self.queue_url = ""
        self.started = False
        self.reachable: dict[str, bool] = {}  # peer -> its Kinesis answered the last probe
        # Store and forward (outbox.py): (pair, peer) -> the peer's route, and its outbox's shipper.
        self.routes: dict[tuple[str, str], Route] = {}
        self.shippers: dict[tuple[str, str], Pipeline] = {}
        self._outbox_checked_at: dict[tuple[str, str], float] = {}
        self.outbox_count = OutboxCount(self.aws, settings.me.stats_table)
        self.shared: Shared | None = None  # what every pipeline shares, once the lease table is found
        self.http = HttpServer(self.metrics.registry, settings.metrics_host, settings.metrics_port, self.ready)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        ignore_environment_proxies()
        if not make_non_dumpable():
            log.warning("cannot make the process non-dumpable (prctl); rely on LimitCORE=0")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        async with self.aws:
            await self.startup()
            try:
                await self.main_loop()
            finally:
                await self.shutdown()

    async def startup(self) -> None:
        s = self.settings
        me = s.me
        topology = s.topology
        self.queue_url, max_body_bytes = await self._queue(me.dead_letter_queue)
        dlq = DeadLetterQueue(self.aws, self.queue_url, self.metrics, max_body_bytes)
        lease_table = await self._require_table(me.lease_table, "lease table")
        if sorted(k["AttributeName"] for k in lease_table.get("KeySchema", [])) != sorted(LEASE_TABLE_KEY):
            raise StartupError(
                f"lease table {me.lease_table!r} in {s.region} has the layout of replicatord 0.1 (key "
                f"{LEGACY_LEASE_KEY}); set regions.{s.region}.lease_table to a new name (default "
                "replicatord_leases_v2) and run 'replicatord provision', which copies its checkpoints"
            )
        await self._require_table(me.stats_table, "stats table")
        await self._require_table(me.tombstone_table, "tombstone table")
        leases = LeaseTable(self.aws, me.lease_table, self.aws.local[LEASES])
        self.shared = Shared(leases, RenewalBatcher(leases), s.instance_id, s.region, topology.tuning,
                             self.metrics, self.stop, self.budget)
        tombstones = TombstoneTable(self.aws, me.tombstone_table, topology.conflict.tombstone_ttl_s, topology.tuning)
        for peer in s.peers:
            await self.aws.open_peer(peer)
        for pair in topology.pairs:
            # Series that otherwise appear only with their first problem: a healthy daemon shows 0
            # (a dashboard panel says "No data" for a series that does not exist).
            self.metrics.stream_problem.labels(pair.name).set(0)
            for peer in s.peers:
                self.metrics.paused.labels(pair.name, f"{s.region}:{peer}").set(0)
            await self._start_pair(pair, tombstones, dlq)
        for peer in s.peers:
            # Not fatal: the peer may come back; readiness and the metric say it is not there.
            self.metrics.peer_reachable.labels(peer).set(0)
            self.reachable[peer] = False
        await self.http.start()
        self.metrics.up.set(1)
        self.started = True
        sd_notify("READY=1")
        log.info("replicatord %s in %s: %d pairs, peers %s", s.instance_id, s.region,
                 len(topology.pairs), ", ".join(s.peers))

    async def main_loop(self) -> None:
        drain_s = self.settings.topology.tuning.drain_timeout_s
        assert self.shared is not None
        async with asyncio.TaskGroup() as group:
            self._group = group
            tasks = self._tasks
            for pipeline in self.pipelines:
                self._start_pipeline(pipeline)
            tasks.append(group.create_task(self.shared.renewals.run(self.stop), name="renewals"))
            tasks += [group.create_task(applier.report(), name=f"stats {applier.pair}") for applier in self.appliers]
            tasks.append(group.create_task(self._watchdog(), name="watchdog"))
            tasks.append(group.create_task(self._probe_peers(), name="probe-peers"))
            tasks.append(group.create_task(self._follow_streams(), name="follow-streams"))
            await self.stop.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: draining in-flight pages (at most %.0fs)", drain_s)
            # Each task sees the stop event and ends by itself: shard consumers finish or abandon
            # their page, checkpoint and release their lease. Past the bound, cancel the rest
            # (a cancelled consumer still releases its lease, within RELEASE_TIMEOUT_S).
            _, pending = await asyncio.wait(tasks, timeout=drain_s)
            if pending:
                log.warning("drain took longer than %.0fs: cancelling %s", drain_s,
                            ", ".join(sorted(t.get_name() for t in pending)))
                for task in pending:
                    task.cancel()

    async def shutdown(self) -> None:
        self.metrics.up.set(0)
        for applier in self.appliers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applier.flush_stats(), RELEASE_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outbox_count.flush(), RELEASE_TIMEOUT_S)
        await self.http.stop()
        log.info("stopped")

    # -- startup checks ----------------------------------------------------------------------

    async def _must(self, what: str, service: str, operation: str, **kwargs: Any) -> Any:
        """A call that startup cannot go on without: StartupError with one line if it fails."""
        try:
            return await self.aws.call(service, operation, **kwargs)
        except NotFound:
            raise StartupError(f"{what} not found in {self.settings.region} (run 'replicatord provision')") from None
        except ReplicatorError as exc:
            raise StartupError(f"{what} in {self.settings.region}: {exc}") from None

    async def _queue(self, name: str) -> tuple[str, int]:
        """The dead-letter queue's URL and its message size limit (messages are cut to fit it)."""
        what = f"dead-letter queue {name!r}"
        url = str((await self._must(what, "sqs", "get_queue_url", QueueName=name))["QueueUrl"])
        attributes = await self._must(what, "sqs", "get_queue_attributes", QueueUrl=url,
                                      AttributeNames=["MaximumMessageSize"])
        size = attributes.get("Attributes", {}).get("MaximumMessageSize", "")
        return url, int(size) if size.isdigit() else MAX_BODY_BYTES

    async def _require_table(self, table: str, what: str) -> dict[str, Any]:
        return dict((await self._must(f"{what} {table!r}", "dynamodb", "describe_table", TableName=table))["Table"])

    async def _kinesis_source(self, pair: str, stream: str, role: str = APPLIER, what: str = "Kinesis stream"
                              ) -> KinesisSource:
        summary = (await self._must(f"pair {pair}: {what} {stream!r}", "kinesis", "describe_stream_summary",
                                    StreamName=stream))["StreamDescriptionSummary"]
        hours = summary.get("RetentionPeriodHours") or 24
        return KinesisSource(self.aws, stream, f"{summary['StreamCreationTimestamp'].timestamp():.0f}",
                             float(hours) * 3600, role)

    def _pipeline(self, pair: str, source: StreamSource, processor: Processor, start: str,
                  retiring: bool = False, pause: PauseWatch | None = None) -> Pipeline:
        """Every pipeline is built here: at startup, and when a table's stream is replaced. Without
        outboxes, `pause` holds the forwarder; with them, each shipper (_shipper)."""
        shared = self.shared
        assert shared is not None
        if pause is None and source.role == FORWARDER and self.settings.me.outbox is None:
            pause = PauseWatch(f"{source.role} {pair}", pair, shared)
        return Pipeline(pair, source, processor, shared, initial_position=start, retiring=retiring, pause=pause)

    async def _shipper(self, pair: Pair, peer: str, dlq: DeadLetterQueue) -> tuple[Route, str]:
        """The peer's route and the pipeline that ships its outbox (outbox.py); always read from the
        outbox's oldest record, whatever `initial_position` says."""
        assert self.shared is not None
        tuning = self.settings.topology.tuning
        name = pair.outbox_stream(self.settings.region, peer)
        gauge = self.metrics.peer_mode.labels(pair.name, peer)
        route = Route(pair.name, peer, tuning.outbox_after_s, lambda mode: gauge.set(MODE_VALUE[mode]))
        source = await self._kinesis_source(pair.name, name, shipper_role(peer), f"outbox of {peer}")
        shipper = Shipper.build(source, pair.name, peer, pair.streams[peer], route, dlq, tuning, self.metrics,
                                self.stop, self.outbox_count)
        pause = PauseWatch(f"{source.role} {pair.name}", pair.name, self.shared, peer, route)
        self.routes[pair.name, peer] = route
        self.shippers[pair.name, peer] = self._pipeline(pair.name, source, shipper, "trim_horizon", pause=pause)
        self.pipelines.append(self.shippers[pair.name, peer])
        return route, name

    async def _start_pair(self, p: Pair, tombstones: TombstoneTable, dlq: DeadLetterQueue) -> None:
        """The pair's applier, forwarder and shipper pipelines (docs/streams.md: which streams, from where)."""
        s = self.settings
        topology = s.topology
        assert self.shared is not None
        leases = self.shared.leases
        pair, table = p.name, p.tables[s.region]
        peers = {peer: p.streams[peer] for peer in s.peers}
        described = await self._require_table(table, f"pair {pair}: table")
        kinesis = await self._kinesis_source(pair, p.streams[s.region])
        rules = Provenance.from_table(s.region, s.peers, described, topology.conflict)
        applier = Applier(self.aws, pair, table, s.me.stats_table, tombstones, topology.conflict, topology.tuning,
                          dlq, self.metrics, self.stop, rules)
        outboxes = {peer: await self._shipper(p, peer, dlq) for peer in s.peers} if s.me.outbox else {}
        forwarder = Forwarder(self.aws, pair, peers, tombstones, topology.conflict, topology.tuning, dlq, applier,
                              self.metrics, self.stop, outboxes, self.outbox_count)
        forwarding = Forwarding(self.aws, leases, pair, table, lambda arn, start, retiring: self._pipeline(
            pair, DynamoStreamSource(self.aws, table, arn), forwarder, start, retiring), self.metrics)
        try:
            self.pipelines += await forwarding.startup(topology.tuning.initial_position)
            applier_start = await self._applier_start(pair, kinesis, leases)
        except ReplicatorError as exc:
            raise StartupError(f"pair {pair}: the streams of table {table!r}: {exc}") from None
        self.forwarding[pair] = forwarding
        self.pipelines.append(self._pipeline(pair, kinesis, applier, applier_start))
        self.appliers.append(applier)

    async def _applier_start(self, pair: str, kinesis: KinesisSource, leases: LeaseTable) -> str:
        """Where the applier starts on shards without a lease: `initial_position` on a first start,
        the oldest record on a Kinesis stream created again since the last run."""
        created = kinesis.incarnation.rsplit("@", 1)[1]
        followed = await leases.followed(pair, APPLIER, kinesis.name)
        await leases.note_followed(pair, APPLIER, kinesis.name, created)
        if followed and created not in followed:
            log.warning("pair %s: Kinesis stream %s was created again since the last run: reading it from its "
                        "oldest record", pair, kinesis.name)
            return "trim_horizon"
        return self.settings.topology.tuning.initial_position

    # -- background duties -------------------------------------------------------------------

    def _start_pipeline(self, pipeline: Pipeline) -> None:
        assert self._group is not None
        task = self._group.create_task(pipeline.run(), name=f"{pipeline.source.role}/{pipeline.pair}")
        self._tasks.append(task)
        self._running[pipeline] = task

    async def _follow_streams(self) -> None:
        """Every `shard_refresh_s`: each pair's table stream (a stream disabled and enabled again is
        a new stream: streams.Forwarding), and pipelines that stopped leave readiness."""
        async for _ in poll(self.settings.topology.tuning.shard_refresh_s, self.stop):
            for pipeline, task in list(self._running.items()):
                if task.done() and pipeline in self.pipelines:
                    self.pipelines.remove(pipeline)
            for pair, forwarding in self.forwarding.items():
                try:
                    started = await forwarding.check()
                except ReplicatorError as exc:
                    log.warning("pair %s: cannot describe table %s: %s", pair, forwarding.table, exc)
                    continue
                for pipeline in started:
                    self.pipelines.append(pipeline)
                    self._start_pipeline(pipeline)

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        async for _ in poll(usec / 2_000_000, self.stop):
            sd_notify("WATCHDOG=1")

    async def _probe_peers(self) -> None:
        """Keep `replicatord_peer_reachable` true even when nothing is being forwarded, and
        `replicatord_dead_letters` current. Every call ends within `aws_timeout_s`, and the probes
        come that often: a border that goes silent shows within twice `aws_timeout_s`."""
        tuning = self.settings.topology.tuning
        async for _ in poll(min(tuning.shard_refresh_s, tuning.aws_timeout_s), self.stop):
            await run_together([self._read_queue_depth(), *(self._probe(peer) for peer in list(self.aws.peers))])
            await self._check_outboxes()
            await self.aws.close_retired()
            self.metrics.page_bytes_held.set(self.budget.used)

    async def _read_queue_depth(self) -> None:
        try:
            attributes = await self.aws.call("sqs", "get_queue_attributes", QueueUrl=self.queue_url,
                                             AttributeNames=["ApproximateNumberOfMessages"])
            self.metrics.dead_letters.set(int(attributes["Attributes"]["ApproximateNumberOfMessages"]))
        except (ReplicatorError, KeyError, ValueError) as exc:
            log.debug("cannot read the dead-letter queue's depth: %s", exc)

    async def _probe(self, peer: str) -> None:
        stream = self.settings.topology.pairs[0].streams[peer]
        try:
            await self.aws.call("kinesis", "describe_stream_summary", client=self.aws.peers[peer], StreamName=stream)
        except ReplicatorError as exc:
            self._reached(peer, False)
            self.metrics.errors.labels(FORWARDER, exc.kind).inc()
            log.warning("peer %s: Kinesis stream %s not reachable: %s", peer, stream, exc)
            if exc.peer_keys:
                await self.aws.refresh_peer(peer)
        else:
            self._reached(peer, True)

    def _reached(self, peer: str, reachable: bool) -> None:
        self.reachable[peer] = reachable
        self.metrics.peer_reachable.labels(peer).set(1 if reachable else 0)
        for (_, to), route in self.routes.items():
            if to == peer:
                route.note(Happened.REACHABLE if reachable else Happened.UNREACHABLE)

    async def _check_outboxes(self) -> None:
        """Each outbox's oldest unshipped record (one read per shard after its checkpoint): the
        age and time-to-loss gauges, and a draining peer whose outbox holds nothing is direct."""
        assert self.shared is not None
        await self.outbox_count.flush()
        now = time.time()
        for key, pipeline in self.shippers.items():
            route = self.routes[key]
            if route.mode is Mode.DIRECT and now - self._outbox_checked_at.get(key, 0.0) < OUTBOX_CHECK_DIRECT_S:
                continue  # another instance may have diverted: its outbox is looked at now and then
            self._outbox_checked_at[key] = now
            try:
                leases = await self.shared.leases.query(pipeline.shards.partition)
                age = await oldest_unprocessed(pipeline.source, leases, now)
                depth = await self.outbox_count.depth(*key)
            except ReplicatorError as exc:
                log.debug("pair %s: cannot read the outbox of %s: %s", *key, exc)
                continue
            if age is None and route.mode is Mode.DRAINING:
                route.note(Happened.DRAINED)
            self.metrics.outbox_oldest_age.labels(*key).set(age or 0.0)
            self.metrics.outbox_depth.labels(*key).set(depth if age is not None else 0)
            self.metrics.outbox_time_to_data_loss.labels(*key).set(max(pipeline.source.retention_s - (age or 0.0), 0))

    def ready(self) -> tuple[bool, str]:
        """/readyz (health.readiness)."""
        return readiness(
            self.started and not self.stop.is_set(), self.pipelines,
            [f"pair {pair}: {f.problem}" for pair, f in self.forwarding.items() if f.problem],
            [peer for peer in self.settings.peers if not self.reachable.get(peer)])
