"""The main job, as a new user runs it: `replicatord demo` end to end (a small bulk load, a steady
phase with lag per direction, the plot), and its progress lines on time while the regions are slow
to answer (the printer against a sampler that hangs)."""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from pathlib import Path

import pytest

from replicatord.local import demo as demo_module
from replicatord.local.demo import Demo, Sample
from replicatord.local.world import REGIONS, wait_for
from tests.conftest import cli

CN, SG = REGIONS


@pytest.mark.e2e
def test_demo_converges_and_prints_lag_per_direction_and_a_plot(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    # As a new user's shell: no AWS credentials or region in the environment.
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    result = cli("demo", "--items", "40", "--processes", "1", "--steady-s", "4", "--rate", "5",
                 "--plot", str(plot), "--workdir", str(tmp_path / "demo"), env=env, timeout_s=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "converged: all 2 regions hold the same 120 items" in out, out[-2000:]  # 2 x 40 bulk + 2 x 20 steady
    for source, target in ((CN, SG), (SG, CN)):
        line = re.search(rf"^lag {source} -> {target}: p50 (\d+) ms, p95 \d+ ms, p99 \d+ ms, max \d+ ms "
                         r"\((\d+) records\)$", out, re.M)
        assert line and int(line[2]) == 20, out[-2000:]
    assert len(re.findall(r"^\[\s*[\d.]+s (bulk|steady)", out, re.M)) >= 4, out[-2000:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_lines_come_on_time_while_the_regions_do_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(demo_module, "_line", lines.append)
    args = argparse.Namespace(progress_s=0.2, items=0, processes=1, steady_s=0, rate=1, timeout=5, plot=None)
    demo = Demo(args, {CN: "http://127.0.0.1:1", SG: "http://127.0.0.1:2"}, {})
    answered = threading.Event()
    release = threading.Event()

    def sample() -> Sample:
        if answered.is_set():
            release.wait(30)  # a region that no longer answers
        answered.set()
        return Sample(time.monotonic(), dict.fromkeys(demo.regions, 5), dict.fromkeys(demo.regions, 5),
                      dict.fromkeys(demo.regions, 1.0), dict.fromkeys(demo.regions, 5.0),
                      dict.fromkeys(demo.regions, 5.0))

    monkeypatch.setattr(demo, "_sample", sample)
    try:
        with demo._reporting():
            wait_for(lambda: sum("figures" in line and "old" in line for line in lines) >= 3, 10,
                     "progress lines that say how old their figures are")
            release.set()
    finally:
        release.set()
    assert all("applied      5 of      5" in line for line in lines if line.startswith("["))
