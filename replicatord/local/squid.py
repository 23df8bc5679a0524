"""A real squid on loopback that only forwards to loopback (the emulators): the proxy the
daemons reach their peers through, for the end-to-end tests and the benchmark."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from replicatord.local import emulators


@dataclass
class Squid:
    url: str
    access_log: Path

    def requests(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


def squid_binary() -> str:
    found = shutil.which("squid") or ("/usr/sbin/squid" if os.path.exists("/usr/sbin/squid") else None)
    if found is None:
        raise RuntimeError("squid is not installed: run scripts/bootstrap.sh (it installs it with apt)")
    return found


@contextlib.contextmanager
def running_squid(binary: str | None = None) -> Iterator[Squid]:
    """squid (`binary`, or the one installed) until the block ends."""
    # Outside pytest's 0700 tmp tree: as root, squid drops to the 'proxy' user to write its logs.
    workdir = Path(tempfile.mkdtemp(prefix="replicatord-squid-"))
    workdir.chmod(0o777)
    port = emulators.free_port()
    conf = workdir / "squid.conf"
    conf.write_text(
        f"""
http_port 127.0.0.1:{port}
pid_filename {workdir}/squid.pid
access_log stdio:{workdir}/access.log
cache_log {workdir}/cache.log
cache_store_log none
coredump_dir {workdir}
cache deny all
acl loopback_src src 127.0.0.1/32
acl emulators dst 127.0.0.1/32
http_access allow loopback_src emulators
http_access deny all
shutdown_lifetime 0 seconds
logfile_rotate 0
"""
    )
    with (workdir / "stdout.log").open("wb") as out:
        proc = subprocess.Popen([binary or squid_binary(), "-N", "-f", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        emulators.wait_listening("127.0.0.1", port, 30, proc)
        yield Squid(f"http://127.0.0.1:{port}", workdir / "access.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
