"""`replicatord demo`: the whole thing on local emulators, every way at once, then a verdict.

Starts one emulator process per region (`--regions N`, default 2: Beijing and Singapore; then
Ningxia and Frankfurt), provisions, starts one daemon per region, then:
1. bulk: loads `--items` into every region at once (as fast as the emulators take them: this
   phase shows throughput; lag is high because each emulator, one request at a time, also
   serves its loaders);
2. steady: writes `--rate` items/s into every region for `--steady-s`, a rate the emulators
   serve, and measures each record's lag from outside (an observer tails every target table's
   stream: write -> visible) to print p50/p95/p99/max per direction;
3. compares the tables attribute by attribute. Exit status 0 only if they converge.
Progress lines come every `--progress-s` on time, whatever the regions are doing: a sampler
thread reads the counters and the daemons' metrics, the printer prints the latest sample (and
says how old it is when the regions are slow to answer). `--plot FILE.png` draws lag and
throughput over the run. Everything it started is stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from replicatord.local import emulators
from replicatord.local.aws_behaviour import TEST_BEHAVIOUR
from replicatord.local.compare import compare_tables
from replicatord.local.lag import Lags, Observer, lags_of, paced_writes
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

LATENCY = "replicatord_replication_latency_seconds"


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
        # The loaders and the observers stand for the application: the emulators' own key (a new
        # user's shell has no AWS credentials, and the demo must not need any).
        os.environ.update(emulators.LOCAL_CREDENTIALS)
        os.environ.setdefault("AWS_DEFAULT_REGION", regions[0])
        return Demo(args, endpoints, daemons).run()
    return 1  # pragma: no cover - the with-block returns


@dataclass
class Sample:
    """One reading of every region: counters in the stats tables and the daemons' latency sums."""

    at: float  # monotonic
    loaded: dict[str, int]
    applied: dict[str, int]
    latency_sum: dict[str, float]
    latency_count: dict[str, float]
    applied_live: dict[str, float]  # the daemons' replicatord_records_applied_total (the stats table's
    # replicated_count is written in batches, so a rate from it comes in spikes)


