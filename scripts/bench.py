"""Benchmark: replication lag and throughput on the local emulators, over an emulated WAN link.

    .venv/bin/python scripts/bench.py [--items 2000] [--probes 50] [--wan-delay-ms 40 --wan-jitter-ms 10]

Prints figures; asserts nothing. Lag probes: one item at a time written in cn-north-1, timed
until a consistent read sees it in ap-southeast-1 (polled every 5 ms). Throughput: a batched
load into cn-north-1, timed until the Singapore daemon has applied all of it, reported as a
ratio to the emulator's own conditional-write ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from replicatord.local import emulators
from replicatord.local.load import load
from replicatord.local.wan import running_link
from replicatord.local.world import (
    REGIONS,
    DaemonProcess,
    client,
    provision_local,
    read_counter,
    topology_document,
    wait_for,
    write_topology,
)

CN, SG = REGIONS


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def conditional_put_ceiling(ddb: Any, table: str, n: int = 600) -> float:
    """Conditional PutItem/s one emulator process sustains from one client (the apply path's cost)."""
    started = time.monotonic()
    for i in range(n):
        ddb.put_item(
            TableName=table,
            Item={"PK": {"S": f"ceiling-{i}"}, "last_update_timestamp": {"N": "1"}, "last_updater_region": {"S": SG}},
            ConditionExpression="attribute_not_exists(PK) OR last_update_timestamp < :ts",
            ExpressionAttributeValues={":ts": {"N": "1"}},
        )
    return n / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--wan-delay-ms", type=float, default=40.0)
    parser.add_argument("--wan-jitter-ms", type=float, default=10.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="replicatord-bench-"))
    ports = {r: emulators.free_port() for r in REGIONS}
    with emulators.running(ports, workdir) as emus:
        endpoints = {r: e.endpoint_url for r, e in emus.items()}
        config = write_topology(workdir / "topology.yaml", topology_document(endpoints))
        provision_local(config, report=lambda _line: None)
        ddb = {r: client("dynamodb", r, url) for r, url in endpoints.items()}
        ceiling = conditional_put_ceiling(ddb[SG], "user-sg")
        for i in range(0, 600, 25):  # the ceiling items must not count as replicated data
            for j in range(i, i + 25):
                ddb[SG].delete_item(TableName="user-sg", Key={"PK": {"S": f"ceiling-{j}"}})
        with running_link("127.0.0.1", emus[SG].port, args.wan_delay_ms, args.wan_jitter_ms) as link:
            # Beijing reaches Singapore's Kinesis only over the emulated WAN link.
            cn_config = write_topology(
                workdir / "cn.yaml",
                topology_document({**endpoints, SG: f"http://127.0.0.1:{link.port}"}),
            )
            daemons = [DaemonProcess(cn_config, CN, workdir).start(), DaemonProcess(config, SG, workdir).start()]
            try:
                for d in daemons:
                    d.wait_ready()
                lags = []
                for i in range(args.probes):
                    key = {"PK": {"S": f"probe-{i}"}}
                    ddb[CN].put_item(TableName="user-cn", Item={
                        **key, "last_update_timestamp": {"N": f"{time.time():.3f}"}, "last_updater_region": {"S": CN},
                    })
                    written = time.monotonic()
                    wait_for(lambda k=key: "Item" in ddb[SG].get_item(TableName="user-sg", Key=k, ConsistentRead=True),
                             30, "a probe to replicate", interval_s=0.005)
                    lags.append((time.monotonic() - written) * 1000)
                before = read_counter(ddb[SG], "replicator_stats", "replicated_count")
                started = time.monotonic()
                load("user-cn", CN, args.items, batched=True, processes=2, endpoint_url=endpoints[CN])
                loaded_s = time.monotonic() - started
                wait_for(lambda: read_counter(ddb[SG], "replicator_stats", "replicated_count") >= before + args.items,
                         600, "the load to replicate", interval_s=0.05)
                total_s = time.monotonic() - started
            finally:
                for d in daemons:
                    d.terminate()
    rate = args.items / total_s
    print(f"WAN link cn-north-1 -> ap-southeast-1: {args.wan_delay_ms:.0f} ms ± {args.wan_jitter_ms:.0f} ms each way")
    print(f"lag, {args.probes} single-item probes (write in cn-north-1 -> visible in ap-southeast-1): "
          f"p50 {statistics.median(lags):.0f} ms, p90 {quantile(lags, 0.9):.0f} ms, "
          f"p99 {quantile(lags, 0.99):.0f} ms, max {max(lags):.0f} ms")
    print(f"throughput: {args.items} items loaded in {loaded_s:.1f}s, all applied in ap-southeast-1 after "
          f"{total_s:.1f}s: {rate:.0f} items/s")
    print(f"emulator ceiling (conditional PutItem/s, one client, one process): {ceiling:.0f}/s; "
          f"replication ran at {rate / ceiling:.0%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
