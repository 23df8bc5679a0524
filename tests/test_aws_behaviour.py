"""The AWS-behaviour layer of the local regions, each behaviour shown against a plain boto3 client.

One emulator process with the layer (replicatord/local/aws_behaviour.py); every test sets the
behaviour it shows and nothing else, with boto3's own retries off so that every answer is seen.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from replicatord.local import emulators
from replicatord.local.aws_behaviour import Control
from replicatord.local.world import wait_for

pytestmark = pytest.mark.integration

REGION = "cn-north-1"
# Everything off: each test turns on what it shows.
QUIET = {"stream_rollover_s": None, "stream_retention_s": 3600, "stream_iterator_expiry_s": 900,
         "stream_reads_per_shard_s": None, "kinesis_reads_per_shard_s": None, "kinesis_iterator_expiry_s": 300,
         "kinesis_retention_s": 3600, "kinesis_put_throttle_rate": 0.0, "throttle_rate": 0.0, "error_rate": 0.0,
         "error_after_rate": 0.0, "faults_user_agent": "aiobotocore", "whole_second_timestamps": True}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = emulators.free_port()
    with emulators.running({REGION: port}, Path(tmp_path_factory.mktemp("aws")), behaviour=QUIET) as started:
        yield started[REGION].endpoint_url


@pytest.fixture
def aws(emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    control = Control(emulator)
    control.behaviour(**QUIET)
    control.reset_stats()

    class Clients:
        def __init__(self) -> None:
            self.control = control

        def client(self, service: str, key: str = "testing") -> Any:
            return boto3.client(service, region_name=REGION, endpoint_url=emulator, aws_access_key_id=key,
                                aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}))

    yield Clients()
    control.behaviour(**QUIET)


def code_of(raised: pytest.ExceptionInfo[ClientError]) -> str:
    return str(raised.value.response["Error"]["Code"])


_tables = iter(range(10_000))


def table_with_stream(aws: Any, ttl: str | None = None) -> tuple[Any, Any, str, str]:
    ddb, streams = aws.client("dynamodb"), aws.client("dynamodbstreams")
    name = f"t{next(_tables)}"
    ddb.create_table(TableName=name, KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
                     BillingMode="PAY_PER_REQUEST",
                     StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
    if ttl:
        ddb.update_time_to_live(TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl})
    arn = ddb.describe_table(TableName=name)["Table"]["LatestStreamArn"]
    return ddb, streams, name, arn


def put(ddb: Any, table: str, pk: str, **extra: Any) -> None:
    ddb.put_item(TableName=table, Item={"PK": {"S": pk}, **extra})


def shards(streams: Any, arn: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"StreamArn": arn, "Limit": 1}  # one per page: pagination is exercised
    while True:
        desc = streams.describe_stream(**kwargs)["StreamDescription"]
        out += desc["Shards"]
        if "LastEvaluatedShardId" not in desc:
            return out
        kwargs["ExclusiveStartShardId"] = desc["LastEvaluatedShardId"]


def read_shard(streams: Any, arn: str, shard_id: str) -> tuple[list[dict[str, Any]], bool]:
    """All records of a shard from its start; True if the shard ended (no NextShardIterator)."""
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    records: list[dict[str, Any]] = []
    for _ in range(20):
        page = streams.get_records(ShardIterator=it)
        records += page["Records"]
        if "NextShardIterator" not in page:
            return records, True
        it = page["NextShardIterator"]
    return records, False


# --- DynamoDB Streams ------------------------------------------------------------------------


def test_stream_timestamps_are_whole_seconds(aws: Any) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    for i in range(5):
        put(ddb, table, f"k{i}")
    records, _ = read_shard(streams, arn, shards(streams, arn)[0]["ShardId"])
    assert len(records) == 5
    assert all(r["dynamodb"]["ApproximateCreationDateTime"].microsecond == 0 for r in records)
    assert {r["awsRegion"] for r in records} == {REGION}


def test_stream_shards_roll_over_and_closed_shards_end(aws: Any) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    put(ddb, table, "before")
    assert aws.control.rollover(table) == 1
    put(ddb, table, "after")
    listed = shards(streams, arn)
    assert len(listed) == 2
    parent, child = listed
    assert child["ParentShardId"] == parent["ShardId"] and "ParentShardId" not in parent
    assert "EndingSequenceNumber" in parent["SequenceNumberRange"]
    assert "EndingSequenceNumber" not in child["SequenceNumberRange"]
    records, ended = read_shard(streams, arn, parent["ShardId"])
    assert ended and [r["dynamodb"]["Keys"]["PK"]["S"] for r in records] == ["before"]
    assert records[-1]["dynamodb"]["SequenceNumber"] == parent["SequenceNumberRange"]["EndingSequenceNumber"]
    records, ended = read_shard(streams, arn, child["ShardId"])
    assert [r["dynamodb"]["Keys"]["PK"]["S"] for r in records] == ["after"]

    aws.control.rollover(table)
    aws.control.rollover(table)  # the third shard closes empty: it ends at once
    empty = shards(streams, arn)[2]
    assert read_shard(streams, arn, empty["ShardId"]) == ([], True)

    aws.control.behaviour(stream_rollover_s=0.5)  # on a timer too
    time.sleep(0.6)  # the interval under test
    put(ddb, table, "later")
    assert len(shards(streams, arn)) == 5


def test_stream_retention_trims_records_and_closed_shards(aws: Any) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    put(ddb, table, "old")
    first = shards(streams, arn)[0]
    seq = read_shard(streams, arn, first["ShardId"])[0][0]["dynamodb"]["SequenceNumber"]
    stale = streams.get_shard_iterator(StreamArn=arn, ShardId=first["ShardId"], ShardIteratorType="TRIM_HORIZON")
    aws.control.behaviour(stream_retention_s=1.0)
    time.sleep(1.1)  # the retention under test
    put(ddb, table, "new")
    # The open shard's old record is trimmed: reading from before it is refused.
    with pytest.raises(ClientError) as raised:
        streams.get_shard_iterator(StreamArn=arn, ShardId=first["ShardId"], ShardIteratorType="AT_SEQUENCE_NUMBER",
                                   SequenceNumber=seq)
    assert code_of(raised) == "TrimmedDataAccessException"
    with pytest.raises(ClientError) as raised:
        streams.get_records(ShardIterator=stale["ShardIterator"])
    assert code_of(raised) == "TrimmedDataAccessException"
    records, _ = read_shard(streams, arn, first["ShardId"])
    assert [r["dynamodb"]["Keys"]["PK"]["S"] for r in records] == ["new"]
    # A closed shard leaves the stream once its retention has passed.
    aws.control.rollover(table)
    time.sleep(1.1)
    assert [s["ShardId"] for s in shards(streams, arn)] != [first["ShardId"]]
    assert first["ShardId"] not in {s["ShardId"] for s in shards(streams, arn)}
    with pytest.raises(ClientError) as raised:
        streams.get_shard_iterator(StreamArn=arn, ShardId=first["ShardId"], ShardIteratorType="TRIM_HORIZON")
    assert code_of(raised) == "ResourceNotFoundException"


def test_stream_iterators_expire_and_reads_are_limited(aws: Any) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    put(ddb, table, "x")
    shard = shards(streams, arn)[0]["ShardId"]
    aws.control.behaviour(stream_iterator_expiry_s=0.5, stream_reads_per_shard_s=2)
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    time.sleep(0.6)  # the expiry under test
    with pytest.raises(ClientError) as raised:
        streams.get_records(ShardIterator=it)
    assert code_of(raised) == "ExpiredIteratorException"
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    streams.get_records(ShardIterator=it)
    streams.get_records(ShardIterator=it)
    with pytest.raises(ClientError) as raised:
        streams.get_records(ShardIterator=it)
    assert code_of(raised) == "LimitExceededException"


def test_ttl_sweep_deletes_expired_items_as_the_service(aws: Any) -> None:
    ddb, streams, table, arn = table_with_stream(aws, ttl="expires_at")
    put(ddb, table, "expired", expires_at={"N": str(int(time.time()) - 60)})
    put(ddb, table, "alive", expires_at={"N": str(int(time.time()) + 3600)})
    put(ddb, table, "no ttl")
    ddb.delete_item(TableName=table, Key={"PK": {"S": "no ttl"}})  # an application delete
    assert aws.control.ttl_sweep(table) == 1
    assert {i["PK"]["S"] for i in ddb.scan(TableName=table)["Items"]} == {"alive"}
    removes = [r for r in read_shard(streams, arn, shards(streams, arn)[0]["ShardId"])[0] if r["eventName"] == "REMOVE"]
    by_key = {r["dynamodb"]["Keys"]["PK"]["S"]: r for r in removes}
    assert by_key["expired"]["userIdentity"] == {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}
    assert "userIdentity" not in by_key["no ttl"]


def test_a_stream_disabled_and_enabled_again_is_a_new_stream(aws: Any) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    put(ddb, table, "first")
    ddb.update_table(TableName=table, StreamSpecification={"StreamEnabled": False})
    put(ddb, table, "unrecorded")
    ddb.update_table(TableName=table, StreamSpecification={"StreamEnabled": True,
                                                           "StreamViewType": "NEW_AND_OLD_IMAGES"})
    put(ddb, table, "second")
    new_arn = ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    assert new_arn != arn
    old = streams.describe_stream(StreamArn=arn)["StreamDescription"]
    assert old["StreamStatus"] == "DISABLED"
    records, ended = read_shard(streams, arn, old["Shards"][0]["ShardId"])
    assert ended and [r["dynamodb"]["Keys"]["PK"]["S"] for r in records] == ["first"]
    records, ended = read_shard(streams, new_arn, shards(streams, new_arn)[0]["ShardId"])
    assert not ended and [r["dynamodb"]["Keys"]["PK"]["S"] for r in records] == ["second"]


# --- Kinesis ---------------------------------------------------------------------------------


_streams = iter(range(10_000))


def kinesis_stream(aws: Any) -> tuple[Any, str, str]:
    kinesis = aws.client("kinesis")
    name = f"s{next(_streams)}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    shard = kinesis.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    return kinesis, name, shard


def test_kinesis_reads_are_limited_per_shard_and_the_iterator_stays_valid(aws: Any) -> None:
    kinesis, name, shard = kinesis_stream(aws)
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
    aws.control.behaviour(kinesis_reads_per_shard_s=5)
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    for _ in range(5):
        kinesis.get_records(ShardIterator=it)
    with pytest.raises(ClientError) as raised:
        kinesis.get_records(ShardIterator=it)
    assert code_of(raised) == "ProvisionedThroughputExceededException"
    wait_for(lambda: _reads(kinesis, it), 5, "the limit to let a read through")


def _reads(kinesis: Any, iterator: str) -> bool:
    try:
        return len(kinesis.get_records(ShardIterator=iterator)["Records"]) == 1
    except ClientError:
        return False


def test_kinesis_iterators_expire(aws: Any) -> None:
    kinesis, name, shard = kinesis_stream(aws)
    aws.control.behaviour(kinesis_iterator_expiry_s=0.5)
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    next_it = kinesis.get_records(ShardIterator=it)["NextShardIterator"]
    time.sleep(0.6)  # the expiry under test
    with pytest.raises(ClientError) as raised:
        kinesis.get_records(ShardIterator=next_it)
    assert code_of(raised) == "ExpiredIteratorException"


def test_kinesis_put_records_entries_are_throttled_one_by_one(aws: Any) -> None:
    kinesis, name, _ = kinesis_stream(aws)
    aws.control.behaviour(kinesis_put_throttle_rate=0.5, seed=3)
    result = kinesis.put_records(StreamName=name, Records=[{"Data": b"x", "PartitionKey": str(i)} for i in range(40)])
    failed = [r for r in result["Records"] if "ErrorCode" in r]
    assert 0 < len(failed) < 40 and result["FailedRecordCount"] == len(failed)
    assert {r["ErrorCode"] for r in failed} == {"ProvisionedThroughputExceededException"}
    assert all("SequenceNumber" in r for r in result["Records"] if "ErrorCode" not in r)


def test_kinesis_retention_trims_and_an_old_checkpoint_reads_on_from_the_oldest(aws: Any) -> None:
    """What AWS answers for a sequence number past the retention: an iterator that reads on from
    the oldest record left, no error (harlow/kinesis-consumer#125; not TrimmedDataAccessException)."""
    kinesis, name, shard = kinesis_stream(aws)
    first = kinesis.put_record(StreamName=name, Data=b"old", PartitionKey="k")["SequenceNumber"]
    aws.control.behaviour(kinesis_retention_s=1.0)
    time.sleep(1.1)  # the retention under test
    kinesis.put_record(StreamName=name, Data=b"new", PartitionKey="k")
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                    StartingSequenceNumber=first)["ShardIterator"]
    assert [r["Data"] for r in kinesis.get_records(ShardIterator=it)["Records"]] == [b"new"]
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    assert [r["Data"] for r in kinesis.get_records(ShardIterator=it)["Records"]] == [b"new"]


