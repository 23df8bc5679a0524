"""The WAN link (replicatord/local/wan.py) between a client and an echo server on loopback."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from replicatord.local.wan import running_link

pytestmark = pytest.mark.integration


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _echoes(sock: socket.socket, data: bytes) -> bool:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        received += chunk
    return received == data


def test_a_black_hole_accepts_and_swallows_but_never_answers_nor_closes(echo_port: int) -> None:
    with running_link("127.0.0.1", echo_port) as link, contextlib.ExitStack() as sockets:
        before = sockets.enter_context(_connect(link.port))
        assert _echoes(before, b"before")
        link.set_blackhole(True)

        # A new connection is accepted (connect succeeds); everything it sends is read (32 MB, far
        # more than socket buffers hold, goes through) and nothing ever comes back.
        during = sockets.enter_context(_connect(link.port))
        during.sendall(b"x" * (32 << 20))
        during.settimeout(1.0)
        with pytest.raises(TimeoutError):
            during.recv(10)  # a timeout, not b"" (closed) nor a reset
        # The open connection goes silent both ways, and is not closed either.
        before.settimeout(1.0)
        before.sendall(b"lost")
        with pytest.raises(TimeoutError):
            before.recv(10)

        link.set_blackhole(False)
        after = sockets.enter_context(_connect(link.port))
        assert _echoes(after, b"after")
        # The connections that went silent are cut: their streams lost data.
        for silent in (before, during):
            silent.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert silent.recv(10) == b""


def test_an_outage_refuses_and_cuts_and_ends(echo_port: int) -> None:
    with running_link("127.0.0.1", echo_port, delay_ms=5) as link:
        with _connect(link.port) as before:
            assert _echoes(before, b"before")
            link.set_down(True)
            with contextlib.suppress(ConnectionResetError):
                assert before.recv(10) == b""
        with _connect(link.port) as during, contextlib.suppress(ConnectionResetError):
            assert during.recv(10) == b""  # accepted by the kernel, closed at once by the link
        link.set_down(False)
        with _connect(link.port) as after:
            assert _echoes(after, b"after")
