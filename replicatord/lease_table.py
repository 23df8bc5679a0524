"""The lease table of a region: the one owner of its items (KCL's lease serializer and refresher).

Every item of the table is read and written here, whoever needs it:

- leases and their checkpoints (one item per stream shard, partition `<role>/<stream
  incarnation>`): taken, renewed (many in one TransactWriteItems), checkpointed,
  released, deleted; every change a conditional write on the counter (fencing), so an instance
  whose lease was taken gets LeaseLost and stops that shard;
- a pair's control rows (partition `control/<pair>`): pause flags (`replicatord pause`) and the
  stream incarnations each pipeline has followed (streams.py);
- backfill progress rows (partition `backfill/...`, `replicatord backfill`);
- the 0.1 layout's items, converted for `provision`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from replicatord.aws import Aws
from replicatord.errors import ConditionFailed, LeaseLost, ReplicatorError
from replicatord.leases import ACTIVE, FINISHED, Lease
from replicatord.sources import APPLIER, FORWARDER, SHIPPER

log = logging.getLogger(__name__)

# The table's key: one partition per stream (a pipeline's read of one stream incarnation), one
# item per shard, so a pipeline reads its own leases with a Query, never a Scan of the table.
STREAM_KEY = "stream_id"
SHARD_KEY = "shard_id"
LEASE_TABLE_KEY = {STREAM_KEY: "S", SHARD_KEY: "S"}
# The layout before the stream partition (replicatord 0.1): one `lease_key` hash key. `provision`
# copies its checkpoints into the current table.
LEGACY_LEASE_KEY = "lease_key"
LEGACY_LEASE_TABLE = "replicatord_leases"
# TransactWriteItems takes 100 items.
TRANSACTION_ITEMS = 100
# The lease keys of every pipeline: role/incarnation/shard ("shipper:<peer>/..." for an outbox);
# control rows (pause flags, followed streams, backfill progress) have other keys.
LEASE_PREFIXES = (f"{FORWARDER}/", f"{APPLIER}/", f"{SHIPPER}:")


_NAMES = {"#owner": "owner", "#counter": "counter", "#state": "state"}  # reserved words in DynamoDB


def item_key(key: str) -> dict[str, Any]:
    stream, shard = key.rsplit("/", 1)
    return {STREAM_KEY: {"S": stream}, SHARD_KEY: {"S": shard}}


def from_item(item: dict[str, Any]) -> Lease:
    at = item.get("checkpoint_at", {}).get("N")
    return Lease(
        key=f"{item[STREAM_KEY]['S']}/{item[SHARD_KEY]['S']}",
        owner=item.get("owner", {}).get("S"),
        counter=int(item.get("counter", {}).get("N", "0")),
        checkpoint=item.get("checkpoint", {}).get("S"),
        parents=tuple(sorted(item.get("parents", {}).get("SS", ()))),
        state=item.get("state", {}).get("S", ACTIVE),
        checkpoint_at=float(at) if at is not None else None,
    )


# --- a pair's control rows, backfill progress, the 0.1 layout ------------------------------------

def control_partition(pair: str) -> str:
    """The partition of a pair's control rows: pause flags and the streams followed."""
    return f"control/{pair}"


@dataclass
class SegmentProgress:
    """One segment of a backfill, as stored (`replicatord backfill` resumes from it)."""

    segment: str  # segment-NNNN-of-MMMM
    finished: bool = False
    resume: dict[str, Any] | None = None  # the scan's key to resume after
    counts: dict[str, int] = field(default_factory=dict)


def from_legacy(item: dict[str, Any]) -> dict[str, Any]:
    """An item of the 0.1 layout (one `lease_key` hash key) in the current one, without owner:
    the daemons take the leases from where the old ones stopped (`provision` copies them)."""
    item = dict(item)
    stream, _, shard = item.pop(LEGACY_LEASE_KEY)["S"].rpartition("/")
    item.pop("owner", None)
    return {STREAM_KEY: {"S": stream}, SHARD_KEY: {"S": shard}, **item}