# --- every service ---------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "code"), [("throttle_rate", "ProvisionedThroughputExceededException"),
                                                ("error_rate", "InternalServerError")])
def test_throttling_and_5xx_on_any_call(aws: Any, setting: str, code: str) -> None:
    ddb, _, table, _ = table_with_stream(aws)
    aws.control.behaviour(**{setting: 1.0, "faults_user_agent": ""})
    with pytest.raises(ClientError) as raised:
        put(ddb, table, "x")
    assert code_of(raised) == code
    aws.control.behaviour(**{setting: 0.0})
    assert "Item" not in ddb.get_item(TableName=table, Key={"PK": {"S": "x"}})


def test_5xx_after_the_call_took_effect(aws: Any) -> None:
    ddb, _, table, _ = table_with_stream(aws)
    aws.control.behaviour(error_after_rate=1.0, faults_user_agent="")
    with pytest.raises(ClientError) as raised:
        put(ddb, table, "written anyway")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    aws.control.behaviour(error_after_rate=0.0)
    assert "Item" in ddb.get_item(TableName=table, Key={"PK": {"S": "written anyway"}})


def test_faults_spare_clients_that_are_not_the_daemons(aws: Any) -> None:
    ddb, _, table, _ = table_with_stream(aws)
    aws.control.behaviour(throttle_rate=1.0)  # for aiobotocore's user agent only
    put(ddb, table, "boto3 is spared")
    assert aws.control.stats()["faults"].get("dynamodb.throttled", 0) == 0


def test_a_revoked_key_is_refused(aws: Any) -> None:
    kinesis, name, _ = kinesis_stream(aws)
    revoked = aws.client("kinesis", key="AKIDREVOKED")
    revoked.describe_stream_summary(StreamName=name)
    aws.control.revoke("AKIDREVOKED")
    with pytest.raises(ClientError) as raised:
        revoked.describe_stream_summary(StreamName=name)
    assert code_of(raised) == "UnrecognizedClientException"
    kinesis.describe_stream_summary(StreamName=name)  # other keys still work
    aws.control.unrevoke("AKIDREVOKED")
    revoked.describe_stream_summary(StreamName=name)
