"""Proxy passwords never reach a log line or the plan `check-config` prints.

`redact_url` is table-tested; the two places that show a proxy (`cli.describe_plan` and the log
line of `Aws.open_peer`) are tested through their real code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from replicatord import cli
from replicatord.aws import Aws
from replicatord.config import Settings, parse_topology, redact_url, resolve_settings
from replicatord.metrics import Metrics

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "replicatord.example.yaml"
CN = "cn-north-1"
SG = "ap-southeast-1"
SECRET = "s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://10.0.0.5:3128", "http://10.0.0.5:3128"),
        ("http://squid.internal:3128/", "http://squid.internal:3128/"),
        (f"http://user:{SECRET}@127.0.0.1:3128", "http://user:***@127.0.0.1:3128"),
        (f"https://user:{SECRET}@proxy.example.com", "https://user:***@proxy.example.com"),
        (f"http://user:{SECRET}@[::1]:3128", "http://user:***@[::1]:3128"),
        # percent-encoded characters stay as written; the password goes whatever it holds
        (f"http://dom%5Cuser:{SECRET}%40x@host:3128", "http://dom%5Cuser:***@host:3128"),
        # unescaped '@', '/', ':' or '://' in the password: a URL parser would split it elsewhere
        (f"http://user:p@{SECRET}@host:3128", "http://user:***@host:3128"),
        (f"http://user:{SECRET}/x?y#z@host:3128", "http://user:***@host:3128"),
        (f"http://user:a:{SECRET}@host:3128", "http://user:***@host:3128"),
        (f"user:a://{SECRET}@host:3128", "user:***@host:3128"),
        # no scheme: botocore prefixes http:// itself
        (f"user:{SECRET}@host:3128", "user:***@host:3128"),
        # user info without a password may be a token: all of it goes
        (f"http://{SECRET}@host:3128", "http://***@host:3128"),
        ("http://user:@host:3128", "http://user:***@host:3128"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


def _settings_with_proxy(proxy: str) -> Settings:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["regions"][SG]["proxy"] = proxy
    return resolve_settings(parse_topology(yaml.safe_dump(doc), "topo.yaml"), CN, "test", "127.0.0.1:0")


def test_check_config_plan_redacts_the_proxy_password() -> None:
    settings = _settings_with_proxy(f"http://user:{SECRET}@127.0.0.1:3128")
    plan = cli.describe_plan(settings)
    assert "proxy: http://user:***@127.0.0.1:3128" in plan
    assert SECRET not in plan


async def test_open_peer_log_line_redacts_the_proxy_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings_with_proxy(f"http://user:{SECRET}@127.0.0.1:3128")

    async def parameter(self: Aws, name: str, decrypt: bool) -> str:
        return f"value-of-{name}"

    # The SSM read is the one seam: creating the peer's Kinesis client makes no request.
    monkeypatch.setattr(Aws, "read_parameter", parameter)
    caplog.set_level(logging.INFO, logger="replicatord.aws")
    async with Aws(settings, Metrics()) as aws:
        await aws.open_peer(SG)
    lines = [r.getMessage() for r in caplog.records if r.name == "replicatord.aws"]
    assert any("kinesis via http://user:***@127.0.0.1:3128" in line for line in lines), lines
    assert not any(SECRET in line for line in lines), lines
