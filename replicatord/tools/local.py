"""A local two-region setup: generated topology, daemons as subprocesses, stats and metrics readers.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.config import Config

from replicatord.tools.emulators import LOCAL_CREDENTIALS, free_port

REGIONS = ("cn-north-1", "ap-southeast-1")
SUFFIX = {"cn-north-1": "cn", "ap-southeast-1": "sg"}
DEMO_KEY_PAIR = ("AKIDLOCALDEMO", "local-emulator-dummy")  # the emulator accepts any key pair


def topology_document(
    endpoints: Mapping[str, str],
    proxies: Mapping[str, str] | None = None,
    kinesis_shards: int = 1,
    tuning: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The original deployment's names (user-cn/user-sg, ...) pointed at local endpoints."""
    regions = {
        region: {
            "endpoint_url": url,
            "credentials": {"ssm_prefix": f"/DDBReplication/Table{SUFFIX[region].upper()}/"},
            "proxy": (proxies or {}).get(region),
            "dead_letter_queue": f"ddbreplicator{SUFFIX[region]}",
        }
        for region, url in endpoints.items()
    }
    doc: dict[str, Any] = {
        "regions": regions,
        "pairs": [
            {
                "name": "user",
                "tables": {r: f"user-{SUFFIX[r]}" for r in endpoints},
                "streams": {r: f"ddb_replication_stream_{SUFFIX[r]}" for r in endpoints},
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


def local_env() -> dict[str, str]:
    env = {**os.environ, **LOCAL_CREDENTIALS}
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


def wait_for(condition: Callable[[], bool], deadline_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll `condition` until true; raise TimeoutError naming `what` after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        if condition():
            return
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


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

    def __init__(self, config: Path, region: str, log_dir: Path, instance_id: str | None = None) -> None:
        self.config = config
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
            stdout=log, stderr=subprocess.STDOUT, env=local_env(),
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


def provision_local(config: Path, report: Callable[[str], None] = print) -> None:
    """Provision every region of `config` and store each peer's (dummy) key pair in SSM."""
    from replicatord.config import load_topology
    from replicatord.tools.provision import RegionProvisioner, provision

    os.environ.update(LOCAL_CREDENTIALS)
    topology = load_topology(config)
    provision(topology, report=report)
    for region in topology.regions:
        for peer in topology.regions:
            if peer != region:
                RegionProvisioner(topology, region, report).store_peer_credentials(peer, *DEMO_KEY_PAIR)