class ControlRows:
    """What `LeaseTable` keeps besides leases (mixed into it)."""

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def _partition(self, partition: str, consistent: bool = True) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"KeyConditionExpression": "#s = :s", "ExpressionAttributeNames": {"#s": STREAM_KEY},
                                  "ExpressionAttributeValues": {":s": {"S": partition}}, "ConsistentRead": consistent}
        while True:
            page = await self._call("query", **kwargs)
            items += page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # Streams followed: which incarnations of a stream (DynamoDB stream labels, Kinesis creation
    # times) a pair's pipeline has followed here. A stream found at startup that is not in the row
    # is new since the last run, and is read from its oldest record whatever `initial_position`
    # says (streams.py).

    def _followed_key(self, pair: str, role: str, name: str) -> dict[str, Any]:
        return {STREAM_KEY: {"S": control_partition(pair)}, SHARD_KEY: {"S": f"followed/{role}/{name}"}}

    async def followed(self, pair: str, role: str, name: str) -> set[str]:
        result = await self._call("get_item", Key=self._followed_key(pair, role, name), ConsistentRead=True)
        return set(result.get("Item", {}).get("incarnations", {}).get("SS", []))

    async def note_followed(self, pair: str, role: str, name: str, incarnation: str) -> None:
        await self._call("update_item", Key=self._followed_key(pair, role, name),
                         UpdateExpression="ADD incarnations :i",
                         ExpressionAttributeValues={":i": {"SS": [incarnation]}})

    # Pauses (`replicatord pause|resume`): a flag per direction A:B in A's table.

    async def paused(self, pair: str) -> dict[str, float]:
        """The paused directions of a pair ("A:B" -> when paused)."""
        out = {}
        for item in await self._partition(control_partition(pair), consistent=False):
            shard = item[SHARD_KEY]["S"]
            if shard.startswith("pause/"):
                out[shard.removeprefix("pause/")] = float(item.get("paused_at", {}).get("N", "0"))
        return out

    def _pause_key(self, pair: str, direction: str) -> dict[str, Any]:
        return {STREAM_KEY: {"S": control_partition(pair)}, SHARD_KEY: {"S": f"pause/{direction}"}}

    async def pause(self, pair: str, direction: str, by: str) -> None:
        await self._call("put_item", Item={**self._pause_key(pair, direction), "paused_at": {"N": f"{time.time():.3f}"},
                                           "by": {"S": by}})

    async def resume(self, pair: str, direction: str) -> None:
        await self._call("delete_item", Key=self._pause_key(pair, direction))

    # Backfill progress: a row per segment, in a partition per backfill.

    async def load_progress(self, partition: str) -> list[SegmentProgress]:
        rows = []
        for item in await self._partition(partition):
            resume = item.get("resume", {}).get("S")
            rows.append(SegmentProgress(item[SHARD_KEY]["S"], item.get("state", {}).get("S") == FINISHED,
                                 json.loads(resume) if resume else None,
                                 {name: int(value["N"]) for name, value in item.items() if "N" in value
                                  and name not in ("updated_at",)}))
        return rows

    async def save_progress(self, partition: str, row: SegmentProgress) -> None:
        item: dict[str, Any] = {
            STREAM_KEY: {"S": partition}, SHARD_KEY: {"S": row.segment},
            "state": {"S": FINISHED if row.finished else ACTIVE},
            "updated_at": {"N": f"{time.time():.3f}"},
            **{name: {"N": str(count)} for name, count in row.counts.items()},
        }
        if row.resume is not None:
            item["resume"] = {"S": json.dumps(row.resume, sort_keys=True)}
        await self._call("put_item", Item=item)

    async def clear_progress(self, partition: str) -> None:
        for item in await self._partition(partition):
            await self._call("delete_item", Key={STREAM_KEY: item[STREAM_KEY], SHARD_KEY: item[SHARD_KEY]})

    async def all_leases(self) -> list[Lease]:
        """Every lease of every pipeline (a Scan: for operator commands, never the daemon)."""
        leases: list[Lease] = []
        kwargs: dict[str, Any] = {"ConsistentRead": True}
        while True:
            page = await self._call("scan", **kwargs)
            for item in page.get("Items", []):
                if item.get(STREAM_KEY, {}).get("S", "").startswith(LEASE_PREFIXES):
                    leases.append(from_item(item))
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --- the table --------------------------------------------------------------------------------


