"""Fixtures for the integration and end-to-end tiers: emulator processes, squid, daemons.

Every factory closes what it opened.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from replicatord.conflict import PUT, Version
from replicatord.local import emulators
from replicatord.local.aws_behaviour import TEST_BEHAVIOUR, Control
from replicatord.local.compare import TableDiff, compare_tables
from replicatord.local.iam_check import check_calls
from replicatord.local.squid import Squid, running_squid, squid_binary
from replicatord.local.world import (
    REGIONS,
    DaemonProcess,
    client,
    local_env,
    provision_local,
    regions_for,
    topology_document,
    wait_for,
    write_topology,
)
from replicatord.records import ReplicationRecord

# Property-based tests: CI's share by default; scripts/fuzz.sh runs the long profile.
settings.register_profile("default", max_examples=200)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# -- waiting on a condition, with a deadline (never a bare sleep) -------------------------------

wait_until = wait_for  # in a plain test: wait_until(condition, deadline_s, what)


async def until(condition: Callable[[], object | Awaitable[object]], deadline_s: float, what: str,
                interval_s: float = 0.05) -> None:
    """In an async test: poll `condition` (a function, or a coroutine function) until it is true;
    fail naming `what` after `deadline_s`. Other tasks run while it waits."""
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise TimeoutError(f"timed out after {deadline_s:.0f}s waiting for {what}") from None


# -- builders shared by the test modules ------------------------------------------------------


def quick_tuning(**overrides: Any) -> dict[str, Any]:
    """`tuning:` of a test topology: leases on a test's time scale (failover in 4 s, a shard sync
    every second), and what the module itself tests."""
    return {"failover_s": 4, "renew_interval_s": 1, "lease_take_interval_s": 0.5, "shard_refresh_s": 1, **overrides}


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None,
        timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`replicatord ARGS` as an operator runs it, with the local world's operator keys."""
    return subprocess.run(
        [sys.executable, "-m", "replicatord.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout_s, env=env or local_env(),
    )


def assert_identical(regions: LocalRegions, tables: dict[str, str], counts: int | None = None) -> TableDiff:
    """The pair's tables hold the same items, attribute for attribute (and `counts` items each)."""
    diff = compare_tables({r: regions.client("dynamodb", r) for r in tables}, tables)
    assert diff.identical, "\n".join(line[:2000] for line in diff.describe())  # items of 400 KB: cut
    if counts is not None:
        assert diff.counts == dict.fromkeys(tables, counts)
    return diff


def stream_record(event: str | None, new: dict[str, Any] | None = None, old: dict[str, Any] | None = None,
                  created: Any = None, keys: dict[str, Any] | None = None, seq: int = 100) -> dict[str, Any]:
    """A DynamoDB stream record as botocore returns it (created: a datetime, default now)."""
    if keys is None:
        keys = {k: v for k, v in (new or old or {}).items() if k == "PK"}
    ddb: dict[str, Any] = {"Keys": dict(keys), "SequenceNumber": str(seq), "SizeBytes": 123,
                           "StreamViewType": "NEW_AND_OLD_IMAGES",
                           "ApproximateCreationDateTime": created if created is not None else datetime.now(UTC)}
    if new is not None:
        ddb["NewImage"] = new
    if old is not None:
        ddb["OldImage"] = old
    record: dict[str, Any] = {"eventID": "e1", "eventVersion": "1.1", "eventSource": "aws:dynamodb",
                              "awsRegion": "us-east-1", "dynamodb": ddb}
    if event is not None:
        record["eventName"] = event
    return record


def replication_put(pk: str, ts: str, region: str, pair: str = "user", created_s: float | None = None,
                    **extra: Any) -> ReplicationRecord:
    """The PUT a legitimate peer in `region` sends for item `pk` written at `ts`."""
    keys = {"PK": {"S": pk}}
    image = {**keys, "last_update_timestamp": {"N": ts}, "last_updater_region": {"S": region}, **extra}
    return ReplicationRecord("PUT", pair, keys, image, Version(Decimal(ts), PUT, region), region, "1",
                             created_s if created_s is not None else time.time())


@pytest.fixture(autouse=True)
def _local_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in emulators.LOCAL_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGIONS[0])
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@dataclass
class LocalRegions:
    """Emulated regions (one moto server process each) and the topology pointing at them."""

    workdir: Path
    endpoints: dict[str, str]
    daemons: list[DaemonProcess] = field(default_factory=list)
    config: Path | None = None

    def client(self, service: str, region: str) -> Any:
        return client(service, region, self.endpoints[region])

    def control(self, region: str) -> Control:
        """The AWS-behaviour layer of a region's emulator."""
        return Control(self.endpoints[region])

    def write_config(self, only: Sequence[str] | None = None, name: str = "topology.yaml", **kwargs: Any) -> Path:
        """The topology of every emulated region, or of `only` these."""
        endpoints = {r: url for r, url in self.endpoints.items() if only is None or r in only}
        self.config = write_topology(self.workdir / name, topology_document(endpoints, **kwargs))
        return self.config

    def provision(self, **kwargs: Any) -> Path:
        config = self.write_config(**kwargs)
        provision_local(config, report=lambda _line: None)
        return config

    def daemon(self, region: str, instance_id: str | None = None, env: dict[str, str] | None = None) -> DaemonProcess:
        assert self.config is not None, "write_config() or provision() first"
        daemon = DaemonProcess(self.config, region, self.workdir, instance_id, env).start()
        self.daemons.append(daemon)
        return daemon


