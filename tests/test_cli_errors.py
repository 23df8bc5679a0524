"""Bad input: one clear line naming the problem, a non-zero exit status, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from replicatord.local.world import REGIONS
from tests.conftest import LocalRegions, cli

CN, SG = REGIONS
LOCAL = Path(__file__).parent.parent / "config" / "local.yaml"


def assert_one_line_error(result: Any, status: int, *needles: str) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda t: t.replace("regions:\n", "regions:\n  - [", 1), ("invalid YAML at line",)),
        (lambda t: t.replace("    proxy: null\n", "    proxy: null\n    proxyy: x\n", 1),
         ("regions.cn-north-1.proxyy", "unknown key")),
        (lambda t: t.replace("kinesis_shards: 1", "kinesis_shards: many"), ("pairs[0].kinesis_shards", "integer")),
        (lambda t: t.replace("    dead_letter_queue: ddbreplicatorcn\n", "", 1),
         ("regions.cn-north-1.dead_letter_queue", "Field required")),
        (lambda t: t.replace("cn-north-1: user-cn, ", "", 1), ("pairs[0].tables", "cn-north-1")),
        (lambda t: t.replace("ssm_prefix: /DDBReplication/TableCN/", "ssm_prefix: DDBReplication"),
         ("regions.cn-north-1.credentials.ssm_prefix",)),
        (lambda t: t + "metrics:\n  listen: 0.0.0.0:1\n", ("duplicate key 'metrics'",)),
    ],
    ids=["invalid-yaml", "unknown-key", "wrong-type", "missing-field", "pair-missing-region", "bad-prefix", "dup-key"],
)
def test_invalid_topology(tmp_path: Path, edit: Any, needles: tuple[str, ...]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(edit(LOCAL.read_text()))
    result = cli("check-config", "--config", str(config), "--region", CN)
    assert_one_line_error(result, 3, str(config), *needles)


def test_missing_config_file_and_region(tmp_path: Path) -> None:
    assert_one_line_error(cli("check-config", "--config", str(tmp_path / "nope.yaml"), "--region", CN), 3,
                          "cannot read")
    env = {k: v for k, v in __import__("os").environ.items() if k != "REPLICATORD_REGION"}
    assert_one_line_error(cli("check-config", "--config", str(LOCAL), env=env), 3, "--region", "missing")
    assert_one_line_error(cli("check-config", "--config", str(LOCAL), "--region", "us-east-1"), 3,
                          "'us-east-1' is not in the topology")


def test_the_example_topology_is_valid() -> None:
    example = Path(__file__).parent.parent / "config" / "replicatord.example.yaml"
    for region in REGIONS:
        result = cli("check-config", "--config", str(example), "--region", region)
        assert result.returncode == 0, result.stderr
    assert "proxy: http://10.0.0.5:3128" in cli("check-config", "--config", str(example), "--region", CN).stdout


def test_check_config_prints_the_plan() -> None:
    result = cli("check-config", "--config", str(LOCAL), "--region", CN)
    assert result.returncode == 0, result.stderr
    forwarder = "forwarder: DynamoDB stream of user-cn -> Kinesis ddb_replication_stream_sg (ap-southeast-1)"
    assert forwarder in result.stdout
    assert "SSM /DDBReplication/TableSG/AccessKey" in result.stdout
    assert "proxy: none" in result.stdout


@pytest.mark.integration
def test_missing_aws_resources_are_named(regions: LocalRegions) -> None:
    config = str(regions.write_config())
    run = ("run", "--config", config, "--region", SG, "--metrics-listen", "127.0.0.1:0")
    assert_one_line_error(cli(*run), 4, "dead-letter queue 'ddbreplicatorsg' not found", "provision")

    regions.provision()
    ssm = regions.client("ssm", SG)
    ssm.delete_parameter(Name="/DDBReplication/TableCN/SecretKey")
    assert_one_line_error(cli(*run), 4, "SSM parameter /DDBReplication/TableCN/SecretKey not found in ap-southeast-1")

    regions.provision()
    regions.client("kinesis", SG).delete_stream(StreamName="ddb_replication_stream_sg")
    assert_one_line_error(cli(*run), 4, "Kinesis stream 'ddb_replication_stream_sg' not found")

    regions.client("dynamodb", SG).delete_table(TableName="user-sg")
    assert_one_line_error(cli(*run), 4, "table 'user-sg' not found in ap-southeast-1")