class HeldLease:
    """A lease this instance holds, shared by its shard consumer (checkpoints) and the renewer."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lock = asyncio.Lock()
        # When the last successful renewal (or the take) was *sent*: other instances may count
        # the lease expired from any moment after that, so this instance judges by it.
        self.renewed_at = time.monotonic()


class LeaseTable(ControlRows):
    """The lease table of one region. `client` is a DynamoDB client of its own, so that apply
    traffic cannot take the connections that renewals need."""

    def __init__(self, aws: Aws, table: str, client: Any = None) -> None:
        self.aws = aws
        self.table = table
        self.client = client

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        return await self.aws.call("dynamodb", operation, client=self.client, TableName=self.table, **kwargs)

    async def query(self, stream: str, consistent: bool = False) -> list[Lease]:
        """The leases of one stream (`partition_of` a lease key). Eventually consistent by default:
        every change is a conditional write, so a stale read only costs a refused take."""
        leases: list[Lease] = []
        kwargs: dict[str, Any] = {"KeyConditionExpression": "#s = :s", "ExpressionAttributeNames": {"#s": STREAM_KEY},
                                  "ExpressionAttributeValues": {":s": {"S": stream}}, "ConsistentRead": consistent}
        while True:
            page = await self._call("query", **kwargs)
            for item in page.get("Items", []):
                try:
                    leases.append(from_item(item))
                except (KeyError, TypeError, ValueError, AttributeError):
                    # Edited by hand or by another tool: one bad item must not stop every shard.
                    log.warning("lease table %s: ignoring a malformed item: %.200r", self.table, item)
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    async def get(self, key: str) -> Lease | None:
        item = (await self._call("get_item", Key=item_key(key), ConsistentRead=True)).get("Item")
        return from_item(item) if item else None

    async def create(
        self, key: str, parents: tuple[str, ...], checkpoint: str | None = None, state: str = ACTIVE
    ) -> bool:
        """Create a lease with no owner; False if it already exists."""
        item: dict[str, Any] = {
            **item_key(key),
            "counter": {"N": "0"},
            "state": {"S": state},
            "updated_at": {"N": str(time.time())},
        }
        if parents:
            item["parents"] = {"SS": list(parents)}
        if checkpoint is not None:
            item["checkpoint"] = {"S": checkpoint}
        try:
            await self._call("put_item", Item=item, ConditionExpression=f"attribute_not_exists({SHARD_KEY})")
        except ConditionFailed:
            return False
        return True

    async def _update(
        self, key: str, update: str, condition: str, values: dict[str, Any], landed: Callable[[Lease], bool]
    ) -> None:
        """A conditional update; LeaseLost if its condition failed. An update can take effect and
        still be answered with an error (a 5xx, retried by botocore, whose retry then fails the
        condition): `landed` tells from the item as it is now whether this update is what it shows."""
        if update.startswith("SET"):
            update += ", updated_at = :now"  # for people reading the table; decisions never use it
            values = {**values, ":now": {"N": str(time.time())}}
        names = {name: attr for name, attr in _NAMES.items() if name in update or name in condition}
        try:
            await self._call(
                "update_item", Key=item_key(key), UpdateExpression=update, ConditionExpression=condition,
                ExpressionAttributeNames=names, ExpressionAttributeValues=values,
            )
        except ConditionFailed:
            now = await self.get(key)
            if now is not None and landed(now):
                return
            raise LeaseLost(f"lease {key} changed hands") from None

    async def take(self, lease: Lease, me: str) -> Lease:
        """Take `lease` as it was observed (free, expired, or stolen); LeaseLost if it moved since."""
        taken = replace(lease, owner=me, counter=lease.counter + 1)
        await self._update(
            lease.key,
            "SET #owner = :me, #counter = :next",
            "#counter = :counter AND #state = :active",
            {
                ":me": {"S": me},
                ":counter": {"N": str(lease.counter)},
                ":next": {"N": str(lease.counter + 1)},
                ":active": {"S": ACTIVE},
            },
            lambda now: (now.owner, now.counter) == (me, taken.counter),
        )
        return taken

    async def _advance(self, held: HeldLease, extra: str = "", values: dict[str, Any] | None = None,
                       landed: Callable[[Lease], bool] = lambda _: True) -> None:
        """Bump the counter (and set `extra`) if the lease is still ours as we last saw it."""
        lease = held.lease
        sent_at = time.monotonic()
        await self._update(
            lease.key,
            "SET #counter = :next" + extra,
            "#owner = :me AND #counter = :counter",
            {
                ":me": {"S": lease.owner or ""},
                ":counter": {"N": str(lease.counter)},
                ":next": {"N": str(lease.counter + 1)},
                **(values or {}),
            },
            lambda now: (now.owner, now.counter) == (lease.owner, lease.counter + 1) and landed(now),
        )
        held.lease = replace(lease, counter=lease.counter + 1)
        held.renewed_at = sent_at

    async def renew(self, held: HeldLease) -> None:
        """Move the lease's counter (LeaseLost if it is no longer ours)."""
        async with held.lock:
            await self._advance(held)

    async def renew_together(self, helds: list[HeldLease]) -> bool:
        """Renew leases in one TransactWriteItems (at most TRANSACTION_ITEMS). False if it was
        refused (a lease is no longer ours, or another write held an item): nothing was renewed,
        and `renew` each says which."""
        async with contextlib.AsyncExitStack() as locks:
            for held in helds:
                await locks.enter_async_context(held.lock)
            sent_at = time.monotonic()
            try:
                await self.aws.call("dynamodb", "transact_write_items", client=self.client, TransactItems=[
                    {"Update": {"TableName": self.table, **_advance_update(held.lease)}} for held in helds])
            except ReplicatorError:
                return False
            for held in helds:
                held.lease = replace(held.lease, counter=held.lease.counter + 1)
                held.renewed_at = sent_at
            return True

    async def checkpoint(
        self, held: HeldLease, sequence_number: str | None, finished: bool = False, at: float | None = None
    ) -> None:
        """Record progress (`at`: when that record entered its stream); LeaseLost if another
        instance took the lease meanwhile."""
        extra, values = "", {}
        if sequence_number is not None:
            extra += ", checkpoint = :seq"
            values[":seq"] = {"S": sequence_number}
        if at is not None:
            extra += ", checkpoint_at = :at"
            values[":at"] = {"N": f"{at:.3f}"}
        if finished:
            extra += ", #state = :finished"
            values[":finished"] = {"S": FINISHED}
        async with held.lock:
            await self._advance(
                held, extra, values,
                lambda now: (sequence_number is None or now.checkpoint == sequence_number)
                and (not finished or now.state == FINISHED),
            )
            held.lease = replace(
                held.lease,
                checkpoint=sequence_number if sequence_number is not None else held.lease.checkpoint,
                checkpoint_at=at if at is not None else held.lease.checkpoint_at,
                state=FINISHED if finished else held.lease.state,
            )

    async def release(self, held: HeldLease) -> None:
        """Give the lease up so another instance can take it at once; a lost lease is fine."""
        lease = held.lease
        # Owner only, not the counter: a checkpoint cut short by cancellation may or may not
        # have moved it, and giving up a lease that is still ours is always safe.
        with contextlib.suppress(LeaseLost):
            await self._update(
                lease.key, "REMOVE #owner ADD #counter :one", "#owner = :me",
                {":me": {"S": lease.owner or ""}, ":one": {"N": "1"}}, lambda now: now.owner is None,
            )

    async def delete(self, lease: Lease) -> None:
        """Remove a finished lease whose shard left the stream; skipped if it moved since."""
        with contextlib.suppress(ConditionFailed):
            await self._call(
                "delete_item", Key=item_key(lease.key),
                ConditionExpression="#counter = :counter AND #state = :finished",
                ExpressionAttributeNames={"#counter": "counter", "#state": "state"},
                ExpressionAttributeValues={":counter": {"N": str(lease.counter)}, ":finished": {"S": FINISHED}},
            )


def _advance_update(lease: Lease) -> dict[str, Any]:
    """A renewal as a TransactWriteItems Update: the counter moves iff the lease is still ours as seen."""
    return {
        "Key": item_key(lease.key),
        "UpdateExpression": "SET #counter = :next, updated_at = :now",
        "ConditionExpression": "#owner = :me AND #counter = :counter",
        "ExpressionAttributeNames": {"#owner": "owner", "#counter": "counter"},
        "ExpressionAttributeValues": {
            ":me": {"S": lease.owner or ""}, ":counter": {"N": str(lease.counter)},
            ":next": {"N": str(lease.counter + 1)}, ":now": {"N": str(time.time())}},
    }
