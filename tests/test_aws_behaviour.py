"""The AWS-behaviour layer of the local regions, each behaviour shown against a plain boto3 client.

One emulator process with the layer (replicatord/local/aws_behaviour.py); every test sets the
behaviour it shows and nothing else, with boto3's own retries off so that every answer is seen.
"""

from __future__ import annotations

import email.utils
import http.client
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError, SSLError

from replicatord.config import CALLER_TAG
from replicatord.errors import AccessDenied, ClockSkew, classify
from replicatord.iam import Call
from replicatord.local import emulators
from replicatord.local.aws_behaviour import Control
from replicatord.local.iam_recorder import call_of, caller_region
from replicatord.local.squid import Squid
from replicatord.local.world import wait_for

pytestmark = pytest.mark.integration

REGION = "cn-north-1"
# Everything off: each test turns on what it shows.
QUIET = {"stream_rollover_s": None, "stream_retention_s": 3600, "stream_iterator_expiry_s": 900,
         "stream_reads_per_shard_s": None, "kinesis_reads_per_shard_s": None, "kinesis_iterator_expiry_s": 300,
         "kinesis_retention_s": 3600, "kinesis_put_throttle_rate": 0.0, "throttle_rate": 0.0, "error_rate": 0.0,
         "error_after_rate": 0.0, "faults_user_agent": "aiobotocore", "whole_second_timestamps": True,
         "iam_record": False, "iam_policies": {}, "clock_offset_s": 0.0, "signature_window_s": 900.0,
         "signature_window_by_service_s": {"kinesis": 300.0, "ssm": 300.0}}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = emulators.free_port()
    with emulators.running({REGION: port}, Path(tmp_path_factory.mktemp("aws")), behaviour=QUIET) as started:
        yield started[REGION].endpoint_url


class Clients:
    """boto3 clients of the emulated region with any access key, and its control API."""

    def __init__(self, emulator: str, control: Control) -> None:
        self.emulator = emulator
        self.control = control

    def client(self, service: str, key: str = "testing") -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.emulator, aws_access_key_id=key,
                            aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}))


@pytest.fixture
def aws(emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clients]:
    control = Control(emulator)
    control.behaviour(**QUIET)
    control.reset_stats()
    control.reset_iam_calls()
    yield Clients(emulator, control)
    control.behaviour(**QUIET)


def code_of(raised: pytest.ExceptionInfo[ClientError]) -> str:
    return str(raised.value.response["Error"]["Code"])


_tables = iter(range(10_000))


def table_with_stream(aws: Clients, ttl: str | None = None) -> tuple[Any, Any, str, str]:
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


def test_stream_timestamps_are_whole_seconds(aws: Clients) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    for i in range(5):
        put(ddb, table, f"k{i}")
    records, _ = read_shard(streams, arn, shards(streams, arn)[0]["ShardId"])
    assert len(records) == 5
    assert all(r["dynamodb"]["ApproximateCreationDateTime"].microsecond == 0 for r in records)
    assert {r["awsRegion"] for r in records} == {REGION}


def test_stream_shards_roll_over_and_closed_shards_end(aws: Clients) -> None:
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


def test_stream_retention_trims_records_and_closed_shards(aws: Clients) -> None:
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


def test_stream_iterators_expire_and_reads_are_limited(aws: Clients) -> None:
    ddb, streams, table, arn = table_with_stream(aws)
    put(ddb, table, "x")
    shard = shards(streams, arn)[0]["ShardId"]
    aws.control.behaviour(stream_iterator_expiry_s=0.5, stream_reads_per_shard_s=2)
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    time.sleep(0.6)  # the expiry under test
    with pytest.raises(ClientError) as raised:
        streams.get_records(ShardIterator=it)
    assert code_of(raised) == "ExpiredIteratorException"
    aws.control.behaviour(stream_iterator_expiry_s=60.0)
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    reads, refused = 0, None
    for _ in range(100):  # until two reads fall within one second, however busy the machine is
        try:
            streams.get_records(ShardIterator=it)
            reads += 1
        except ClientError as exc:
            refused = exc
            break
    assert refused is not None and reads >= 2, reads
    assert refused.response["Error"]["Code"] == "LimitExceededException"


