"""Replication lag measured from outside the system, as an operator's probe would: a paced writer
stamps each item it writes, an observer tails the target table's DynamoDB stream and notes when
each key first appears there. Shared by the demo's steady phase and the benchmark."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from replicatord.local.world import client


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass(frozen=True)
class Lags:
    """Lag percentiles of one direction, in seconds."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, lags: list[float]) -> Lags:
        return cls(len(lags), quantile(lags, 0.5), quantile(lags, 0.95), quantile(lags, 0.99),
                   max(lags, default=float("nan")))

    def line(self) -> str:
        return (f"p50 {self.p50 * 1000:.0f} ms, p95 {self.p95 * 1000:.0f} ms, p99 {self.p99 * 1000:.0f} ms, "
                f"max {self.max * 1000:.0f} ms ({self.n} records)")


def lags_of(written: dict[str, float], seen: dict[str, float]) -> list[float]:
    """Per key written (epoch seconds) and seen in the target: write -> visible."""
    return [seen[pk] - at for pk, at in written.items() if pk in seen]


class Observer:
    """Tails a table's DynamoDB stream (outside the system) and notes when each key first appears."""

    def __init__(self, endpoint: str, region: str, table: str) -> None:
        self.ddb = client("dynamodb", region, endpoint)
        self.streams = client("dynamodbstreams", region, endpoint)
        self.table = table
        self.seen: dict[str, float] = {}
        self.halt = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"observer-{region}")
        self.thread.start()

    def _run(self) -> None:
        """Every shard read every 50 ms, the shard list every second: a light consumer, so that
        the observer takes little of the emulator's time from the system being measured."""
        arn = self.ddb.describe_table(TableName=self.table)["Table"]["LatestStreamArn"]
        iterators: dict[str, str] = {}
        ended: set[str] = set()
        listed_at = 0.0
        while not self.halt.is_set():
            if time.monotonic() - listed_at >= 1.0:
                # Shards there at the start: from now on; shards that appear later: from their start.
                kind = "TRIM_HORIZON" if listed_at else "LATEST"
                listed_at = time.monotonic()
                for shard in self.streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]:
                    if shard["ShardId"] not in iterators and shard["ShardId"] not in ended:
                        iterators[shard["ShardId"]] = self.streams.get_shard_iterator(
                            StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType=kind)["ShardIterator"]
                self.started.set()
            for sid, iterator in list(iterators.items()):
                page = self.streams.get_records(ShardIterator=iterator, Limit=1000)
                now = time.time()
                for record in page["Records"]:
                    pk = record["dynamodb"]["Keys"]["PK"]["S"]
                    self.seen.setdefault(pk, now)
                if page.get("NextShardIterator"):
                    iterators[sid] = page["NextShardIterator"]
                else:
                    del iterators[sid]  # closed and read to its end
                    ended.add(sid)
            self.halt.wait(0.05)

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(timeout=10)


def paced_writes(endpoint: str, region: str, table: str, prefix: str, rate: float, seconds: float,
                 written: dict[str, float], halt: threading.Event | None = None) -> float:
    """Write `rate` items/s for `seconds` (as the application would), noting each key's write time
    in `written`; returns how long it took."""
    ddb = client("dynamodb", region, endpoint)
    count = int(rate * seconds)
    started = time.monotonic()
    for i in range(count):
        if halt is not None and halt.is_set():
            break
        pk = f"{prefix}-{i}"
        at = time.time()
        ddb.put_item(TableName=table, Item={
            "PK": {"S": pk}, "last_update_timestamp": {"N": f"{at:.3f}"}, "last_updater_region": {"S": region},
            "payload": {"S": "x" * 200}})
        written[pk] = at
        pause = started + (i + 1) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # paced to the rate
    return time.monotonic() - started
