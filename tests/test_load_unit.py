"""Unit tests of the load generator against moto's in-process mock (multi-process is tested e2e)."""

from __future__ import annotations

import argparse
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from faker import Faker
from moto import mock_aws

from replicatord.local.load import LoadError, add_arguments, load, make_item, run

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBServiceResource

REGION = "cn-north-1"
TABLE = "user-cn"
STATS = "loader_stats"
PROFILE_FIELDS = {
    "first_name",
    "last_name",
    "email",
    "sex",
    "street_address",
    "state",
    "city",
    "zipcode",
    "country",
    "govid",
}
ALL_FIELDS = PROFILE_FIELDS | {"PK", "last_update_timestamp", "last_updater_region"}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[DynamoDBServiceResource]:
    """Fake credentials and a mocked cn-north-1 with the user table and loader_stats."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        dynamodb = boto3.resource("dynamodb", region_name=REGION)
        for name in (TABLE, STATS):
            dynamodb.create_table(
                TableName=name,
                KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
        yield dynamodb


def scan_all(dynamodb: Any, table: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {}
    while True:
        page = dynamodb.Table(table).scan(**kwargs)
        items.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def loaded_count(dynamodb: Any) -> int:
    item = dynamodb.Table(STATS).get_item(Key={"PK": "loaded_count"})["Item"]
    return int(item["cnt"])


def assert_item_shape(item: dict[str, Any]) -> None:
    assert set(item) == ALL_FIELDS
    uuid.UUID(item["PK"])
    for name in PROFILE_FIELDS | {"PK", "last_updater_region"}:
        assert isinstance(item[name], str), name
        assert item[name], name
    assert item["last_updater_region"] == REGION
    timestamp = item["last_update_timestamp"]
    assert isinstance(timestamp, Decimal)
    assert timestamp == timestamp.quantize(Decimal("0.001"))  # milliseconds at most
    assert 1.6e9 < timestamp < 4e9


def test_make_item_shape() -> None:
    item = make_item(Faker(), REGION, 1_732_634_400.123456)
    assert_item_shape(item)
    assert item["last_update_timestamp"] == Decimal("1732634400.123")
    assert not any(isinstance(value, float) for value in item.values())
    assert make_item(Faker(), REGION, 0.0)["PK"] != item["PK"]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "put_item"])
def test_load_writes_distinct_items_and_counts_them(aws: DynamoDBServiceResource, batched: bool) -> None:
    seen: list[int] = []

    written = load(TABLE, REGION, 250, batched=batched, progress=seen.append)

    assert written == 250
    items = scan_all(aws, TABLE)
    assert len({item["PK"] for item in items}) == len(items) == 250
    for item in items:
        assert_item_shape(item)
    assert loaded_count(aws) == 250
    assert seen == [100, 200, 250]


def test_loaded_count_accumulates_across_loads(aws: DynamoDBServiceResource) -> None:
    load(TABLE, REGION, 30, batched=True)
    load(TABLE, REGION, 12, batched=False)

    assert loaded_count(aws) == 42
    assert len(scan_all(aws, TABLE)) == 42


def test_zero_items_creates_the_counter(aws: DynamoDBServiceResource) -> None:
    assert load(TABLE, REGION, 0, batched=True) == 0
    assert loaded_count(aws) == 0


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "put_item"])
def test_missing_table_raises_load_error(aws: DynamoDBServiceResource, batched: bool) -> None:
    with pytest.raises(LoadError, match=re.escape("table 'nope' not found in cn-north-1")):
        load("nope", REGION, 10, batched=batched)


def test_missing_stats_table_fails_before_writing(aws: DynamoDBServiceResource) -> None:
    with pytest.raises(LoadError, match=re.escape("table 'no_stats' not found in cn-north-1")):
        load(TABLE, REGION, 10, batched=True, loader_stats_table="no_stats")
    assert scan_all(aws, TABLE) == []


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_match_the_original_flags() -> None:
    args = parse("-n", "5", "-t", TABLE, "-r", REGION, "-b")
    assert (args.count, args.table, args.region, args.batched) == (5, TABLE, REGION, True)
    assert (args.processes, args.endpoint_url, args.loader_stats_table) == (1, None, STATS)

    args = parse("--table", TABLE, "--region", REGION, "--processes", "3", "--endpoint-url", "http://x:1")
    assert (args.count, args.batched, args.processes, args.endpoint_url) == (100, False, 3, "http://x:1")


@pytest.mark.parametrize("argv", [["-r", REGION], ["-t", TABLE], ["-t", TABLE, "-r", REGION, "-n", "-1"]])
def test_bad_arguments_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_run_prints_summary(aws: DynamoDBServiceResource, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("-n", "120", "-t", TABLE, "-r", REGION, "-b")) == 0

    out = capsys.readouterr().out
    assert re.fullmatch(r"loaded 120 items into user-cn \(cn-north-1\) in \d+\.\ds, \d+ items/s\n", out)
    assert loaded_count(aws) == 120


def test_run_reports_missing_table(aws: DynamoDBServiceResource, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("-t", "nope", "-r", REGION)) == 1

    captured = capsys.readouterr()
    assert captured.err == "error: table 'nope' not found in cn-north-1\n"
    assert captured.out == ""
