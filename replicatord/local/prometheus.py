"""A real Prometheus for the end-to-end tests: the shipped alert rules on a test's time scale, the
server on loopback, its HTTP API, and a watch that records every alert's life.

The rules in config/prometheus-alerts.yaml wait minutes (`for: 5m`) and look back minutes
(`rate(...[5m])`); a test has seconds. `scale_rules` makes the test's rule file from the shipped
one, by code: every `for:` duration is multiplied by one factor and every range or subquery window
and `offset` in an expression by another; nothing else changes (names, labels, thresholds,
annotations). Thresholds stay absolute, so a window must stay longer than what it measures: a lag
over 5 s is only seen in a window holding several batches of 5 s, hence the two factors.

Grafana: `grafana_expr` substitutes a dashboard's template variables (`$pair`, `${pair}`,
`[[pair]]`, `$__rate_interval`...) so that each panel's query can be run through the API.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from replicatord.local.emulators import free_port

log = logging.getLogger(__name__)

# -- durations (Prometheus's format: 1y 1w 1d 1h 1m 1s 1ms, combined largest first) --------------

_UNITS_S = {"y": 365 * 86400.0, "w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = r"(?:\d+(?:ms|[ywdhms]))+"
_PART = re.compile(r"(\d+)(ms|[ywdhms])")


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration ("5m", "1h30m", "250ms")."""
    text = text.strip()
    if not re.fullmatch(_DURATION, text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNITS_S[unit] for n, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """A Prometheus duration for `seconds` (whole milliseconds): the largest unit that divides it."""
    ms = round(seconds * 1000)
    if ms < 0:
        raise ValueError(f"negative duration: {seconds}")
    if ms == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        unit_ms = round(_UNITS_S[unit] * 1000)
        if ms % unit_ms == 0:
            return f"{ms // unit_ms}{unit}"
    return f"{ms}ms"


def _scaled(text: str, scale: float, floor_s: float) -> str:
    seconds = parse_duration(text)
    if seconds == 0:
        return format_duration(0)
    return format_duration(max(floor_s, seconds * scale))


# -- the rule file on a test's time scale ------------------------------------------------------

# A PromQL string literal (its contents are never durations), a range or subquery window, an offset.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_WINDOW = re.compile(rf"\[\s*({_DURATION})\s*(?::\s*({_DURATION})?\s*)?\]")
_OFFSET = re.compile(rf"\boffset\s+(-?)\s*({_DURATION})")


def scale_expr(expr: str, scale: float, floor_s: float = 0.0) -> str:
    """`expr` with every range window, subquery step and offset multiplied by `scale` (windows no
    shorter than `floor_s`); string literals are left as they are."""

    def window(m: re.Match[str]) -> str:
        step = m.group(2)
        scaled_step = f":{_scaled(step, scale, 0.001)}" if step else (":" if ":" in m.group(0) else "")
        return f"[{_scaled(m.group(1), scale, floor_s)}{scaled_step}]"

    def offset(m: re.Match[str]) -> str:
        return f"offset {m.group(1)}{_scaled(m.group(2), scale, 0.001)}"

    out, last = [], 0
    for literal in _STRING.finditer(expr):
        code = expr[last:literal.start()]
        out.append(_OFFSET.sub(offset, _WINDOW.sub(window, code)))
        out.append(literal.group(0))
        last = literal.end()
    out.append(_OFFSET.sub(offset, _WINDOW.sub(window, expr[last:])))
    return "".join(out)


def scale_rules(document: Mapping[str, Any], for_scale: float, range_scale: float,
                min_for_s: float = 1.0, min_range_s: float = 0.0) -> dict[str, Any]:
    """A copy of a Prometheus rule file (parsed) on another time scale: each rule's `for:` (and
    `keep_firing_for:`, and a group's `interval:`) times `for_scale`, at least `min_for_s`; the
    windows and offsets of each `expr` times `range_scale`, windows at least `min_range_s`."""
    scaled = copy.deepcopy(dict(document))
    for group in scaled.get("groups", []):
        if "interval" in group:
            group["interval"] = _scaled(str(group["interval"]), for_scale, min_for_s)
        for rule in group.get("rules", []):
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    rule[key] = _scaled(str(rule[key]), for_scale, min_for_s)
            rule["expr"] = scale_expr(str(rule["expr"]), range_scale, min_range_s)
    return scaled


def write_test_rules(source: Path, dest: Path, for_scale: float, range_scale: float,
                     min_for_s: float = 1.0, min_range_s: float = 0.0) -> Path:
    """Write the rules of `source` on a test's time scale (scale_rules) to `dest`."""
    document = yaml.safe_load(source.read_text())
    scaled = scale_rules(document, for_scale, range_scale, min_for_s, min_range_s)
    header = (f"# Generated from {source.name} by replicatord.local.prometheus.scale_rules: `for:` x {for_scale:g}, "
              f"windows x {range_scale:g}. Do not edit.\n")
    dest.write_text(header + yaml.safe_dump(scaled, sort_keys=False, width=1000))
    return dest


# -- Grafana's template variables -------------------------------------------------------------

_GRAFANA_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\[\[([A-Za-z_]\w*)(?::[^\]]*)?\]\]|\$([A-Za-z_]\w*)")