@pytest.fixture
def behaviour() -> dict[str, Any]:
    """How the local regions behave: AWS's way, time scaled down (override in a test module)."""
    return dict(TEST_BEHAVIOUR)


@pytest.fixture
def regions(request: pytest.FixtureRequest, tmp_path: Path, behaviour: dict[str, Any]) -> Iterator[LocalRegions]:
    yield from _local_regions(request, REGIONS, tmp_path, behaviour)


@pytest.fixture
def mesh(request: pytest.FixtureRequest, tmp_path: Path, behaviour: dict[str, Any]) -> Iterator[LocalRegions]:
    """Three regions: Beijing, Singapore and Ningxia (Beijing's partition)."""
    yield from _local_regions(request, regions_for(3), tmp_path, behaviour)


@pytest.fixture
def tls_regions(request: pytest.FixtureRequest, tmp_path: Path, behaviour: dict[str, Any],
                monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalRegions]:
    """The two regions over https (a self-signed certificate that every client of the test and of
    its daemons trusts through AWS_CA_BUNDLE): a proxy reaches them by CONNECT, as it reaches AWS."""
    tls = emulators.make_certificate(tmp_path / "tls")
    monkeypatch.setenv("AWS_CA_BUNDLE", tls[0])
    yield from _local_regions(request, REGIONS, tmp_path, behaviour, tls)


def _local_regions(request: pytest.FixtureRequest, names: Sequence[str], tmp_path: Path,
                   behaviour: dict[str, Any], tls: emulators.TLS | None = None) -> Iterator[LocalRegions]:
    """The regions, and when the test is done, every call its daemons and operator commands made
    checked against the IAM policies the project generates (local/iam_check.py)."""
    ports = {region: emulators.free_port() for region in names}
    with emulators.running(ports, tmp_path, behaviour, tls) as emus:
        local = LocalRegions(tmp_path, {r: e.endpoint_url for r, e in emus.items()})
        try:
            yield local
        finally:
            for daemon in local.daemons:
                if daemon.process is not None:
                    daemon.terminate(timeout_s=15)
        if local.config is not None and behaviour.get("iam_record") and not request.node.get_closest_marker(
                "iam_unchecked"):
            checked = check_calls(local.config, local.endpoints)
            STATEMENTS_USED.update(checked.used)
            STATEMENTS_GRANTED.update(checked.granted)
            if checked.refused:
                pytest.fail("calls the generated IAM policies would refuse on AWS ('replicatord iam'):\n"
                            + "\n".join(checked.refused), pytrace=False)


# Which statements of the generated policies the suite's calls used, and which they grant: a
# statement no call of the whole suite uses is a permission the service does not need.
STATEMENTS_USED: set[tuple[str, str]] = set()
STATEMENTS_GRANTED: set[tuple[str, str]] = set()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a whole run of the suite (no -k, -m, or file of its own), fail if a statement of the
    generated IAM policies was used by no call (least privilege: take it out of iam.py)."""
    config = session.config
    whole = (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword
             and not config.option.markexpr and session.testsfailed == 0 and not session.shouldstop)
    unused = sorted(STATEMENTS_GRANTED - STATEMENTS_USED)
    if whole and unused and STATEMENTS_GRANTED:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"  {kind}: {sid}" for kind, sid in unused]
        message = "statements of the generated IAM policies no call of the suite used:\n" + "\n".join(lines)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def squid() -> Iterator[Squid]:
    """A real squid on loopback that only forwards to loopback (the emulators)."""
    try:
        binary = squid_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with running_squid(binary) as proxy:
        yield proxy
