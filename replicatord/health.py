"""What the daemon says about itself over HTTP: /metrics, /healthz (the process answers) and
/readyz (it is doing its share: 200, or 503 with the reason)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from replicatord.aws import StartupError
from replicatord.pipeline import Pipeline

log = logging.getLogger(__name__)


def readiness(running: bool, pipelines: Iterable[Pipeline], problems: list[str],
              unreachable: list[str]) -> tuple[bool, str]:
    """Ready when running, every pipeline's leases are current, no stream problem stands, and at
    least one shard lease is held. A peer out of reach is not this instance's fault, and every
    instance of the region sees the same: it shows in replicatord_peer_reachable and status,
    and here only as a note, so that a load balancer or an auto-scaling check does not cycle
    healthy instances in a border outage."""
    if not running:
        return False, "not running"
    now = time.monotonic()
    pipelines = list(pipelines)
    stale = [p.name for p in pipelines if not p.healthy(now)]
    if stale:
        return False, "leases not renewed: " + ", ".join(stale)
    if problems:
        return False, "; ".join(problems)
    held = sum(p.held_count for p in pipelines)
    if not held:
        return False, "standby: no shard leases"
    return True, f"ready: {held} shard leases" + (f" (peer unreachable: {', '.join(unreachable)})"
                                                  if unreachable else "")


class HttpServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.ready = ready
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self.ready()
        return web.Response(text=why + "\n", status=200 if ok else 503)

    async def start(self) -> None:
        """Listen, or StartupError with one line."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"metrics: cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        server: Any = site._server  # aiohttp keeps the bound socket here; port 0 needs it
        port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else 0
        log.info("metrics listening on %s:%d (/metrics, /healthz, /readyz)", self.host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
