"""The AWS sample replicatord replaces, re-expressed for side-by-side benchmarks (scripts/bench.py).

Two Lambda functions per region, run at Lambda's event-source cadence in one process per region:
- `ddb_send_to_kinesis`: the table's DynamoDB stream polled 4 times a second, batches of up to
  500 records, up to 10 batches of one shard at once (parallelization factor 10, by key); each
  invocation puts the changes whose `last_updater_region` is this region on the peer's Kinesis
  stream (PutRecords);
- `replicator_kinesis`: the local Kinesis stream polled once a second, batches of up to 500, 10 at
  once by partition key; each invocation writes every record with the sample's conditional put
  (`attribute_not_exists(PK) OR last_update_timestamp < :ts`) and adds the count to
  `replicator_stats` `replicated_count`.
Deletes, tombstones and repairs are not the sample's: it replicates puts only.

    python -m replicatord.local.lambda_sample --config TOPOLOGY --region REGION
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import zlib
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from replicatord.config import load_topology

STREAM_POLL_S = 0.25
KINESIS_POLL_S = 1.0
BATCH = 500
PARALLEL = 10


def _split(records: list[Any], key: Any) -> list[list[Any]]:
    """Up to PARALLEL batches, records of one key in one batch, in order (Lambda's factor)."""
    groups: list[list[Any]] = [[] for _ in range(PARALLEL)]
    for record in records:
        groups[zlib.crc32(key(record).encode()) % PARALLEL].append(record)
    return [g for g in groups if g]


class Sample:
    def __init__(self, config: str, region: str) -> None:
        self.topology = load_topology(config)
        self.region = region
        self.peer = next(r for r in self.topology.regions if r != region)
        self.pair = self.topology.pairs[0]
        self.stop = asyncio.Event()
        self.forwarded = self.applied = 0

    async def run(self) -> None:
        session = get_session()
        me, peer = self.topology.regions[self.region], self.topology.regions[self.peer]
        config = AioConfig(retries={"mode": "standard", "max_attempts": 10}, max_pool_connections=32, proxies={})
        # The peer through its proxy, as the sample's first Lambda reaches the other region's Kinesis.
        to_peer = config.merge(AioConfig(proxies={"http": peer.proxy, "https": peer.proxy} if peer.proxy else {}))
        async with session.create_client("dynamodb", region_name=self.region, endpoint_url=me.endpoint_url,
                                         config=config) as ddb, \
                session.create_client("dynamodbstreams", region_name=self.region, endpoint_url=me.endpoint_url,
                                      config=config) as streams, \
                session.create_client("kinesis", region_name=self.region, endpoint_url=me.endpoint_url,
                                      config=config) as kinesis, \
                session.create_client("kinesis", region_name=self.peer, endpoint_url=peer.endpoint_url,
                                      config=to_peer) as peer_kinesis:
            self.ddb, self.streams, self.kinesis, self.peer_kinesis = ddb, streams, kinesis, peer_kinesis
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.gather(self.send_to_kinesis(), self.replicator_kinesis())

    async def send_to_kinesis(self) -> None:
        table = self.pair.tables[self.region]
        arn = (await self.ddb.describe_table(TableName=table))["Table"]["LatestStreamArn"]
        iterators: dict[str, str | None] = {}
        while not self.stop.is_set():
            started = time.monotonic()
            for shard in (await self.streams.describe_stream(StreamArn=arn))["StreamDescription"]["Shards"]:
                sid = shard["ShardId"]
                if sid not in iterators:
                    iterators[sid] = (await self.streams.get_shard_iterator(
                        StreamArn=arn, ShardId=sid, ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
                iterator = iterators[sid]
                if iterator is None:
                    continue
                page = await self.streams.get_records(ShardIterator=iterator, Limit=BATCH)
                iterators[sid] = page.get("NextShardIterator")
                records = [r for r in page["Records"] if r["eventName"] in ("INSERT", "MODIFY")]
                if records:
                    batches = _split(records, lambda r: json.dumps(r["dynamodb"]["Keys"], sort_keys=True))
                    await asyncio.gather(*(self._forward(b) for b in batches))
            await asyncio.sleep(max(0.0, STREAM_POLL_S - (time.monotonic() - started)))

    async def _forward(self, records: list[dict[str, Any]]) -> None:
        entries: list[Any] = []
        for record in records:
            image = record["dynamodb"]["NewImage"]
            if image.get("last_updater_region", {}).get("S") != self.region:
                continue
            entries.append({"Data": json.dumps(image, default=str).encode(),
                            "PartitionKey": json.dumps(record["dynamodb"]["Keys"], sort_keys=True)[:256]})
        while entries:
            result = await self.peer_kinesis.put_records(StreamName=self.pair.streams[self.peer], Records=entries)
            entries = [e for e, r in zip(entries, result["Records"], strict=True) if r.get("ErrorCode")]
            self.forwarded += len(result["Records"]) - len(entries)

    async def replicator_kinesis(self) -> None:
        stream = self.pair.streams[self.region]
        iterators: dict[str, str] = {}
        while not self.stop.is_set():
            started = time.monotonic()
            for shard in (await self.kinesis.list_shards(StreamName=stream))["Shards"]:
                sid = shard["ShardId"]
                if sid not in iterators:
                    iterators[sid] = (await self.kinesis.get_shard_iterator(
                        StreamName=stream, ShardId=sid, ShardIteratorType="TRIM_HORIZON"))["ShardIterator"]
                page = await self.kinesis.get_records(ShardIterator=iterators[sid], Limit=BATCH)
                iterators[sid] = page["NextShardIterator"]
                if page["Records"]:
                    batches = _split(page["Records"], lambda r: str(r["PartitionKey"]))
                    await asyncio.gather(*(self._apply(b) for b in batches))
            await asyncio.sleep(max(0.0, KINESIS_POLL_S - (time.monotonic() - started)))

    async def _apply(self, records: list[dict[str, Any]]) -> None:
        table = self.pair.tables[self.region]
        applied = 0
        for record in records:
            image = json.loads(record["Data"])
            try:
                await self.ddb.put_item(
                    TableName=table, Item=image,
                    ConditionExpression="attribute_not_exists(PK) OR last_update_timestamp < :ts",
                    ExpressionAttributeValues={":ts": image["last_update_timestamp"]})
                applied += 1
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
        if applied:
            self.applied += applied
            await self.ddb.update_item(
                TableName=self.topology.regions[self.region].stats_table, Key={"PK": {"S": "replicated_count"}},
                UpdateExpression="ADD cnt :n", ExpressionAttributeValues={":n": {"N": str(applied)}})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m replicatord.local.lambda_sample")
    parser.add_argument("--config", required=True)
    parser.add_argument("--region", required=True)
    args = parser.parse_args()
    sample = Sample(args.config, args.region)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, sample.stop.set)
        task = asyncio.create_task(sample.run())
        await sample.stop.wait()
        task.cancel()

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
