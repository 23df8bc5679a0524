"""Shard leases and checkpoints in the region's lease table (DESIGN.md §5).

One item per stream shard: owner, counter, checkpoint, parent shard ids, state. Every change
is a conditional write on the counter (fencing): an instance whose lease was taken cannot
checkpoint over the new owner; it gets LeaseLost and stops that shard.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any

from replicatord.aws import Aws
from replicatord.errors import ConditionFailed, LeaseLost

ACTIVE = "active"
FINISHED = "finished"

LEASE_KEY = "lease_key"


@dataclass(frozen=True)
class Lease:
    key: str
    owner: str | None
    counter: int
    checkpoint: str | None
    parents: tuple[str, ...]
    state: str


def lease_key(pipeline: str, stream: str, shard_id: str) -> str:
    return f"{pipeline}/{stream}/{shard_id}"


def _from_item(item: dict[str, Any]) -> Lease:
    return Lease(
        key=item[LEASE_KEY]["S"],
        owner=item.get("owner", {}).get("S"),
        counter=int(item.get("counter", {}).get("N", "0")),
        checkpoint=item.get("checkpoint", {}).get("S"),
        parents=tuple(item.get("parents", {}).get("SS", ())),
        state=item.get("state", {}).get("S", ACTIVE),
    )


class LeaseTable:
    def __init__(self, aws: Aws, table: str) -> None:
        self.aws = aws
        self.table = table

    async def get(self, key: str) -> Lease | None:
        result = await self.aws.call(
            "dynamodb", "get_item", TableName=self.table, Key={LEASE_KEY: {"S": key}}, ConsistentRead=True
        )
        item = result.get("Item")
        return _from_item(item) if item else None

    async def scan(self, prefix: str = "") -> list[Lease]:
        leases: list[Lease] = []
        kwargs: dict[str, Any] = {"TableName": self.table, "ConsistentRead": True}
        while True:
            page = await self.aws.call("dynamodb", "scan", **kwargs)
            leases.extend(_from_item(i) for i in page.get("Items", []) if i[LEASE_KEY]["S"].startswith(prefix))
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    async def take(self, key: str, owner: str, parents: tuple[str, ...] = ()) -> tuple[Lease, str | None]:
        """Create the lease, or take it over from whoever holds it (conditional on its counter).

        Returns the lease and the owner it was taken from (None if it was free or new).
        """
        current = await self.get(key)
        values: dict[str, Any] = {":owner": {"S": owner}, ":now": {"N": str(time.time())}}
        if current is None:
            condition = f"attribute_not_exists({LEASE_KEY})"
            update = "SET #owner = :owner, #counter = :one, #state = :active, updated_at = :now"
            values[":one"] = {"N": "1"}
            values[":active"] = {"S": ACTIVE}
            if parents:
                update += ", parents = :parents"
                values[":parents"] = {"SS": list(parents)}
            counter = 1
        else:
            condition = "#counter = :counter"
            update = "SET #owner = :owner, #counter = :next, updated_at = :now"
            values[":counter"] = {"N": str(current.counter)}
            values[":next"] = {"N": str(current.counter + 1)}
            counter = current.counter + 1
        names = {"#owner": "owner", "#counter": "counter"}
        if current is None:
            names["#state"] = "state"
        try:
            await self.aws.call(
                "dynamodb",
                "update_item",
                TableName=self.table,
                Key={LEASE_KEY: {"S": key}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ConditionFailed:
            raise LeaseLost(f"lease {key} changed while taking it") from None
        if current is None:
            return Lease(key, owner, counter, None, parents, ACTIVE), None
        previous = current.owner if current.owner != owner else None
        return replace(current, owner=owner, counter=counter), previous

    async def checkpoint(self, lease: Lease, sequence_number: str | None, finished: bool = False) -> Lease:
        """Record progress; raise LeaseLost if another instance took the lease meanwhile."""
        update = "SET #counter = :next, updated_at = :now"
        values: dict[str, Any] = {
            ":owner": {"S": lease.owner or ""},
            ":counter": {"N": str(lease.counter)},
            ":next": {"N": str(lease.counter + 1)},
            ":now": {"N": str(time.time())},
        }
        names = {"#owner": "owner", "#counter": "counter"}
        if sequence_number is not None:
            update += ", checkpoint = :seq"
            values[":seq"] = {"S": sequence_number}
        if finished:
            update += ", #state = :finished"
            names["#state"] = "state"
            values[":finished"] = {"S": FINISHED}
        try:
            await self.aws.call(
                "dynamodb",
                "update_item",
                TableName=self.table,
                Key={LEASE_KEY: {"S": lease.key}},
                UpdateExpression=update,
                ConditionExpression="#owner = :owner AND #counter = :counter",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ConditionFailed:
            raise LeaseLost(f"lease {lease.key} is no longer ours") from None
        return replace(
            lease,
            counter=lease.counter + 1,
            checkpoint=sequence_number if sequence_number is not None else lease.checkpoint,
            state=FINISHED if finished else lease.state,
        )

    async def release(self, lease: Lease) -> None:
        """Give the lease up so another instance can take it at once; a lost lease is fine."""
        with contextlib.suppress(ConditionFailed):
            await self.aws.call(
                "dynamodb",
                "update_item",
                TableName=self.table,
                Key={LEASE_KEY: {"S": lease.key}},
                # Owner only, not the counter: a checkpoint cut short by cancellation may or may
                # not have moved it, and giving up a lease that is still ours is always safe.
                UpdateExpression="REMOVE #owner ADD #counter :one",
                ConditionExpression="#owner = :owner",
                ExpressionAttributeNames={"#owner": "owner", "#counter": "counter"},
                ExpressionAttributeValues={":owner": {"S": lease.owner or ""}, ":one": {"N": "1"}},
            )