@dataclass
class Demo:
    args: argparse.Namespace
    endpoints: dict[str, str]
    daemons: dict[str, DaemonProcess]
    samples: list[Sample] = field(default_factory=list)
    steady_written: dict[str, dict[str, float]] = field(default_factory=dict)
    phase: str = "bulk"
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.regions = list(self.endpoints)
        self.tables = {r: table_of(r) for r in self.regions}
        self.ddb = {r: client("dynamodb", r, url) for r, url in self.endpoints.items()}
        self.steady_written = {r: {} for r in self.regions}
        self.seen: dict[str, dict[str, float]] = {}  # per target region: key -> first seen (epoch s)
        self.halt = threading.Event()

    def run(self) -> int:
        with self._reporting():
            if not self._bulk() or not self._steady():
                return 1
        code = self._verdict()
        if self.args.plot and self.seen:
            self._plot(Path(self.args.plot))
        return code

    # -- phases -------------------------------------------------------------------------------

    def _bulk(self) -> bool:
        errors: list[str] = []

        def loader(region: str) -> None:
            try:
                load(self.tables[region], region, self.args.items, batched=True, processes=self.args.processes,
                     endpoint_url=self.endpoints[region])
            except Exception as exc:  # noqa: BLE001 - reported below, the demo fails
                errors.append(f"load into {region}: {exc}")

        threads = [threading.Thread(target=loader, args=(r,)) for r in self.regions]
        _line(f"bulk: {self.args.items} items into each of {len(self.regions)} regions at once "
              f"({self.args.processes} loader processes each; this phase shows throughput)")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            for error in errors:
                _line("error: " + error)
            return False
        self.phase = "bulk: load stopped, draining"
        return self._drained(f"bulk load of {self.args.items} items per region")

    def _steady(self) -> bool:
        if self.args.steady_s <= 0:
            return True
        observers = {r: Observer(self.endpoints[r], r, self.tables[r]) for r in self.regions}
        try:
            for observer in observers.values():
                if not observer.started.wait(30):
                    _line(f"error: could not tail the stream of {observer.table}")
                    return False
            self.phase = "steady"
            _line(f"steady: {self.args.rate:g} items/s into each region for {self.args.steady_s:g} s, lag measured "
                  "per record from outside (write -> visible in the other region's table)")
            writers = [threading.Thread(target=paced_writes, args=(
                self.endpoints[r], r, self.tables[r], f"steady-{r}", self.args.rate, self.args.steady_s,
                self.steady_written[r], self.halt)) for r in self.regions]
            for writer in writers:
                writer.start()
            for writer in writers:
                writer.join()
            self.phase = "steady: writes stopped, draining"

            def seen_everywhere() -> bool:
                return all(pk in observers[t].seen for s in self.regions for t in self.regions if t != s
                           for pk in self.steady_written[s])

            if not self._wait(seen_everywhere, "the steady writes to reach every region"):
                return False
            self.seen = {r: dict(o.seen) for r, o in observers.items()}
        finally:
            for observer in observers.values():
                observer.stop()
        for source in self.regions:
            for target in self.regions:
                if target != source:
                    lags = Lags.of(lags_of(self.steady_written[source], self.seen[target]))
                    _line(f"lag {source} -> {target}: {lags.line()}")
        return self._drained("steady writes")

    def _drained(self, what: str) -> bool:
        drained = Drained(lambda service, region: client(service, region, self.endpoints[region]),
                          {r: [(self.tables[r], stream_of(r))] for r in self.regions})

        since = time.monotonic()

        # Caught up by the counters (a sample read after the writes stopped), or, where a retried
        # write counts as stale (an error after the write took effect, --aws-behaviour), by stream
        # positions: a slower look (every region's leases and streams), taken only once the
        # counters have had a few seconds.
        def caught_up() -> bool:
            sample = self.samples[-1] if self.samples else None
            if sample and sample.at > since and self._caught_up(sample):
                return True
            return time.monotonic() - since > 5 * self.args.progress_s and drained()

        return self._wait(caught_up, f"the {what} to drain")

    def _wait(self, condition: Callable[[], bool], what: str) -> bool:
        deadline = time.monotonic() + self.args.timeout
        while not condition():
            if not all(d.alive() for d in self.daemons.values()):
                _line("a daemon exited:")
                for d in self.daemons.values():
                    _line(d.log_tail())
                return False
            if time.monotonic() > deadline:
                _line(f"not done within {self.args.timeout:.0f}s: {what}")
                return False
            self.halt.wait(0.5)
        return True

    def _verdict(self) -> int:
        diff = compare_tables(self.ddb, self.tables)
        elapsed = time.monotonic() - self.started
        if diff.identical:
            n = next(iter(diff.counts.values()))
            _line(f"converged: all {len(self.ddb)} regions hold the same {n} items, attribute for attribute "
                  f"({elapsed:.1f}s)")
            return 0
        _line("NOT converged:")
        for line in diff.describe():
            _line("  " + line)
        return 1

    # -- progress -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """A sampler reads the regions as fast as they answer; a printer prints on time."""
        threads = [threading.Thread(target=self._sampling, daemon=True, name="demo-sampler"),
                   threading.Thread(target=self._printing, daemon=True, name="demo-printer")]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self.halt.set()
            for thread in threads:
                thread.join(timeout=30)

    def _sampling(self) -> None:
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                self.samples.append(self._sample())
            except Exception as exc:  # noqa: BLE001 - a busy or stopping region: the next sample
                _line(f"(progress: {exc})")
            self.halt.wait(max(0.0, self.args.progress_s / 2 - (time.monotonic() - started)))

    def _sample(self) -> Sample:
        loaded = {r: read_counter(self.ddb[r], "loader_stats", "loaded_count") for r in self.regions}
        applied = {r: read_counter(self.ddb[r], "replicator_stats", "replicated_count") for r in self.regions}
        metrics = {r: d.metrics() for r, d in self.daemons.items()}
        return Sample(time.monotonic(), loaded, applied,
                      {r: metric_sum(m, f"{LATENCY}_sum") for r, m in metrics.items()},
                      {r: metric_sum(m, f"{LATENCY}_count") for r, m in metrics.items()},
                      {r: metric_sum(m, "replicatord_records_applied_total") for r, m in metrics.items()})

    def _expected(self, sample: Sample, region: str) -> int:
        """What `region` should have applied: everything written into the others."""
        return sum(sample.loaded[p] + len(self.steady_written[p]) for p in self.regions if p != region)

    def _caught_up(self, sample: Sample) -> bool:
        return all(sample.applied[r] >= self._expected(sample, r) for r in self.regions)

    def _printing(self) -> None:
        interval = self.args.progress_s
        tick = time.monotonic()
        while not self.halt.wait(max(0.0, tick + interval - time.monotonic())):
            tick += interval  # drift-free: a slow print never delays the next line
            if self.samples:
                _line(self._progress_line(time.monotonic()))

    def _progress_line(self, now: float) -> str:
        sample = self.samples[-1]
        before = next((s for s in reversed(self.samples) if s.at <= sample.at - self.args.progress_s), self.samples[0])
        parts = []
        for r in self.regions:
            count = sample.latency_count[r] - before.latency_count[r]
            recent = (sample.latency_sum[r] - before.latency_sum[r]) / count if count > 0 else None
            span = sample.at - before.at
            rate = (sample.applied_live[r] - before.applied_live[r]) / span if span > 0 else 0.0
            parts.append(f"{r}: applied {sample.applied[r]:>6} of {self._expected(sample, r):>6} ({rate:5.0f}/s, "
                         f"latency {'-' if recent is None else f'{recent * 1000:.0f} ms'})")
        age = now - sample.at
        stale = f"  [regions slow to answer: figures {age:.0f}s old]" if age > 1.5 * self.args.progress_s else ""
        return f"[{now - self.started:5.1f}s {self.phase}] " + " | ".join(parts) + stale

    # -- plot ---------------------------------------------------------------------------------

    def _plot(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            _line("--plot needs matplotlib (pip install 'replicatord[local]')")
            return
        figure, (lag_axes, rate_axes) = plt.subplots(2, 1, figsize=(10, 7))
        first = min((at for written in self.steady_written.values() for at in written.values()), default=0.0)
        for source in self.regions:
            for target in self.regions:
                if target == source:
                    continue
                points = sorted((at - first, self.seen[target][pk] - at)
                                for pk, at in self.steady_written[source].items() if pk in self.seen[target])
                lag_axes.plot([p[0] for p in points], [p[1] * 1000 for p in points], ".", markersize=3,
                              label=f"{source} -> {target}")
        lag_axes.set(title="steady phase: lag per record (write -> visible in the other region)",
                     xlabel="s since the steady phase began", ylabel="ms")
        lag_axes.legend()
        for region in self.regions:
            xs, ys = [], []
            for before, after in zip(self.samples, self.samples[1:], strict=False):
                if after.at > before.at:
                    xs.append(after.at - self.started)
                    ys.append((after.applied_live[region] - before.applied_live[region]) / (after.at - before.at))
            rate_axes.plot(xs, ys, label=f"applied in {region}")
        rate_axes.set(title="throughput: records applied per second", xlabel="s since the demo began",
                      ylabel="records/s")
        rate_axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        _line(f"plot: {path}")
