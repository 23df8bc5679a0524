"""Local AWS: one moto server process per region, on loopback (DESIGN.md §7).

One process per region because moto servers inside one Python process share state. Each
server handles one request at a time (no threads): moto's Kinesis loses records under
concurrent PutRecords, and serializing its requests is the cure. So each connection serves one
request (HTTP/1.0) and clients connect again for the next: measured, a threaded HTTP/1.1 server
that keeps connections open with a lock around moto was slower (its threads contend for the
interpreter), 185 against 248 conditional puts/s (scripts/bench.py).

    python -m replicatord.local.emulators serve --port 5101          # one region, foreground
    python -m replicatord.local.emulators start --dir .aws-local cn-north-1=5101 ap-southeast-1=5102
    python -m replicatord.local.emulators stop --dir .aws-local
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # the emulator's fixed dummy value, not a secret
    "AWS_SESSION_TOKEN": "testing",
}


def serve(host: str, port: int, behaviour: dict[str, Any] | None = None) -> None:
    """Serve one region; with `behaviour` (aws_behaviour.Behaviour settings), as AWS behaves."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    def _exit(signum: int, frame: FrameType | None) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    app: Any = DomainDispatcherApplication(create_backend_app)
    if behaviour is not None:
        from replicatord.local.aws_behaviour import Behaviour, install

        settings = Behaviour()
        settings.update(behaviour)
        app = install(app, settings)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request costs the emulator
    _spare_per_request_work()
    run_simple(host, port, app, threaded=False, request_handler=MotoRequestHandler)


def _spare_per_request_work() -> None:
    """moto redoes, for every request, work whose answer never changes: it lists its own package
    directory (listdir and an isdir per service) to route the request, and walks the handler
    class's members to find the action's method. Found with py-spy: a tenth of the emulator's
    time under load. Both answers are kept after the first time."""
    from moto import backends
    from moto.core import responses, utils

    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules
    cached = functools.cache(utils.method_names_from_class)
    responses.method_names_from_class = cached  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(host: str, port: int, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"emulator on port {port} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"emulator on {host}:{port} did not start within {deadline_s:.0f}s")


@dataclass
class Emulator:
    region: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(
    ports: Mapping[str, int], log_dir: Path | None = None, behaviour: Mapping[str, Any] | None = None
) -> dict[str, Emulator]:
    """Start one emulator per region and wait until each accepts connections. With `behaviour`
    (aws_behaviour settings; {} for AWS's own figures) each behaves as AWS does."""
    started: dict[str, Emulator] = {}
    try:
        for region, port in ports.items():
            log_path = os.devnull
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                log_path = str(log_dir / f"moto-{region}.log")
            with open(log_path, "ab") as out:
                extra = [] if behaviour is None else ["--behaviour", json.dumps(dict(behaviour))]
                proc = subprocess.Popen(
                    [sys.executable, "-m", "replicatord.local.emulators", "serve", "--port", str(port), *extra],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **LOCAL_CREDENTIALS},
                )
            started[region] = Emulator(region, port, proc)
        for emulator in started.values():
            wait_listening("127.0.0.1", emulator.port, 30, emulator.process)
    except BaseException:
        stop(started.values())
        raise
    return started


def stop(emulators: Iterable[Emulator]) -> None:
    procs = [e.process for e in emulators]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(
    ports: Mapping[str, int], log_dir: Path | None = None, behaviour: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Emulator]]:
    emulators = start(ports, log_dir, behaviour)
    try:
        yield emulators
    finally:
        stop(emulators.values())


def _parse_region_ports(values: list[str]) -> dict[str, int]:
    ports = {}
    for value in values:
        region, sep, port = value.partition("=")
        if not sep or not port.isdigit():
            raise SystemExit(f"error: expected REGION=PORT, got {value!r}")
        ports[region] = int(port)
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicatord.local.emulators")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="one emulator in the foreground")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--behaviour", help="JSON: aws_behaviour settings ({} for AWS's own figures)")
    st = sub.add_parser("start", help="one emulator per REGION=PORT, in the background")
    st.add_argument("--dir", default=".aws-local", help="pid and log files")
    st.add_argument("regions", nargs="+", metavar="REGION=PORT")
    sp = sub.add_parser("stop", help="stop what 'start' started")
    sp.add_argument("--dir", default=".aws-local")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.host, args.port, json.loads(args.behaviour) if args.behaviour else None)
        return 0
    workdir = Path(args.dir)
    if args.command == "start":
        emulators = start(_parse_region_ports(args.regions), workdir)
        for e in emulators.values():
            (workdir / f"moto-{e.region}.pid").write_text(str(e.process.pid))
            print(f"{e.region}: {e.endpoint_url} (pid {e.process.pid})")
        return 0
    for pidfile in sorted(workdir.glob("moto-*.pid")):
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        pidfile.unlink()
        print(f"stopped {pidfile.stem} (pid {pid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
