"""Local AWS: one moto server process per region, on loopback (docs/design.md §7).

One process per region because moto servers inside one Python process share state. Each
server handles one request at a time (no threads): moto's Kinesis loses records under
concurrent PutRecords, and serializing its requests is the cure. So each connection serves one
request (HTTP/1.0) and clients connect again for the next: measured, a threaded HTTP/1.1 server
that keeps connections open with a lock around moto was slower (its threads contend for the
interpreter), 185 against 248 conditional puts/s (scripts/bench.py).

    python -m replicatord.local.emulators serve --port 5101          # one region, foreground
    python -m replicatord.local.emulators start --dir .aws-local cn-north-1=5101 ap-southeast-1=5102
    python -m replicatord.local.emulators stop --dir .aws-local
    python -m replicatord.local.emulators start --tls --dir .aws-local cn-north-1=5101   # https

Over https (`tls`: a certificate and key, `make_certificate` makes a self-signed one for
127.0.0.1 and localhost), botocore and aiobotocore trust the emulator through AWS_CA_BUNDLE (both
read it as the `ca_bundle` setting) or `verify=`, and reach it through a proxy by CONNECT.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


TLS = tuple[str, str]  # (certificate path, key path), PEM


def make_certificate(directory: Path) -> TLS:
    """A self-signed certificate for 127.0.0.1 and localhost, valid for a year, and its key,
    written to `directory` (cert.pem, key.pem). The certificate is its own CA: a client trusts it
    by naming the file (AWS_CA_BUNDLE, verify=)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    # P-256: every request is a new connection and so a handshake; ECDSA signs far faster than RSA.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replicatord local emulator")])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


REQUEST_TIMEOUT_S = 5.0


def _request_handler() -> type[Any]:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class RequestHandler(MotoRequestHandler):
        """moto's handler, whose http.server base adds a Date to every response: here only to a
        response without one (the AWS-behaviour layer gives its own, of the region's clock).

        A client that stops half-way through its request (a daemon under SIGSTOP, a link gone
        silent) would hold the emulator, which serves one request at a time, for ever; AWS is
        not held by one client. Its socket times out instead (loopback clients send at once)."""

        timeout = REQUEST_TIMEOUT_S

        def send_response(self, code: int, message: str | None = None) -> None:
            self.log_request(code)
            self.send_response_only(code, message)
            self.send_header("Server", self.version_string())
            self._dated = False

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "date":
                self._dated = True
            super().send_header(keyword, value)

        def end_headers(self) -> None:
            if not getattr(self, "_dated", True):
                super().send_header("Date", self.date_time_string())
            super().end_headers()

    return RequestHandler


EMULATOR_SOCKET_TIMEOUT_S = 10.0


