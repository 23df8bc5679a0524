"""The benchmark: replicatord and the AWS sample it replaces, side by side, on the local emulators.

    .venv/bin/python scripts/bench.py [--system both|replicatord|sample] [--rate 50] [--steady-s 20]
                                      [--burst 5000] [--idle-s 60] [--wan] [--squid]
                                      [--json FILE] [--png FILE]

For each system, in one run on this machine (fresh emulators each, AWS-like timestamps, no
injected faults or read limits):
1. the steady load with the system running: both regions written at `--rate` items/s for
   `--steady-s`, how long the application took; lag per record, measured outside the system by an
   observer that tails the target table's DynamoDB stream (write -> visible), p50/p95/p99/max;
   the loader's time again;
2. a burst of `--burst` items into cn-north-1 (BatchWriteItem, as fast as it goes): the rate at
   which they became visible in ap-southeast-1, its ratio to the emulator's own ceiling for the
   same conditional puts (the system's condition; 16 at a time from one asyncio client,
   measured at the end, same emulator), and the time from the end of the load to the last item
   visible; calls the system made to the target region per record;
3. an idle period: the system's calls per minute per region, by operation;
4. with the system stopped, the same steady load: how long the application alone took.
Calls are counted at the emulators (`aws_behaviour` stats: aiobotocore's, which is the system's
and never the observer's), and so is the time each emulator spent serving each operation (every
caller's: the steady load's and the burst's, in the JSON); CPU seconds and peak RSS from /proc.
Prints a table; `--json` writes every figure; `--png` plots lag over time (needs matplotlib).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from replicatord.config import Conflict
from replicatord.conflict import PUT, Version, put_condition
from replicatord.local import emulators
from replicatord.local.aws_behaviour import Control
from replicatord.local.lag import Observer, lags_of, paced_writes, quantile
from replicatord.local.squid import running_squid
from replicatord.local.world import (
    REGIONS,
    DaemonProcess,
    client,
    local_env,
    provision_local,
    topology_document,
    wait_for,
    write_topology,
)

CN, SG = REGIONS
TABLES = {CN: "user-cn", SG: "user-sg"}
# AWS's timestamps, but nothing that would make the two systems' figures depend on luck.
BENCH_BEHAVIOUR = {"whole_second_timestamps": True, "stream_rollover_s": None, "stream_reads_per_shard_s": None,
                   "kinesis_reads_per_shard_s": None, "throttle_rate": 0.0, "error_rate": 0.0,
                   "error_after_rate": 0.0, "kinesis_put_throttle_rate": 0.0}


def both_regions(endpoints: dict[str, str], prefix: str, rate: float, seconds: float,
                 written: dict[str, dict[str, float]]) -> dict[str, float]:
    took: dict[str, float] = {}
    threads = [threading.Thread(target=lambda r=r: took.__setitem__(
        r, paced_writes(endpoints[r], r, TABLES[r], f"{prefix}-{r}", rate, seconds, written[r]))) for r in REGIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return took


def burst(endpoint: str, n: int, written: dict[str, float]) -> float:
    ddb = client("dynamodb", CN, endpoint)
    started = time.monotonic()
    for start in range(0, n, 25):
        now = time.time()
        items = []
        for i in range(start, min(n, start + 25)):
            pk = f"burst-{i}"
            written[pk] = now
            items.append({"PutRequest": {"Item": {"PK": {"S": pk}, "last_update_timestamp": {"N": f"{now:.3f}"},
                                                  "last_updater_region": {"S": CN}, "payload": {"S": "x" * 200}}}})
        ddb.batch_write_item(RequestItems={TABLES[CN]: items})
    return time.monotonic() - started


def conditional_put_ceiling(endpoint: str, kind: str, n: int = 1500, concurrency: int = 16) -> float:
    """The emulator's rate for the conditional puts `kind` makes when it applies a record (its
    condition, a burst item, the target table with its stream): `concurrency` puts at a time
    from one asyncio client, as a daemon sends them, so that the figure is the emulator's and not
    one sequential client's (which measured below what the daemon reached)."""

    async def measure() -> float:
        session = get_session()
        async with session.create_client("dynamodb", region_name=SG, endpoint_url=endpoint,
                                         config=AioConfig(max_pool_connections=concurrency)) as ddb:
            async def put(i: int) -> None:
                now = f"{time.time():.3f}"
                item = {"PK": {"S": f"ceiling-{i}"}, "last_update_timestamp": {"N": now},
                        "last_updater_region": {"S": CN}, "payload": {"S": "x" * 200}}
                if kind == "replicatord":
                    condition = put_condition({"PK": item["PK"]}, Version(Decimal(now), PUT, CN), Conflict())
                    await ddb.put_item(TableName=TABLES[SG], Item=item, ConditionExpression=condition.expression,
                                       ExpressionAttributeNames=condition.names,
                                       ExpressionAttributeValues=condition.values)
                else:  # the sample's condition (local/lambda_sample.py)
                    await ddb.put_item(TableName=TABLES[SG], Item=item,
                                       ConditionExpression="attribute_not_exists(PK) OR last_update_timestamp < :ts",
                                       ExpressionAttributeValues={":ts": item["last_update_timestamp"]})

            async def worker(start: int) -> None:
                for i in range(start, n, concurrency):
                    await put(i)

            started = time.monotonic()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return n / (time.monotonic() - started)

    return asyncio.run(measure())


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds used and peak RSS (bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


class System:
    """The replicator under test: replicatord daemons, or the sample's functions."""

    def __init__(self, kind: str, configs: dict[str, Path], workdir: Path) -> None:
        self.kind = kind
        self.procs: dict[str, Any] = {}
        for region in REGIONS:
            if kind == "replicatord":
                self.procs[region] = DaemonProcess(configs[region], region, workdir).start()
            else:
                log = (workdir / f"sample-{region}.log").open("ab")
                self.procs[region] = subprocess.Popen(
                    [sys.executable, "-m", "replicatord.local.lambda_sample", "--config", str(configs[region]),
                     "--region", region], stdout=log, stderr=subprocess.STDOUT, env=local_env())

    def pid(self, region: str) -> int:
        proc = self.procs[region]
        return int(proc.process.pid if self.kind == "replicatord" else proc.pid)

    def wait_ready(self) -> None:
        if self.kind == "replicatord":
            for proc in self.procs.values():
                proc.wait_ready(120)
        else:
            time.sleep(3)  # the sample has no readiness probe: give it its first polls

    def stop(self) -> None:
        for proc in self.procs.values():
            if self.kind == "replicatord":
                proc.terminate(30)
            else:
                proc.terminate()
                proc.wait(30)


def run(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    ports = {r: emulators.free_port() for r in REGIONS}
    out: dict[str, Any] = {"system": kind}
    with emulators.running(ports, workdir, BENCH_BEHAVIOUR) as emus:
        endpoints = {r: e.endpoint_url for r, e in emus.items()}
        config = write_topology(workdir / "topology.yaml", topology_document(endpoints))
        provision_local(config, report=lambda _line: None)
        controls = {r: Control(endpoints[r]) for r in REGIONS}
        configs = {r: config for r in REGIONS}
        paths = contextlib.ExitStack()
        if args.wan or args.squid:
            proxy = paths.enter_context(running_squid()).url if args.squid else None
            for region, peer in ((CN, SG), (SG, CN)):  # each region reaches its peer over the path
                url = endpoints[peer]
                if args.wan:
                    url = f"http://127.0.0.1:{paths.enter_context(wan_link(emus[peer].port))}"
                configs[region] = write_topology(workdir / f"{region}.yaml", topology_document(
                    {**endpoints, peer: url}, proxies={peer: proxy} if proxy else None))
        try:
            system = System(kind, configs, workdir)
            try:
                system.wait_ready()
                observers = {r: Observer(endpoints[r], r, TABLES[r]) for r in REGIONS}
                wait_for(lambda: all(o.thread.is_alive() for o in observers.values()), 10, "observers")
                cpu0 = {r: proc_stats(system.pid(r))[0] for r in REGIONS}
                written: dict[str, dict[str, float]] = {r: {} for r in REGIONS}
                for control in controls.values():
                    control.reset_stats()
                out["app_with_system_s"] = both_regions(endpoints, "steady", args.rate, args.steady_s, written)

                def steady_seen() -> bool:
                    return all(pk in observers[SG if r == CN else CN].seen for r in REGIONS for pk in written[r])

                wait_for(steady_seen, 300, "the steady load to replicate", interval_s=0.1)
                lags = lags_of(written[CN], observers[SG].seen) + lags_of(written[SG], observers[CN].seen)
                out["steady_lag_s"] = {"n": len(lags), "p50": quantile(lags, 0.5), "p95": quantile(lags, 0.95),
                                       "p99": quantile(lags, 0.99), "max": max(lags)}
                out["steady_emulator_busy_s"] = {r: controls[r].stats()["busy_s"] for r in REGIONS}
                out["lag_series"] = sorted((at - min(written[CN].values()), observers[SG].seen[pk] - at)
                                           for pk, at in written[CN].items())
                for control in controls.values():
                    control.reset_stats()
                burst_written: dict[str, float] = {}
                load_s = burst(endpoints[CN], args.burst, burst_written)
                load_end = time.time()
                wait_for(lambda: all(pk in observers[SG].seen for pk in burst_written), 900,
                         "the burst to replicate", interval_s=0.1)
                first = min(burst_written.values())
                last_seen = max(observers[SG].seen[pk] for pk in burst_written)
                target_calls = controls[SG].stats()["daemon_calls"]
                out["burst"] = {"items": args.burst, "load_s": load_s,
                                "replicated_per_s": args.burst / (last_seen - first),
                                "visible_after_load_end_s": last_seen - load_end,
                                "target_calls_per_record": sum(target_calls.values()) / args.burst,
                                "target_calls": target_calls,
                                "target_busy_s": controls[SG].stats()["busy_s"]}
                cpu1 = {r: proc_stats(system.pid(r))[0] for r in REGIONS}
                replicated = args.burst + sum(len(w) for w in written.values())
                out["cpu_s_per_1000_records"] = sum(cpu1[r] - cpu0[r] for r in REGIONS) / replicated * 1000
                for observer in observers.values():
                    observer.stop()
                for control in controls.values():
                    control.reset_stats()
                time.sleep(args.idle_s)  # the idle period being measured
                out["idle_calls_per_minute"] = {
                    r: {op: round(n * 60 / args.idle_s, 1)
                        for op, n in sorted(controls[r].stats()["daemon_calls"].items())}
                    for r in REGIONS}
                out["peak_rss_mb"] = {r: proc_stats(system.pid(r))[1] / 2**20 for r in REGIONS}
            finally:
                system.stop()
            # The application alone, last: its writes would otherwise be a backlog for the system
            # to work through (it starts at the streams' oldest records) while lag is measured.
            out["app_alone_s"] = both_regions(endpoints, "alone", args.rate, args.steady_s, {r: {} for r in REGIONS})
            out["ceiling_puts_per_s"] = conditional_put_ceiling(endpoints[SG], kind)
            out["burst"]["ratio_to_ceiling"] = out["burst"]["replicated_per_s"] / out["ceiling_puts_per_s"]
        finally:
            paths.close()
    return out


@contextlib.contextmanager
def wan_link(target_port: int) -> Iterator[int]:
    """The 40 ± 10 ms link to a peer, in a process of its own: in this one, its event loop would
    share the interpreter with the loaders and observers and delay them (and itself)."""
    port = emulators.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "replicatord.local.wan", "--listen", f"127.0.0.1:{port}",
                             "--target", f"127.0.0.1:{target_port}", "--delay-ms", "40", "--jitter-ms", "10"],
                            stdout=subprocess.DEVNULL)
    try:
        emulators.wait_listening("127.0.0.1", port, 30, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def table(results: list[dict[str, Any]]) -> str:
    rows = [("", *[r["system"] for r in results])]

    def row(name: str, fmt: Any) -> None:
        rows.append((name, *[fmt(r) for r in results]))

    row("app: 20 s of writes took, alone (s)", lambda r: " / ".join(f"{v:.1f}" for v in r["app_alone_s"].values()))
    row("app: same, system running (s)", lambda r: " / ".join(f"{v:.1f}" for v in r["app_with_system_s"].values()))
    row("steady lag p50 / p95 / p99 / max (s)", lambda r: "{p50:.2f} / {p95:.2f} / {p99:.2f} / {max:.2f}".format(
        **r["steady_lag_s"]))
    row("burst: replicated items/s", lambda r: f"{r['burst']['replicated_per_s']:.0f}")
    row("burst: emulator ceiling (cond. puts/s)", lambda r: f"{r['ceiling_puts_per_s']:.0f}")
    row("burst: ratio to ceiling", lambda r: f"{r['burst']['ratio_to_ceiling']:.0%}")
    row("burst: all visible after load end (s)", lambda r: f"{r['burst']['visible_after_load_end_s']:.1f}")
    row("burst: target-region calls per record", lambda r: f"{r['burst']['target_calls_per_record']:.2f}")
    row("idle: calls per minute per region", lambda r: " / ".join(
        f"{sum(v.values()):.0f}" for v in r["idle_calls_per_minute"].values()))
    row("CPU s per 1,000 records", lambda r: f"{r['cpu_s_per_1000_records']:.2f}")
    row("peak RSS (MB)", lambda r: " / ".join(f"{v:.0f}" for v in r["peak_rss_mb"].values()))
    widths = [max(len(str(x[i])) for x in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(x, widths, strict=True)) for x in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("both", "replicatord", "sample"), default="both")
    parser.add_argument("--rate", type=float, default=50.0, help="steady writes per second into each region")
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--wan", action="store_true", help="the cross-region path over a 40 ms ± 10 ms link")
    parser.add_argument("--squid", action="store_true", help="the cross-region path through squid")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--png", help="plot lag over time to this file (needs matplotlib)")
    args = parser.parse_args()
    os.environ.update(emulators.LOCAL_CREDENTIALS)
    kinds = ["sample", "replicatord"] if args.system == "both" else [args.system]
    results = [run(kind, args) for kind in kinds]
    print(table(results))
    for r in results:
        print(f"{r['system']} idle calls per minute: {json.dumps(r['idle_calls_per_minute'])}")
        print(f"{r['system']} burst calls to the target region: {json.dumps(r['burst']['target_calls'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.png:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for r in results:
            xs, ys = zip(*r["lag_series"], strict=True)
            plt.plot(xs, ys, ".", markersize=2, label=r["system"])
        plt.xlabel("time into the steady load (s)")
        plt.ylabel("lag, cn-north-1 -> ap-southeast-1 (s)")
        plt.legend()
        plt.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
