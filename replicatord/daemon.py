"""The daemon: startup() -> main_loop() -> shutdown(), as in uvicorn's server.

startup() checks everything it needs (tables, streams, queue, SSM parameters) and fails with
one line before any task starts. Signal handlers only set the stop event. On stop, every
shard worker finishes or abandons its page, checkpoints and releases its lease, bounded by
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

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicatord.aio import poll, run_together
from replicatord.applier import Applier
from replicatord.aws import LEASES, Aws, StartupError, make_non_dumpable
from replicatord.budget import ByteBudget
from replicatord.checkpointer import RELEASE_TIMEOUT_S
from replicatord.config import Settings
from replicatord.dlq import MAX_BODY_BYTES, DeadLetterQueue
from replicatord.errors import NotFound, ReplicatorError
from replicatord.forwarder import Forwarder
from replicatord.lease_table import LEASE_TABLE_KEY, LEGACY_LEASE_KEY, LeaseTable
from replicatord.metrics import Metrics
from replicatord.pipeline import Pipeline
from replicatord.provenance import Provenance
from replicatord.sources import DynamoStreamSource, KinesisSource
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
        self._runner: web.AppRunner | None = None

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
        queue_url, max_body_bytes = await self._queue(me.dead_letter_queue)
        self.queue_url = queue_url
        dlq = DeadLetterQueue(self.aws, queue_url, self.metrics, max_body_bytes)
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
        tombstones = TombstoneTable(self.aws, me.tombstone_table, topology.conflict.tombstone_ttl_s, topology.tuning)
        for peer in s.peers:
            await self.aws.open_peer(peer)
        for pair in topology.pairs:
            await self._start_pair(pair.name, pair.tables[s.region], pair.streams[s.region],
                                   {peer: pair.streams[peer] for peer in s.peers}, leases, tombstones, dlq)
        for peer in s.peers:
            # Not fatal: the peer may come back; readiness and the metric say it is not there.
            self.metrics.peer_reachable.labels(peer).set(0)
        await self._serve_http()
        self.metrics.up.set(1)
        self.started = True
        sd_notify("READY=1")
        log.info("replicatord %s in %s: %d pairs, peers %s", s.instance_id, s.region,
                 len(topology.pairs), ", ".join(s.peers))

    async def main_loop(self) -> None:
        drain_s = self.settings.topology.tuning.drain_timeout_s
        async with asyncio.TaskGroup() as group:
            self._group = group
            tasks = self._tasks
            for pipeline in self.pipelines:
                self._start_pipeline(pipeline)
            tasks.append(group.create_task(self._watchdog(), name="watchdog"))
            tasks.append(group.create_task(self._probe_peers(), name="probe-peers"))
            tasks.append(group.create_task(self._follow_streams(), name="follow-streams"))
            await self.stop.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: draining in-flight pages (at most %.0fs)", drain_s)
            # Each task sees the stop event and ends by itself: shard workers finish or abandon
            # their page, checkpoint and release their lease. Past the bound, cancel the rest
            # (a cancelled worker still releases its lease, within RELEASE_TIMEOUT_S).
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
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("stopped")

    # -- startup checks ----------------------------------------------------------------------

    async def _queue(self, name: str) -> tuple[str, int]:
        """The dead-letter queue's URL and its message size limit (messages are cut to fit it)."""
        try:
            url = str((await self.aws.call("sqs", "get_queue_url", QueueName=name))["QueueUrl"])
            attributes = await self.aws.call("sqs", "get_queue_attributes", QueueUrl=url,
                                             AttributeNames=["MaximumMessageSize"])
        except NotFound:
            raise StartupError(
                f"dead-letter queue {name!r} not found in {self.settings.region} (run 'replicatord provision')"
            ) from None
        except ReplicatorError as exc:
            raise StartupError(f"dead-letter queue {name!r} in {self.settings.region}: {exc}") from None
        size = attributes.get("Attributes", {}).get("MaximumMessageSize", "")
        return url, int(size) if size.isdigit() else MAX_BODY_BYTES

    async def _require_table(self, table: str, what: str) -> dict[str, Any]:
        try:
            result = await self.aws.call("dynamodb", "describe_table", TableName=table)
        except NotFound:
            raise StartupError(
                f"{what} {table!r} not found in {self.settings.region} (run 'replicatord provision')"
            ) from None
        except ReplicatorError as exc:
            raise StartupError(f"{what} {table!r} in {self.settings.region}: {exc}") from None
        return dict(result["Table"])

    async def _start_pair(self, pair: str, table: str, kinesis_stream: str, peers: dict[str, str],
                          leases: LeaseTable, tombstones: TombstoneTable, dlq: DeadLetterQueue) -> None:
        """The pair's applier and forwarder pipelines (docs/streams.md: which streams, from where)."""
        s = self.settings
        topology = s.topology
        described = await self._require_table(table, f"pair {pair}: table")
        kinesis = await self._kinesis_source(pair, kinesis_stream)
        rules = Provenance.from_table(s.region, s.peers, described, topology.conflict)
        applier = Applier(self.aws, pair, table, s.me.stats_table, tombstones, topology.conflict, topology.tuning,
                          dlq, self.metrics, self.stop, rules)
        forwarder = Forwarder(self.aws, pair, peers, tombstones, topology.conflict, topology.tuning, dlq, applier,
                              self.metrics, self.stop)

        def build(arn: str, start: str, retiring: bool) -> Pipeline:
            pipeline = Pipeline(pair, DynamoStreamSource(self.aws, table, arn), forwarder, leases, s.instance_id,
                                topology.tuning, self.metrics, self.stop, initial_position=start)
            pipeline.region = s.region
            pipeline.retiring = retiring
            pipeline.budget = self.budget
            return pipeline

        forwarding = Forwarding(self.aws, leases, pair, table, build, self.metrics)
        try:
            self.pipelines += await forwarding.startup(topology.tuning.initial_position)
            applier_start = await self._applier_start(pair, kinesis, leases)
        except ReplicatorError as exc:
            raise StartupError(f"pair {pair}: the streams of table {table!r}: {exc}") from None
        self.forwarding[pair] = forwarding
        applying = Pipeline(pair, kinesis, applier, leases, s.instance_id, topology.tuning, self.metrics, self.stop,
                            initial_position=applier_start)
        applying.budget = self.budget
        self.pipelines.append(applying)
        self.appliers.append(applier)

    async def _kinesis_source(self, pair: str, stream: str) -> KinesisSource:
        try:
            summary = await self.aws.call("kinesis", "describe_stream_summary", StreamName=stream)
        except NotFound:
            raise StartupError(
                f"pair {pair}: Kinesis stream {stream!r} not found in {self.settings.region} "
                "(run 'replicatord provision')"
            ) from None
        except ReplicatorError as exc:
            raise StartupError(f"pair {pair}: Kinesis stream {stream!r}: {exc}") from None
        created = summary["StreamDescriptionSummary"]["StreamCreationTimestamp"]
        hours = summary["StreamDescriptionSummary"].get("RetentionPeriodHours") or 24
        return KinesisSource(self.aws, stream, f"{created.timestamp():.0f}", float(hours) * 3600)

    async def _applier_start(self, pair: str, kinesis: KinesisSource, leases: LeaseTable) -> str:
        """Where the applier starts on shards without a lease: `initial_position` on a first start,
        the oldest record on a Kinesis stream created again since the last run."""
        created = kinesis.stream.rsplit("@", 1)[1]
        followed = await leases.followed(pair, "applier", kinesis.name)
        await leases.note_followed(pair, "applier", kinesis.name, created)
        if followed and created not in followed:
            log.warning("pair %s: Kinesis stream %s was created again since the last run: reading it from its "
                        "oldest record", pair, kinesis.name)
            return "trim_horizon"
        return self.settings.topology.tuning.initial_position

    # -- background duties -------------------------------------------------------------------

    def _start_pipeline(self, pipeline: Pipeline) -> None:
        assert self._group is not None
        task = self._group.create_task(pipeline.run(), name=f"{pipeline.source.pipeline}/{pipeline.pair}")
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
            self.metrics.peer_reachable.labels(peer).set(0)
            self.metrics.errors.labels("forwarder", exc.kind).inc()
            log.warning("peer %s: Kinesis stream %s not reachable: %s", peer, stream, exc)
            if exc.peer_keys:
                await self.aws.refresh_peer(peer)
        else:
            self.metrics.peer_reachable.labels(peer).set(1)

    # -- HTTP: /metrics, /healthz, /readyz ---------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if not self.started or self.stop.is_set():
            return False, "not running"
        now = time.monotonic()
        stale = [p.name for p in self.pipelines if not p.healthy(now)]
        if stale:
            return False, "leases not renewed: " + ", ".join(stale)
        problems = [f"pair {pair}: {f.problem}" for pair, f in self.forwarding.items() if f.problem]
        if problems:
            return False, "; ".join(problems)
        held = sum(p.held for p in self.pipelines)
        if not held:
            return False, "standby: no shard leases"
        # A peer out of reach is not this instance's fault, and every instance of the region sees
        # the same: it shows in replicatord_peer_reachable and status, never here, so that a load
        # balancer or an auto-scaling check does not cycle healthy instances in a border outage.
        down = [peer for peer in self.settings.peers
                if self.metrics.peer_reachable.labels(peer)._value.get() != 1]  # noqa: SLF001
        return True, f"ready: {held} shard leases" + (f" (peer unreachable: {', '.join(down)})" if down else "")

    async def _serve_http(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(_: web.Request) -> web.Response:
            ok, why = self.ready()
            return web.Response(text=why + "\n", status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.metrics_host, self.settings.metrics_port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"metrics: cannot listen on {self.settings.metrics_host}:{self.settings.metrics_port}: "
                f"{exc.strerror}"
            ) from None
        server: Any = site._server  # aiohttp keeps the bound socket here; port 0 needs it
        port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else 0
        log.info("metrics listening on %s:%d (/metrics, /healthz, /readyz)", self.settings.metrics_host, port)