def test_ttl_sweep_deletes_expired_items_as_the_service(aws: Clients) -> None:
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


def test_a_stream_disabled_and_enabled_again_is_a_new_stream(aws: Clients) -> None:
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
    # ListStreams names both while the old one's records are readable, a page at a time.
    def listed(**kwargs: Any) -> tuple[list[str], str | None]:
        page = streams.list_streams(**kwargs)
        return [s["StreamArn"] for s in page["Streams"] if s["TableName"] == table], page.get("LastEvaluatedStreamArn")

    assert listed()[0] == [arn, new_arn]
    first, last = listed(Limit=1)
    while last is not None and not first:  # other tests' tables come first
        first, last = listed(Limit=1, ExclusiveStartStreamArn=last)
    assert first == [arn] and last == arn
    assert listed(ExclusiveStartStreamArn=last)[0] == [new_arn]
    with aws.control.changed(stream_retention_s=0.0):
        assert listed()[0] == [new_arn]


# --- Kinesis ---------------------------------------------------------------------------------


_streams = iter(range(10_000))


def kinesis_stream(aws: Clients) -> tuple[Any, str, str]:
    kinesis = aws.client("kinesis")
    name = f"s{next(_streams)}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    shard = kinesis.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    return kinesis, name, shard


def test_kinesis_reads_are_limited_per_shard_and_the_iterator_stays_valid(aws: Clients) -> None:
    kinesis, name, shard = kinesis_stream(aws)
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
    aws.control.behaviour(kinesis_reads_per_shard_s=2)
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    # Read as fast as this machine lets us until the limit refuses one (on a busy machine two
    # reads may not fit in one second every time: read on until they do).
    reads, refused = 0, None
    for _ in range(100):
        try:
            kinesis.get_records(ShardIterator=it)
            reads += 1
        except ClientError as exc:
            refused = exc
            break
    assert refused is not None and reads >= 2, reads
    assert refused.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
    wait_for(lambda: _reads(kinesis, it), 5, "the limit to let a read through")


def _reads(kinesis: Any, iterator: str) -> bool:
    try:
        return len(kinesis.get_records(ShardIterator=iterator)["Records"]) == 1
    except ClientError:
        return False


def test_kinesis_iterators_expire(aws: Clients) -> None:
    kinesis, name, shard = kinesis_stream(aws)
    aws.control.behaviour(kinesis_iterator_expiry_s=0.5)
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    next_it = kinesis.get_records(ShardIterator=it)["NextShardIterator"]
    time.sleep(0.6)  # the expiry under test
    with pytest.raises(ClientError) as raised:
        kinesis.get_records(ShardIterator=next_it)
    assert code_of(raised) == "ExpiredIteratorException"


def test_kinesis_put_records_entries_are_throttled_one_by_one(aws: Clients) -> None:
    kinesis, name, _ = kinesis_stream(aws)
    aws.control.behaviour(kinesis_put_throttle_rate=0.5, seed=3)
    result = kinesis.put_records(StreamName=name, Records=[{"Data": b"x", "PartitionKey": str(i)} for i in range(40)])
    failed = [r for r in result["Records"] if "ErrorCode" in r]
    assert 0 < len(failed) < 40 and result["FailedRecordCount"] == len(failed)
    assert {r["ErrorCode"] for r in failed} == {"ProvisionedThroughputExceededException"}
    assert all("SequenceNumber" in r for r in result["Records"] if "ErrorCode" not in r)


def test_kinesis_retention_trims_and_an_old_checkpoint_reads_on_from_the_oldest(aws: Clients) -> None:
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
def test_throttling_and_5xx_on_any_call(aws: Clients, setting: str, code: str) -> None:
    ddb, _, table, _ = table_with_stream(aws)
    aws.control.behaviour(**{setting: 1.0, "faults_user_agent": ""})
    with pytest.raises(ClientError) as raised:
        put(ddb, table, "x")
    assert code_of(raised) == code
    aws.control.behaviour(**{setting: 0.0})
    assert "Item" not in ddb.get_item(TableName=table, Key={"PK": {"S": "x"}})


