"""What the lease table costs at rest: read and write units per hour, per region.

    .venv/bin/python scripts/lease_cost.py [--instances 2] [--seconds 60] [--json]

Starts one emulator per region (AWS's own timings, no injected faults), two daemon instances per
region (each runs a forwarder and an applier pipeline), lets the leases settle, then counts the
calls each region's emulator serves during an idle window. Units follow DynamoDB's on-demand
rules: a read unit per 4 KB read with a strongly consistent read (half with an eventually
consistent one), rounded up per request over the items it reads; a write unit per 1 KB of the
item written. Item sizes are measured on the lease table (attribute names + values).

Runs from the working directory's replicatord, so that another checkout of the same layout can be
measured the same way: `cd ../other-checkout && python /path/to/scripts/lease_cost.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())

from replicatord.local import emulators  # noqa: E402
from replicatord.local.aws_behaviour import Control  # noqa: E402
from replicatord.local.world import (  # noqa: E402
    REGIONS,
    DaemonProcess,
    client,
    provision_local,
    topology_document,
    wait_for,
    write_topology,
)

QUIET = {"throttle_rate": 0.0, "error_rate": 0.0, "error_after_rate": 0.0, "kinesis_put_throttle_rate": 0.0}


def value_size(value: dict[str, Any]) -> int:
    (kind, inner), = value.items()
    if kind == "S":
        return len(inner.encode())
    if kind == "N":
        return math.ceil(len(inner.strip("-").replace(".", "").lstrip("0") or "0") / 2) + 1
    if kind == "SS":
        return sum(len(m.encode()) for m in inner)
    return 1


def item_size(item: dict[str, Any]) -> int:
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())


def lease_table_of(ddb: Any) -> str:
    names = ddb.list_tables()["TableNames"]
    return next(n for n in names if n.startswith("replicatord_leases"))


def measure(instances: int, seconds: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="lease-cost-"))
    ports = {region: emulators.free_port() for region in REGIONS}
    with emulators.running(ports, workdir, QUIET) as emus:
        endpoints = {r: e.endpoint_url for r, e in emus.items()}
        config = write_topology(workdir / "topology.yaml", topology_document(endpoints))
        provision_local(config, report=lambda _line: None)
        daemons = [DaemonProcess(config, region, workdir, f"{region}-{n}").start()
                   for region in REGIONS for n in range(instances)]
        try:
            for daemon in daemons:
                wait_for(lambda d=daemon: d.get("/healthz")[0] == 200, 60, "a daemon to start")  # type: ignore[misc]
            time.sleep(20)  # leases taken and balanced: the window below measures the resting state
            controls = {r: Control(endpoints[r]) for r in REGIONS}
            for control in controls.values():
                control.reset_stats()
            started = time.monotonic()
            time.sleep(seconds)  # the measurement window of this benchmark, not a synchronisation
            elapsed = time.monotonic() - started
            out: dict[str, Any] = {"instances_per_region": instances, "window_s": round(elapsed, 1), "regions": {}}
            for region in REGIONS:
                calls = controls[region].stats()["calls"]
                ddb = client("dynamodb", region, endpoints[region])
                table = lease_table_of(ddb)
                items = ddb.scan(TableName=table)["Items"]
                sizes = [item_size(i) for i in items]
                per_stream: dict[str, int] = {}
                for item, size in zip(items, sizes, strict=True):
                    stream = (item.get("stream_id") or item.get("lease_key"))["S"].rsplit("/", 1)[0]
                    per_stream[stream] = per_stream.get(stream, 0) + size
                table_kb = sum(sizes) / 4096
                stream_kb = max(per_stream.values()) / 4096
                hour = 3600 / elapsed
                reads = (calls.get("dynamodb.Scan", 0) * max(1, math.ceil(table_kb))  # consistent Scans
                         + calls.get("dynamodb.Query", 0) * 0.5 * max(1, math.ceil(stream_kb))  # mostly eventual
                         + calls.get("dynamodb.GetItem", 0) * 1)
                writes = sum(calls.get(f"dynamodb.{op}", 0) * max(1, math.ceil(max(sizes) / 1024))
                             for op in ("UpdateItem", "PutItem", "DeleteItem"))
                out["regions"][region] = {
                    "lease_table": table, "leases": len(items), "table_bytes": sum(sizes),
                    "calls_per_minute": {k: round(v * 60 / elapsed, 1) for k, v in sorted(calls.items())
                                         if k.startswith("dynamodb.")},
                    "read_units_per_hour": round(reads * hour), "write_units_per_hour": round(writes * hour),
                }
            return out
        finally:
            for daemon in daemons:
                daemon.terminate(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2, help="daemon instances per region")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.update(emulators.LOCAL_CREDENTIALS)
    result = measure(args.instances, args.seconds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for region, figures in result["regions"].items():
        print(f"{region}: {figures['leases']} leases in {figures['lease_table']} ({figures['table_bytes']} B); "
              f"{figures['read_units_per_hour']} read units/h, {figures['write_units_per_hour']} write units/h")
        print("  calls per minute: " + ", ".join(f"{k} {v}" for k, v in figures["calls_per_minute"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