def grafana_variables(text: str) -> set[str]:
    """The names of the template variables `text` uses."""
    return {next(g for g in m.groups() if g) for m in _GRAFANA_VARIABLE.finditer(text)}


def grafana_expr(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with its Grafana template variables replaced by `values` (KeyError naming one that
    has none: a new variable in the dashboard must be given a value by whoever runs its queries)."""

    def value(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name not in values:
            raise KeyError(f"no value for the Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(value, expr)


def dashboard_targets(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query target, rows' nested panels included."""
    found = []

    def walk(panels: Sequence[Mapping[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if "expr" in target:
                    found.append((str(panel.get("title", "")), str(target.get("refId", "")), str(target["expr"])))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


# -- the server and its API -------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """The API answered an error (a query that does not parse: errorType bad_data)."""

    def __init__(self, error_type: str, error: str) -> None:
        super().__init__(f"{error_type}: {error}")
        self.error_type = error_type


@dataclass
class Prometheus:
    url: str
    log_path: Path

    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """`data` of a GET /api/v1/`path` (PrometheusError if it says error)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422: the body says why
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(str(body.get("errorType", "unknown")), str(body.get("error", body)))
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) of `expr` now."""
        data = self.api("query", [("query", expr)])
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        """Every alerting rule, with its state (inactive, pending, firing) and alerts."""
        return [rule for group in self.api("rules", [("type", "alert")])["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.api(f"label/{label}/values", [("match[]", match)]))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        raise RuntimeError("prometheus is not installed: scripts/bootstrap.sh installs Debian's prometheus package")
    return found


def scrape_config(targets: Mapping[str, Sequence[str]], rule_files: Sequence[Path], interval_s: float,
                  job: str = "replicatord") -> dict[str, Any]:
    """One job scraping each region's daemons (host:port) with a `region` target label, as the
    rules assume; scrape and rule evaluation every `interval_s`."""
    every = format_duration(interval_s)
    return {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{
            "job_name": job,
            "static_configs": [{"targets": list(hosts), "labels": {"region": region}}
                               for region, hosts in targets.items()],
        }],
    }


@contextlib.contextmanager
def running_prometheus(workdir: Path, targets: Mapping[str, Sequence[str]], rule_files: Sequence[Path],
                       interval_s: float = 1.0, binary: str | None = None,
                       ready_deadline_s: float = 30.0) -> Iterator[Prometheus]:
    """A Prometheus server on 127.0.0.1 (a free port, its storage in `workdir`) until the block
    ends; then stopped (SIGTERM, SIGKILL after 10 s)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets, rule_files, interval_s), sort_keys=False))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [binary or prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:
        end = time.monotonic() + ready_deadline_s
        while not server.ready():
            if process.poll() is not None or time.monotonic() > end:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"prometheus did not become ready (exit {process.poll()}):\n{tail}")
            time.sleep(0.1)
        log.info("prometheus on %s (config %s)", server.url, config)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the alerts over time ----------------------------------------------------------------------


@dataclass
class Episode:
    """One alert (its name and labels) from when it was first seen active to when it was gone."""

    name: str
    labels: dict[str, str]
    seen_at: float  # monotonic, as every time here
    pending_at: float | None = None
    firing_at: float | None = None
    resolved_at: float | None = None

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        return self.name == name and all(self.labels.get(k) == v for k, v in labels.items())


@dataclass
class Allowance:
    """An alert that may be active from `start` until it is seen inactive `grace_s` or more after
    `fixed()` (a grace for what a fault leaves behind: records that arrive late once it is gone)."""

    name: str
    labels: dict[str, str]
    start: float
    grace_s: float = 0.0
    fixed_at: float | None = None
    closed_at: float | None = None

    def fixed(self) -> None:
        self.fixed_at = time.monotonic()

    def covers(self, episode: Episode, now: float) -> bool:
        return episode.matches(self.name, self.labels) and self.start <= now and self.closed_at is None


@dataclass
class AlertWatch:
    """Polls /api/v1/alerts from a thread: every alert's episodes, and each one that was active
    without an allowance (once `arm`ed): an alert that should have stayed quiet."""

    prometheus: Prometheus
    interval_s: float = 0.25
    episodes: list[Episode] = field(default_factory=list)
    allowances: list[Allowance] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    armed_at: float | None = None
    failed_polls: int = 0
    _open: dict[tuple[str, tuple[tuple[str, str], ...]], Episode] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> AlertWatch:
        self._thread = threading.Thread(target=self._run, name="alert-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                alerts = self.prometheus.alerts()
            except (PrometheusError, urllib.error.URLError, OSError, ValueError) as exc:
                self.failed_polls += 1
                log.debug("alert watch: %s", exc)
            else:
                self.observe(alerts, time.monotonic())
            self._stop.wait(self.interval_s)

    def observe(self, alerts: Sequence[Mapping[str, Any]], now: float) -> None:
        """One poll's answer: open, update and close episodes; check allowances."""
        with self._lock:
            active = set()
            for alert in alerts:
                labels = {str(k): str(v) for k, v in alert.get("labels", {}).items()}
                name = labels.pop("alertname", "")
                key = (name, tuple(sorted(labels.items())))
                active.add(key)
                episode = self._open.get(key)
                if episode is None:
                    episode = self._open[key] = Episode(name, labels, now)
                    self.episodes.append(episode)
                    if self.armed_at is not None and not any(a.covers(episode, now) for a in self.allowances):
                        self.violations.append(f"{name} {labels} became {alert.get('state')} at "
                                               f"+{now - self.armed_at:.1f}s without a fault that explains it")
                state = alert.get("state")
                if state == "pending" and episode.pending_at is None:
                    episode.pending_at = now
                if state == "firing" and episode.firing_at is None:
                    episode.firing_at = now
            for key in set(self._open) - active:
                self._open.pop(key).resolved_at = now
            for allowance in self.allowances:
                if allowance.fixed_at is not None and allowance.closed_at is None and \
                        now >= allowance.fixed_at + allowance.grace_s and not any(
                        e.matches(allowance.name, allowance.labels) for e in self._open.values()):
                    allowance.closed_at = now

    def arm(self) -> None:
        """From now on, an alert active without an allowance is a violation."""
        with self._lock:
            self.armed_at = time.monotonic()

    def allow(self, name: str, grace_s: float = 0.0, **labels: str) -> Allowance:
        """`name` (with these labels) may be active from now: a fault that explains it is coming."""
        with self._lock:
            allowance = Allowance(name, labels, time.monotonic(), grace_s)
            self.allowances.append(allowance)
            return allowance

    def active(self) -> list[Episode]:
        with self._lock:
            return list(self._open.values())

    def is_active(self, name: str, **labels: str) -> bool:
        with self._lock:
            return any(e.matches(name, labels) for e in self._open.values())

    def first_firing_at(self, name: str, since: float, **labels: str) -> float | None:
        """When an alert `name` (with these labels) was first seen firing at or after `since`."""
        with self._lock:
            times = [e.firing_at for e in self.episodes
                     if e.matches(name, labels) and e.firing_at is not None and e.firing_at >= since]
            return min(times, default=None)

    def resolved_at(self, name: str, **labels: str) -> float | None:
        """None while an alert `name` (with these labels) is active; else when the last one ended."""
        with self._lock:
            if any(e.matches(name, labels) for e in self._open.values()):
                return None
            times = [e.resolved_at for e in self.episodes if e.matches(name, labels) and e.resolved_at is not None]
            return max(times, default=None)