def test_5xx_after_the_call_took_effect(aws: Clients) -> None:
    ddb, _, table, _ = table_with_stream(aws)
    aws.control.behaviour(error_after_rate=1.0, faults_user_agent="")
    with pytest.raises(ClientError) as raised:
        put(ddb, table, "written anyway")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    aws.control.behaviour(error_after_rate=0.0)
    assert "Item" in ddb.get_item(TableName=table, Key={"PK": {"S": "written anyway"}})


def test_faults_spare_clients_that_are_not_the_daemons(aws: Clients) -> None:
    ddb, _, table, _ = table_with_stream(aws)
    aws.control.behaviour(throttle_rate=1.0)  # for aiobotocore's user agent only
    put(ddb, table, "boto3 is spared")
    assert aws.control.stats()["faults"].get("dynamodb.throttled", 0) == 0


def test_a_revoked_key_is_refused(aws: Clients) -> None:
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


# --- IAM: what each request is authorized as, and policies enforced ---------------------------


ACCOUNT = "123456789012"  # moto's


def arn(service: str, resource: str) -> str:
    return f"arn:aws-cn:{service}:{REGION}:{ACCOUNT}:{resource}"


def recorded(aws: Clients, key: str) -> dict[Call, int]:
    return {call_of(entry): entry["count"] for entry in aws.control.iam_calls() if entry["access_key"] == key}


def plain_table(aws: Clients, index: str | None = None) -> str:
    name = f"t{next(_tables)}"
    attributes = [{"AttributeName": "PK", "AttributeType": "S"}]
    extra: dict[str, Any] = {}
    if index:
        attributes.append({"AttributeName": "G", "AttributeType": "S"})
        extra["GlobalSecondaryIndexes"] = [{"IndexName": index, "Projection": {"ProjectionType": "ALL"},
                                            "KeySchema": [{"AttributeName": "G", "KeyType": "HASH"}]}]
    aws.client("dynamodb").create_table(TableName=name, KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                                        AttributeDefinitions=attributes, BillingMode="PAY_PER_REQUEST", **extra)
    return name


def key(pk: str) -> dict[str, Any]:
    return {"PK": {"S": pk}}


def test_iam_calls_of_dynamodb_are_recorded_per_key_table_index_and_item(aws: Clients) -> None:
    a, b = plain_table(aws, index="byG"), plain_table(aws)
    aws.control.behaviour(iam_record=True)
    ddb = aws.client("dynamodb", key="AKIDRECORDER")
    put(ddb, a, "k1")
    put(ddb, a, "k2")
    ddb.query(TableName=a, IndexName="byG", KeyConditionExpression="G = :g",
              ExpressionAttributeValues={":g": {"S": "x"}})
    ddb.batch_write_item(RequestItems={a: [{"PutRequest": {"Item": key("b1")}}],
                                       b: [{"PutRequest": {"Item": key("b2")}}]})
    ddb.transact_write_items(TransactItems=[
        {"Put": {"TableName": a, "Item": key("t1")}},
        {"Update": {"TableName": b, "Key": key("b2"), "UpdateExpression": "SET v = :v",
                    "ExpressionAttributeValues": {":v": {"N": "1"}}}},
        {"Delete": {"TableName": a, "Key": key("k1")}},
        {"ConditionCheck": {"TableName": b, "Key": key("b1"), "ConditionExpression": "attribute_not_exists(PK)"}}])
    ddb.transact_get_items(TransactItems=[{"Get": {"TableName": b, "Key": key("b2")}}])
    ddb.list_tables()
    table_a, table_b = arn("dynamodb", f"table/{a}"), arn("dynamodb", f"table/{b}")
    assert recorded(aws, "AKIDRECORDER") == {
        Call("dynamodb:PutItem", table_a): 3,  # two puts and the transaction's Put
        Call("dynamodb:Query", f"{table_a}/index/byG"): 1,
        Call("dynamodb:BatchWriteItem", table_a): 1,
        Call("dynamodb:BatchWriteItem", table_b): 1,
        Call("dynamodb:UpdateItem", table_b): 1,
        Call("dynamodb:DeleteItem", table_a): 1,
        Call("dynamodb:ConditionCheckItem", table_b): 1,
        Call("dynamodb:GetItem", table_b): 1,
        Call("dynamodb:ListTables", "*"): 1,
    }
    aws.client("dynamodb").describe_table(TableName=a)
    assert recorded(aws, "testing") == {Call("dynamodb:DescribeTable", table_a): 1}  # each key on its own


