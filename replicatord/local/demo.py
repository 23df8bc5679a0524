"""`replicatord demo`: the whole thing on local emulators, every way at once, then a verdict.

Starts one emulator process per region (`--regions N`, default 2: Beijing and Singapore; then
Ningxia and Frankfurt), provisions, starts one daemon per region, loads items into every region
concurrently while showing progress, waits for the drain and compares the tables attribute by
attribute. Exit status 0 only if they converge. Everything it started
is stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from replicatord.local import emulators
from replicatord.local.aws_behaviour import TEST_BEHAVIOUR
from replicatord.local.compare import compare_tables
from replicatord.local.load import load
from replicatord.local.world import (
    DaemonProcess,
    Drained,
    client,
    metric_sum,
    provision_local,
    read_counter,
    regions_for,
    stream_of,
    table_of,
    topology_document,
    write_topology,
)


def _line(text: str) -> None:
    print(text, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    regions = regions_for(args.regions)
    ports = {region: emulators.free_port() for region in regions}
    _line(f"demo: logs and config in {workdir}")
    with contextlib.ExitStack() as stack:
        behaviour = dict(TEST_BEHAVIOUR) if args.aws_behaviour else None
        emus = stack.enter_context(emulators.running(ports, workdir, behaviour))
        endpoints = {r: e.endpoint_url for r, e in emus.items()}
        for region, url in endpoints.items():
            _line(f"emulated {region} at {url}")
        config = write_topology(workdir / "topology.yaml", topology_document(endpoints))
        provision_local(config, report=lambda line: _line("provision " + line))
        daemons = {r: DaemonProcess(config, r, workdir).start() for r in regions}
        for daemon in daemons.values():
            stack.callback(daemon.terminate)
        for daemon in daemons.values():
            daemon.wait_ready()
            _line(f"daemon {daemon.region} ready, metrics at {daemon.url}/metrics")
        return _load_and_verify(args, endpoints, daemons)
    return 1  # pragma: no cover - the with-block returns


def _load_and_verify(args: argparse.Namespace, endpoints: dict[str, str], daemons: dict[str, DaemonProcess]) -> int:
    ddb = {r: client("dynamodb", r, url) for r, url in endpoints.items()}
    regions = list(endpoints)
    tables = {r: table_of(r) for r in regions}
    errors: list[str] = []

    def loader(region: str) -> None:
        try:
            load(tables[region], region, args.items, batched=True, processes=args.processes,
                 endpoint_url=endpoints[region])
        except Exception as exc:  # noqa: BLE001 - reported below, the demo fails
            errors.append(f"load into {region}: {exc}")

    os.environ.setdefault("AWS_DEFAULT_REGION", regions[0])
    threads = [threading.Thread(target=loader, args=(r,)) for r in regions]
    started = time.monotonic()
    _line(f"loading {args.items} items into each of {len(regions)} regions at once ({args.processes} processes each)")
    for thread in threads:
        thread.start()
    drained = Drained(lambda service, region: client(service, region, endpoints[region]),
                      {r: [(tables[r], stream_of(r))] for r in regions})
    deadline = None
    while True:
        loading = any(t.is_alive() for t in threads)
        caught_up = _show_progress(ddb, daemons, time.monotonic() - started, loading)
        if not loading:
            if errors:
                for error in errors:
                    _line("error: " + error)
                return 1
            deadline = deadline or time.monotonic() + args.timeout
            # Caught up by the sample's counters, or, where a retried write counts as stale (an
            # error after the write took effect, --aws-behaviour), by stream positions.
            if caught_up or drained():
                break
            if time.monotonic() > deadline:
                _line(f"not drained within {args.timeout:.0f}s after the load stopped")
                break
            if not all(d.alive() for d in daemons.values()):
                _line("a daemon exited:")
                for d in daemons.values():
                    _line(d.log_tail())
                return 1
        time.sleep(1)
    return _verdict(ddb, tables, time.monotonic() - started)


def _show_progress(ddb: dict[str, Any], daemons: dict[str, DaemonProcess], elapsed: float, loading: bool) -> bool:
    """Print one line of progress; True when every region applied everything loaded elsewhere."""
    regions = list(ddb)
    loaded = {r: read_counter(ddb[r], "loader_stats", "loaded_count") for r in regions}
    replicated = {r: read_counter(ddb[r], "replicator_stats", "replicated_count") for r in regions}
    # What a region should have applied: everything loaded into the others.
    expected = {r: sum(loaded[p] for p in regions if p != r) for r in regions}
    latency = {}
    for r, daemon in daemons.items():
        m = daemon.metrics()
        count = metric_sum(m, "replicatord_replication_latency_seconds_count")
        total = metric_sum(m, "replicatord_replication_latency_seconds_sum")
        latency[r] = f"{total / count * 1000:.0f} ms" if count else "-"
    _line(f"[{elapsed:5.1f}s] " + " | ".join(
        f"{r}: loaded {loaded[r]:>6}, applied {replicated[r]:>6} of {expected[r]:>6} "
        f"(mean latency {latency[r]})" for r in regions) + ("" if loading else "  [load stopped]"))
    return all(replicated[r] >= expected[r] for r in regions)


def _verdict(ddb: dict[str, Any], tables: dict[str, str], elapsed: float) -> int:
    diff = compare_tables(ddb, tables)
    if diff.identical:
        n = next(iter(diff.counts.values()))
        _line(f"converged: all {len(ddb)} regions hold the same {n} items, attribute for attribute "
              f"({elapsed:.1f}s)")
        return 0
    _line("NOT converged:")
    for line in diff.describe():
        _line("  " + line)
    return 1
