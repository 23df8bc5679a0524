"""A WAN link for tests and benchmarks: a TCP proxy on loopback with delay, jitter and outages.

Kernel netem is not available on the machines this runs on, so the link between the emulated
regions is this proxy: every chunk is held for `delay_ms ± jitter_ms` in each direction, in
order. `set_down(True)` is an outage that refuses new connections and cuts open ones;
`set_blackhole(True)` is a black hole (a route that drops packets, a firewall that drops rather
than rejects): connections are accepted but nothing ever comes back and nothing is closed, so a
client only learns of it from its own timeouts.

    python -m replicatord.local.wan --listen 127.0.0.1:7000 --target 127.0.0.1:5102 --delay-ms 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@dataclass(eq=False)
class _Connection:
    """One client connection and, once made, its upstream one. `silent`: black-holed, nothing is
    forwarded either way any more (its byte streams have lost data: it is never resumed)."""

    writers: list[asyncio.StreamWriter]
    silent: bool = False
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.cut.set()


class WanLink:
    def __init__(self, target_host: str, target_port: int, delay_ms: float = 0.0, jitter_ms: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self.down = False
        self.blackhole = False
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._cut()
            if self._handlers:  # cut: each ends at once
                await asyncio.wait(self._handlers, timeout=5)
            await self._server.wait_closed()

    def _on_loop(self, switch: Callable[[], None]) -> None:
        """Run `switch` on the link's loop, from any thread, and wait until it has run."""
        loop = self._loop
        if loop is None or not loop.is_running() or _in_loop(loop):
            switch()
            return
        done = threading.Event()

        def run() -> None:
            try:
                switch()
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait(5)

    def set_down(self, down: bool) -> None:
        """Start or end an outage; callable from any thread."""

        def switch() -> None:
            self.down = down
            if down:
                self._cut()

        self._on_loop(switch)

    def set_blackhole(self, on: bool) -> None:
        """Start or end a black hole; callable from any thread. While on, new connections are
        accepted and what they send is read and dropped, open ones go silent both ways; nothing
        is answered or closed. Ending it cuts the silent connections (their data was lost);
        new ones are forwarded again."""

        def switch() -> None:
            self.blackhole = on
            for connection in list(self._connections):
                if on:
                    connection.silent = True
                elif connection.silent:
                    self._connections.discard(connection)
                    connection.close()

        self._on_loop(switch)

    def _cut(self) -> None:
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()

    def _delay_s(self) -> float:
        jitter = random.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.delay_ms + jitter) / 1000

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        connection = _Connection([writer], silent=self.blackhole)
        self._connections.add(connection)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            if connection.silent:
                await self._swallow(reader, connection)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            connection.writers.append(up_writer)
            if connection.cut.is_set():  # cut while connecting
                up_writer.close()
                return
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, up_writer, connection))
                group.create_task(self._pipe(up_reader, writer, connection))
            if connection.silent:
                await connection.cut.wait()  # both ends hung up: a black hole tells neither
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(connection)
            self._handlers.discard(handler)
            connection.close()

    async def _swallow(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        """Read and drop all the client sends; never answer, never close (until cut)."""
        while await reader.read(65536):
            pass
        await connection.cut.wait()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection) -> None:
        """Forward chunks in order, each after the link's delay (a queue keeps the order); once
        the connection is silent, read and drop."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                if connection.silent:
                    continue
                writer.write(chunk)
                await writer.drain()
            if not connection.silent:
                with contextlib.suppress(OSError):
                    writer.write_eof()

        sender = asyncio.create_task(send())
        try:
            while chunk := await reader.read(65536):
                if not connection.silent:
                    await queue.put((loop.time() + self._delay_s(), chunk))
        finally:
            await queue.put((loop.time(), b""))
            await sender


@contextlib.contextmanager
def running_link(
    target_host: str, target_port: int, delay_ms: float = 0.0, jitter_ms: float = 0.0
) -> Iterator[WanLink]:
    """The link served from a background thread's event loop, for synchronous tests and tools."""
    link = WanLink(target_host, target_port, delay_ms, jitter_ms)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(link.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(link.stop())
        loop.close()

    thread = threading.Thread(target=serve, name="wan-link", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield link
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicatord.local.wan")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    thost, _, tport = args.target.rpartition(":")

    async def run() -> None:
        link = WanLink(thost, int(tport), args.delay_ms, args.jitter_ms)
        bound = await link.start(host, int(port))
        print(f"wan link 127.0.0.1:{bound} -> {args.target}, delay {args.delay_ms} ms ± {args.jitter_ms}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