def test_iam_calls_of_stream_and_kinesis_reads_name_the_stream_of_their_iterator(aws: Clients) -> None:
    ddb, _, table, stream_arn = table_with_stream(aws)
    put(ddb, table, "x")
    _, name, shard = kinesis_stream(aws)
    aws.control.behaviour(iam_record=True)
    streams, kinesis = aws.client("dynamodbstreams", key="AKIDREADER"), aws.client("kinesis", key="AKIDREADER")
    stream_shard = streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"][0]["ShardId"]
    it = streams.get_shard_iterator(StreamArn=stream_arn, ShardId=stream_shard, ShardIteratorType="TRIM_HORIZON")
    assert len(streams.get_records(ShardIterator=it["ShardIterator"])["Records"]) == 1
    streams.list_streams()
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
    kinesis.list_shards(StreamName=name)
    it = kinesis.get_shard_iterator(StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON")
    assert len(kinesis.get_records(ShardIterator=it["ShardIterator"])["Records"]) == 1
    kinesis.list_streams()
    stream = arn("kinesis", f"stream/{name}")
    assert stream_arn.startswith(arn("dynamodb", f"table/{table}/stream/"))
    assert recorded(aws, "AKIDREADER") == {
        Call("dynamodb:DescribeStream", stream_arn): 1,
        Call("dynamodb:GetShardIterator", stream_arn): 1,
        Call("dynamodb:GetRecords", stream_arn): 1,
        Call("dynamodb:ListStreams", "*"): 1,
        Call("kinesis:PutRecord", stream): 1,
        Call("kinesis:ListShards", stream): 1,
        Call("kinesis:GetShardIterator", stream): 1,
        Call("kinesis:GetRecords", stream): 1,
        Call("kinesis:ListStreams", "*"): 1,
    }


def test_iam_calls_of_sqs_batches_and_ssm_secure_strings_with_the_kms_calls_they_imply(aws: Clients) -> None:
    aws.control.behaviour(iam_record=True)
    sqs, ssm = aws.client("sqs", key="AKIDQUEUES"), aws.client("ssm", key="AKIDQUEUES")
    queue = f"q{next(_tables)}"
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]
    sqs.get_queue_url(QueueName=queue)
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": "a"}, {"Id": "2", "MessageBody": "b"}])
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    handles = [{"Id": m["MessageId"], "ReceiptHandle": m["ReceiptHandle"]} for m in messages]
    sqs.change_message_visibility_batch(QueueUrl=url, Entries=[{**h, "VisibilityTimeout": 0} for h in handles])
    sqs.delete_message_batch(QueueUrl=url, Entries=handles)
    sqs.list_queues()
    secret, keyed, plain = (f"/DDBReplication/{queue}/{n}" for n in ("AccessKey", "Keyed", "Plain"))
    key_id = "1234abcd-12ab-34cd-56ef-1234567890ab"
    ssm.put_parameter(Name=secret, Value="s3cr3t", Type="SecureString")
    ssm.put_parameter(Name=keyed, Value="s3cr3t", Type="SecureString", KeyId=key_id)
    ssm.put_parameter(Name=plain, Value="v", Type="String")
    assert ssm.get_parameter(Name=secret, WithDecryption=True)["Parameter"]["Value"] == "s3cr3t"
    assert len(ssm.get_parameters(Names=[keyed, plain], WithDecryption=True)["Parameters"]) == 2
    ssm.get_parameter(Name=secret)  # not decrypted: no KMS call

    def via_ssm(parameter: str) -> tuple[tuple[str, str], ...]:
        return (("kms:ViaService", f"ssm.{REGION}.amazonaws.com"),
                ("kms:EncryptionContext:PARAMETER_ARN", arn("ssm", f"parameter{parameter}")))

    q = arn("sqs", queue)
    # KMS authorizes on the key's ARN, also for SSM's default alias (a key id of its own here).
    aws_key, own_key = arn("kms", f"key/{uuid.uuid5(uuid.NAMESPACE_URL, arn('kms', 'alias/aws/ssm'))}"), \
        arn("kms", f"key/{key_id}")
    assert recorded(aws, "AKIDQUEUES") == {
        Call("sqs:CreateQueue", q): 1,
        Call("sqs:GetQueueUrl", q): 1,
        Call("sqs:SendMessage", q): 1,
        Call("sqs:ReceiveMessage", q): 1,
        Call("sqs:ChangeMessageVisibility", q): 1,
        Call("sqs:DeleteMessage", q): 1,
        Call("sqs:ListQueues", "*"): 1,
        Call("ssm:PutParameter", arn("ssm", f"parameter{secret}")): 1,
        Call("kms:Encrypt", aws_key, via_ssm(secret)): 1,
        Call("kms:GenerateDataKey", aws_key, via_ssm(secret)): 1,
        Call("ssm:PutParameter", arn("ssm", f"parameter{keyed}")): 1,
        Call("kms:Encrypt", own_key, via_ssm(keyed)): 1,
        Call("kms:GenerateDataKey", own_key, via_ssm(keyed)): 1,
        Call("ssm:PutParameter", arn("ssm", f"parameter{plain}")): 1,
        Call("ssm:GetParameter", arn("ssm", f"parameter{secret}")): 2,
        Call("kms:Decrypt", aws_key, via_ssm(secret)): 1,
        Call("ssm:GetParameters", arn("ssm", f"parameter{keyed}")): 1,
        Call("ssm:GetParameters", arn("ssm", f"parameter{plain}")): 1,
        Call("kms:Decrypt", own_key, via_ssm(keyed)): 1,
    }