def serve(host: str, port: int, behaviour: dict[str, Any] | None = None, tls: TLS | None = None,
          ready_file: str | None = None) -> None:
    """Serve one region; with `behaviour` (aws_behaviour.Behaviour settings), as AWS behaves; with
    `tls` (certificate and key paths), over https. `ready_file` is written once the port is ours
    (bound and listening): a port someone else holds ends this process instead."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

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
    # One request at a time (moto's Kinesis loses records under concurrent puts), so a client that
    # connects and then sends nothing (a TLS handshake cut by a black-holed link) would hold every
    # other caller: AWS gives up on such a connection, and so does every socket here after 10 s.
    socket.setdefaulttimeout(EMULATOR_SOCKET_TIMEOUT_S)
    server = make_server(host, port, app, threaded=False, request_handler=_request_handler(), ssl_context=tls)
    if ready_file:
        Path(ready_file).write_text(str(server.port))
    server.serve_forever()


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

    _spare_sqs_scans()


def _spare_sqs_scans() -> None:
    """moto's SQS works out the queue's approximate message counts (a scan of every message) for
    each message it takes, through the queue's attribute map: with thousands of dead letters
    queued, a SendMessageBatch took a second, and the emulator, which serves one request at a
    time, kept the daemons' lease renewals waiting past their deadline. AWS's counts are
    approximate ("eventually consistent"); here they are kept for a second."""
    from moto.sqs.models import Queue

    def cached(name: str) -> property:
        scan = getattr(Queue, name).fget

        def get(self: Any) -> int:
            cache = self.__dict__.setdefault("_replicatord_counts", {})
            now = time.monotonic()
            if name not in cache or now - cache[name][0] >= 1.0:
                cache[name] = (now, scan(self))
            return int(cache[name][1])

        return property(get)

    for name in ("approximate_number_of_messages", "approximate_number_of_messages_delayed",
                 "approximate_number_of_messages_not_visible"):
        setattr(Queue, name, cached(name))

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
    tls: TLS | None = None

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


def start(
    ports: Mapping[str, int],
    log_dir: Path | None = None,
    behaviour: Mapping[str, Any] | None = None,
    tls: TLS | None = None,
) -> dict[str, Emulator]:
    """Start one emulator per region and wait until each serves its port. With `behaviour`
    (aws_behaviour settings; {} for AWS's own figures) each behaves as AWS does; with `tls`
    (certificate and key paths, e.g. from `make_certificate`) each serves https. A port taken
    meanwhile by another process (free_port() only found it free) is replaced by another: the
    returned emulators' ports are the ones served. Waiting for a connection alone would take the
    other process for the emulator."""
    launched: dict[str, tuple[Emulator, Path]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="emulators-") as ready_dir:
            for region, port in ports.items():  # all at once: each takes a second or two to import moto
                launched[region] = _launch(region, port, log_dir, behaviour, tls, Path(ready_dir))
            for region in ports:
                for _ in range(3):
                    emulator, ready = launched[region]
                    if _wait_ready(emulator, ready):
                        break
                    launched[region] = _launch(region, free_port(), log_dir, behaviour, tls, Path(ready_dir))
                else:
                    raise RuntimeError(f"emulator of {region} exited 3 times (its log: moto-{region}.log)")
    except BaseException:
        stop(e for e, _ in launched.values())
        raise
    return {region: emulator for region, (emulator, _) in launched.items()}


def _launch(region: str, port: int, log_dir: Path | None, behaviour: Mapping[str, Any] | None,
            tls: TLS | None, ready_dir: Path) -> tuple[Emulator, Path]:
    log_path = os.devnull
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = str(log_dir / f"moto-{region}.log")
    extra = [] if behaviour is None else ["--behaviour", json.dumps(dict(behaviour))]
    if tls is not None:
        extra += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    ready = ready_dir / f"{region}-{port}"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "replicatord.local.emulators", "serve", "--port", str(port),
             "--ready-file", str(ready), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **LOCAL_CREDENTIALS},
        )
    return Emulator(region, port, proc, tls), ready


def _wait_ready(emulator: Emulator, ready: Path, deadline_s: float = 30) -> bool:
    """True once the emulator has bound its port; False if it exited (the port was taken)."""
    deadline = time.monotonic() + deadline_s
    while not ready.exists():
        if emulator.process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"emulator of {emulator.region} on port {emulator.port} not listening "
                               f"after {deadline_s:.0f}s")
        time.sleep(0.05)  # the child's own startup: importing moto takes a second or two
    return True


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
    ports: Mapping[str, int],
    log_dir: Path | None = None,
    behaviour: Mapping[str, Any] | None = None,
    tls: TLS | None = None,
) -> Iterator[dict[str, Emulator]]:
    emulators = start(ports, log_dir, behaviour, tls)
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
    srv.add_argument("--tls-cert", help="serve https with this certificate (PEM) ...")
    srv.add_argument("--tls-key", help="... and this key (PEM)")
    srv.add_argument("--ready-file", help="written with the port once it is bound")
    st = sub.add_parser("start", help="one emulator per REGION=PORT, in the background")
    st.add_argument("--dir", default=".aws-local", help="pid and log files")
    st.add_argument("--tls", action="store_true", help="serve https, with a certificate made in --dir")
    st.add_argument("regions", nargs="+", metavar="REGION=PORT")
    sp = sub.add_parser("stop", help="stop what 'start' started")
    sp.add_argument("--dir", default=".aws-local")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
        serve(args.host, args.port, json.loads(args.behaviour) if args.behaviour else None, tls, args.ready_file)
        return 0
    workdir = Path(args.dir)
    if args.command == "start":
        tls = make_certificate(workdir / "tls") if args.tls else None
        emulators = start(_parse_region_ports(args.regions), workdir, tls=tls)
        for e in emulators.values():
            (workdir / f"moto-{e.region}.pid").write_text(str(e.process.pid))
            print(f"{e.region}: {e.endpoint_url} (pid {e.process.pid})")
        if tls is not None:
            print(f"export AWS_CA_BUNDLE={Path(tls[0]).resolve()}")
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