def test_iam_calls_are_recorded_only_when_asked_and_not_for_a_revoked_key(aws: Clients) -> None:
    ddb = aws.client("dynamodb", key="AKIDQUIET")
    ddb.list_tables()
    assert recorded(aws, "AKIDQUIET") == {}
    aws.control.behaviour(iam_record=True)
    aws.control.revoke("AKIDQUIET")
    try:
        with pytest.raises(ClientError):
            ddb.list_tables()
        assert recorded(aws, "AKIDQUIET") == {}
    finally:
        aws.control.unrevoke("AKIDQUIET")
    ddb.list_tables()
    assert recorded(aws, "AKIDQUIET") == {Call("dynamodb:ListTables", "*"): 1}
    aws.control.reset_iam_calls()
    assert aws.control.iam_calls() == []


def test_iam_calls_name_the_region_whose_client_made_them(aws: Clients) -> None:
    """The operator's one local key stands for a role per region: the User-Agent tag that every
    client of `aws.Aws` carries says whose policy judges the call (local/iam_check.py)."""
    aws.control.behaviour(iam_record=True)
    aws.control.reset_iam_calls()
    tagged = boto3.client("dynamodb", region_name=REGION, endpoint_url=aws.control.endpoint_url,
                          aws_access_key_id="AKIDTAG", aws_secret_access_key="testing",
                          config=Config(retries={"max_attempts": 1}, user_agent_extra=f"{CALLER_TAG}cn-northwest-1"))
    plain_table(aws)
    # The tag must not move the request to the tagged region (moto reads "region/..." tokens).
    assert tagged.list_tables()["TableNames"] == aws.client("dynamodb", key="AKIDTAG").list_tables()["TableNames"]
    callers = sorted(entry["caller"] for entry in aws.control.iam_calls() if entry["access_key"] == "AKIDTAG")
    assert callers == ["", "cn-northwest-1"]
    assert caller_region(f"Boto3/1.35 md/x {CALLER_TAG}ap-southeast-1 cfg/retry-mode#legacy") == "ap-southeast-1"


def refused(raised: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    """Code, HTTP status and message of a refusal, which replicatord must see as AccessDenied."""
    assert isinstance(classify(raised.value), AccessDenied)
    response = raised.value.response
    return code_of(raised), response["ResponseMetadata"]["HTTPStatusCode"], str(response["Error"]["Message"])


def not_allowed(user: str, action: str, resource: str) -> str:
    return (f"User: arn:aws-cn:iam::{ACCOUNT}:user/{user} is not authorized to perform: {action} on resource: "
            f"{resource} because no identity-based policy allows the {action} action")


def test_a_policy_refuses_exactly_the_call_it_does_not_allow(aws: Clients) -> None:
    table, other = plain_table(aws), plain_table(aws)
    table_arn = arn("dynamodb", f"table/{table}")
    aws.control.behaviour(iam_policies={"AKIDLIMITED": {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["dynamodb:PutItem", "dynamodb:GetItem"], "Resource": table_arn}]}})
    limited = aws.client("dynamodb", key="AKIDLIMITED")
    put(limited, table, "kept")
    assert "Item" in limited.get_item(TableName=table, Key=key("kept"))
    with pytest.raises(ClientError) as raised:
        limited.delete_item(TableName=table, Key=key("kept"))
    assert refused(raised) == ("AccessDeniedException", 400,
                               not_allowed("AKIDLIMITED", "dynamodb:DeleteItem", table_arn))
    assert "Item" in aws.client("dynamodb").get_item(TableName=table, Key=key("kept"))  # it did not take effect
    with pytest.raises(ClientError) as raised:
        put(limited, other, "x")
    assert refused(raised)[2] == not_allowed("AKIDLIMITED", "dynamodb:PutItem", arn("dynamodb", f"table/{other}"))


def test_an_explicit_deny_refuses_what_an_allow_grants(aws: Clients) -> None:
    table = plain_table(aws)
    table_arn = arn("dynamodb", f"table/{table}")
    aws.control.behaviour(iam_policies={"AKIDDENIED": [  # an identity's list of documents
        {"Statement": [{"Effect": "Allow", "Action": "dynamodb:*", "Resource": "*"}]},
        {"Statement": {"Effect": "Deny", "Action": "dynamodb:DeleteItem", "Resource": table_arn}}]})
    denied = aws.client("dynamodb", key="AKIDDENIED")
    put(denied, table, "kept")
    with pytest.raises(ClientError) as raised:
        denied.delete_item(TableName=table, Key=key("kept"))
    assert refused(raised) == ("AccessDeniedException", 400,
                               f"User: arn:aws-cn:iam::{ACCOUNT}:user/AKIDDENIED is not authorized to perform: "
                               f"dynamodb:DeleteItem on resource: {table_arn} with an explicit deny in an "
                               "identity-based policy")


def test_a_key_without_a_policy_is_not_checked(aws: Clients) -> None:
    table = plain_table(aws)
    aws.control.behaviour(iam_policies={"AKIDNOTHING": {"Statement": []}})
    with pytest.raises(ClientError) as raised:
        aws.client("dynamodb", key="AKIDNOTHING").list_tables()
    assert refused(raised)[0] == "AccessDeniedException"
    for unchecked in ("testing", "AKIDOTHER"):
        ddb = aws.client("dynamodb", key=unchecked)
        put(ddb, table, unchecked)
        ddb.delete_item(TableName=table, Key=key(unchecked))


def test_sqs_and_kinesis_refusals_reach_boto3_as_access_denied(aws: Clients) -> None:
    queue = f"q{next(_tables)}"
    aws.client("sqs").create_queue(QueueName=queue)
    _, stream, _ = kinesis_stream(aws)
    aws.control.behaviour(iam_policies={"AKIDNARROW": {"Statement": [
        {"Effect": "Allow", "Action": ["sqs:GetQueueUrl", "kinesis:DescribeStreamSummary"], "Resource": "*"}]}})
    sqs, kinesis = aws.client("sqs", key="AKIDNARROW"), aws.client("kinesis", key="AKIDNARROW")
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    with pytest.raises(ClientError) as raised:
        sqs.send_message(QueueUrl=url, MessageBody="x")
    # SQS's JSON protocol: HTTP 403, the Query protocol's code (x-amzn-query-error), the action in lower case.
    assert refused(raised) == ("AccessDenied", 403, not_allowed("AKIDNARROW", "sqs:sendmessage", arn("sqs", queue)))
    kinesis.describe_stream_summary(StreamName=stream)
    with pytest.raises(ClientError) as raised:
        kinesis.put_record(StreamName=stream, Data=b"x", PartitionKey="k")
    assert refused(raised) == ("AccessDeniedException", 400,
                               not_allowed("AKIDNARROW", "kinesis:PutRecord", arn("kinesis", f"stream/{stream}")))


def test_reading_a_secure_string_needs_kms_decrypt_through_ssm(aws: Clients) -> None:
    name = f"/DDBReplication/t{next(_tables)}/SecretKey"
    aws.client("ssm").put_parameter(Name=name, Value="s3cr3t", Type="SecureString")
    read = {"Effect": "Allow", "Action": "ssm:GetParameter", "Resource": arn("ssm", f"parameter{name}")}
    aws.control.behaviour(iam_policies={"AKIDSSM": {"Statement": [read]}})
    ssm = aws.client("ssm", key="AKIDSSM")
    ssm.get_parameter(Name=name)
    with pytest.raises(ClientError) as raised:
        ssm.get_parameter(Name=name, WithDecryption=True)
    assert refused(raised) == ("AccessDeniedException", 400,
                               not_allowed("AKIDSSM", "kms:Decrypt", arn(
                                   "kms", f"key/{uuid.uuid5(uuid.NAMESPACE_URL, arn('kms', 'alias/aws/ssm'))}")))
    decrypt = {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": "*",
               "Condition": {"StringEquals": {"kms:ViaService": f"ssm.{REGION}.amazonaws.com"}}}
    aws.control.behaviour(iam_policies={"AKIDSSM": {"Statement": [read, decrypt]}})
    assert ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"] == "s3cr3t"


# --- the region's clock ------------------------------------------------------------------------


STAMP = r"(\d{8}T\d{6}Z)"


def epoch(stamp: str) -> int:
    return int(time.mktime(time.strptime(stamp + "+0000", "%Y%m%dT%H%M%SZ%z")) - time.timezone)


def skewed(raised: pytest.ExceptionInfo[ClientError], offset_s: float) -> tuple[str, int, str]:
    """Code, HTTP status and message of a signature-time refusal, which replicatord must see as
    clock skew, measured from the answer's Date."""
    typed = classify(raised.value)
    assert isinstance(typed, ClockSkew) and typed.skew_s is not None and abs(typed.skew_s - offset_s) < 5
    response = raised.value.response
    return code_of(raised), response["ResponseMetadata"]["HTTPStatusCode"], str(response["Error"]["Message"])


def signature_times(message: str, minutes: int, late: bool = True) -> tuple[int, int, int]:
    """(signed, the limit, the region's now) of a signature-time refusal's message."""
    if late:
        pattern = rf"Signature expired: {STAMP} is now earlier than {STAMP} \({STAMP} - {minutes} min\.\)"
    else:
        pattern = rf"Signature not yet current: {STAMP} is still later than {STAMP} \({STAMP} \+ {minutes} min\.\)"
    found = re.fullmatch(pattern, message)
    assert found, message
    signed, limit, now = (epoch(s) for s in found.groups())
    return signed, limit, now


def test_a_region_clock_20_minutes_off_refuses_the_signature_as_aws_does(aws: Clients) -> None:
    ddb, sqs = aws.client("dynamodb"), aws.client("sqs")
    aws.control.behaviour(clock_offset_s=20 * 60)
    with pytest.raises(ClientError) as raised:
        ddb.list_tables()
    code, status, message = skewed(raised, 20 * 60)
    assert (code, status) == ("InvalidSignatureException", 400)
    signed, limit, now = signature_times(message, 15)
    assert now - limit == 15 * 60 and 20 * 60 - 5 <= now - signed <= 20 * 60 + 5
    with pytest.raises(ClientError) as raised:
        sqs.list_queues()
    code, status, message = skewed(raised, 20 * 60)
    assert (code, status) == ("SignatureDoesNotMatch", 403)
    signature_times(message, 15)

    aws.control.behaviour(clock_offset_s=-20 * 60)
    with pytest.raises(ClientError) as raised:
        ddb.list_tables()
    code, _, message = skewed(raised, -20 * 60)
    signed, limit, now = signature_times(message, 15, late=False)
    assert code == "InvalidSignatureException" and limit - now == 15 * 60


def test_a_region_clock_10_minutes_ahead_is_within_the_window_except_for_kinesis_and_ssm(aws: Clients) -> None:
    aws.control.behaviour(clock_offset_s=10 * 60)
    aws.client("dynamodb").list_tables()
    aws.client("sqs").list_queues()
    for service, call in (("kinesis", "list_streams"), ("ssm", "describe_parameters")):
        with pytest.raises(ClientError) as raised:
            getattr(aws.client(service), call)()
        code, status, message = skewed(raised, 10 * 60)
        assert (code, status) == ("InvalidSignatureException", 400)
        signature_times(message, 5)  # their window is 5 minutes


def _raw_dates(endpoint: str, path: str, headers: dict[str, str]) -> list[str]:
    host, port = endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", path, body=b"{}", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.headers.get_all("Date") or []
    finally:
        connection.close()


def test_every_response_carries_the_region_clock_as_its_one_date(aws: Clients, emulator: str) -> None:
    aws.control.behaviour(clock_offset_s=10 * 60)

    def shifted(date: str) -> bool:
        return abs(email.utils.parsedate_to_datetime(date).timestamp() - (time.time() + 600)) < 5

    answer = aws.client("dynamodb").list_tables()
    assert shifted(answer["ResponseMetadata"]["HTTPHeaders"]["date"])
    signed = {"X-Amz-Target": "DynamoDB_20120810.ListTables", "Content-Type": "application/x-amz-json-1.0",
              "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/dynamodb/aws4_request, "
                               "SignedHeaders=host, Signature=0"}
    for path, headers in (("/", signed),  # served by moto
                          ("/", {**signed, "X-Amz-Date": "20000101T000000Z"}),  # refused by the layer
                          ("/_replicatord/stats", {})):  # the control API
        dates = _raw_dates(emulator, path, headers)
        assert len(dates) == 1 and shifted(dates[0]), (path, dates)


# --- https -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An emulator serving https with a self-signed certificate: (endpoint URL, certificate path)."""
    workdir = Path(tmp_path_factory.mktemp("https"))
    tls = emulators.make_certificate(workdir / "tls")
    with emulators.running({REGION: emulators.free_port()}, workdir, behaviour=QUIET, tls=tls) as started:
        yield started[REGION].endpoint_url, tls[0]


def test_an_https_emulator_serves_boto3_directly_and_through_squid_by_connect(
        https_emulator: tuple[str, str], squid: Squid) -> None:
    url, cert = https_emulator
    assert url.startswith("https://127.0.0.1:")

    def ddb(**config: Any) -> Any:
        return boto3.client("dynamodb", region_name=REGION, endpoint_url=url, verify=cert,
                            config=Config(retries={"max_attempts": 1}, **config))

    direct, proxied = ddb(), ddb(proxies={"https": squid.url})
    direct.create_table(TableName="tls", KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
                        BillingMode="PAY_PER_REQUEST")
    put(direct, "tls", "direct")
    put(proxied, "tls", "proxied")
    assert {i["PK"]["S"] for i in proxied.scan(TableName="tls")["Items"]} == {"direct", "proxied"}
    assert direct.get_item(TableName="tls", Key=key("proxied"))["Item"] == key("proxied")
    port = url.rsplit(":", 1)[1]
    wait_for(lambda: any(" CONNECT 127.0.0.1:" + port in line for line in squid.requests()), 10,
             "squid's access log to show the CONNECT tunnels")
    assert Control(url, ca_bundle=cert).stats()["calls"]["dynamodb.PutItem"] == 2


async def test_aiobotocore_trusts_an_https_emulator_through_aws_ca_bundle(
        https_emulator: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = https_emulator
    once = AioConfig(retries={"max_attempts": 1})
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    async with get_session().create_client("dynamodb", region_name=REGION, endpoint_url=url, config=once) as untrusting:
        with pytest.raises(SSLError):
            await untrusting.list_tables()
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    async with get_session().create_client("dynamodb", region_name=REGION, endpoint_url=url, config=once) as trusting:
        assert "TableNames" in await trusting.list_tables()
    assert "calls" in Control(url).stats()  # the control client trusts AWS_CA_BUNDLE too


def test_a_client_stopped_half_way_through_a_request_does_not_hold_the_region(emulator: str, aws: Clients) -> None:
    """A daemon frozen by SIGSTOP, or a link gone silent, mid-request: the emulator serves one
    request at a time, so it drops that connection after its timeout and serves the others."""
    host, port = emulator.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as stalled:
        stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"half")
        started = time.monotonic()
        aws.client("dynamodb").list_tables()
        waited = time.monotonic() - started
    assert waited < emulators.REQUEST_TIMEOUT_S + 5, waited
