"""Tombstones (docs/design.md §4): the highest delete version seen per deleted key, daemon-owned.

They stop an older PUT from resurrecting a deleted item. One item per (pair, key) in the
region's tombstone table; the version only ever grows. An expired tombstone (past
`expires_at`, the table's TTL attribute) counts as absent even before DynamoDB removes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from replicatord.aws import Aws, batch_get_item
from replicatord.config import Tuning
from replicatord.conflict import DELETE, Item, Version, parse_number
from replicatord.errors import ConditionFailed
from replicatord.records import item_to_json, partition_key

TOMB_KEY = "tomb_key"
EXPIRES_AT = "expires_at"
_NAMES = {"#ts": "ts", "#rg": "region", "#exp": EXPIRES_AT}
BATCH_GET_MAX = 100


def tomb_key(pair: str, keys: Item) -> str:
    return f"{pair}#{partition_key(keys)}"


@dataclass
class Tombstones:
    """Live tombstones of a page's keys, by tomb_key; kept current as the page records deletes."""

    versions: dict[str, Version]

    def get(self, pair: str, keys: Item) -> Version | None:
        return self.versions.get(tomb_key(pair, keys))

    def raise_to(self, pair: str, keys: Item, version: Version) -> None:
        key = tomb_key(pair, keys)
        if key not in self.versions or self.versions[key] < version:
            self.versions[key] = version


class TombstoneTable:
    def __init__(self, aws: Aws, table: str, ttl_s: float, tuning: Tuning | None = None) -> None:
        self.aws = aws
        self.table = table
        self.ttl_s = ttl_s
        self.tuning = tuning or Tuning()  # the backoff between BatchGetItem rounds

    def key(self, pair: str, keys: Item) -> dict[str, Any]:
        return {TOMB_KEY: {"S": tomb_key(pair, keys)}}

    async def record(self, pair: str, keys: Item, version: Version) -> bool:
        """Raise the key's tombstone to `version` unless it already holds as much; True if raised."""
        now = time.time()
        try:
            await self.aws.call(
                "dynamodb", "update_item", TableName=self.table, Key=self.key(pair, keys),
                UpdateExpression="SET #ts = :ts, #rg = :rg, #exp = :exp, item_key = :key",
                ConditionExpression=f"attribute_not_exists({TOMB_KEY}) OR #ts < :ts OR (#ts = :ts AND #rg < :rg)"
                " OR #exp < :now",
                ExpressionAttributeNames=_NAMES,
                ExpressionAttributeValues={
                    ":ts": {"N": str(version.timestamp)},
                    ":rg": {"S": version.region},
                    ":exp": {"N": f"{now + self.ttl_s:.0f}"},
                    ":now": {"N": f"{now:.3f}"},
                    ":key": {"S": json.dumps(item_to_json(keys, "keys"), sort_keys=True)},
                },
            )
        except ConditionFailed:
            return False
        return True

    async def fetch(self, pair: str, keys: Sequence[Item]) -> Tombstones:
        """The live tombstones among `keys` (BatchGetItem, strongly consistent)."""
        wanted = sorted({tomb_key(pair, k) for k in keys})
        versions: dict[str, Version] = {}
        now = time.time()
        for start in range(0, len(wanted), BATCH_GET_MAX):
            request: dict[str, Any] = {
                self.table: {"Keys": [{TOMB_KEY: {"S": k}} for k in wanted[start:start + BATCH_GET_MAX]],
                             "ConsistentRead": True}
            }
            for item in (await batch_get_item(self.aws, request, self.tuning)).get(self.table, []):
                version = _version(item, now)
                if version is not None:
                    versions[item[TOMB_KEY]["S"]] = version
        return Tombstones(versions)


def _version(item: dict[str, Any], now: float) -> Version | None:
    ts = parse_number(item.get("ts", {}).get("N"))
    expires = parse_number(item.get(EXPIRES_AT, {}).get("N"))
    region = item.get("region", {}).get("S")
    if ts is None or not isinstance(region, str) or (expires is not None and expires < Decimal(str(now))):
        return None
    return Version(ts, DELETE, region)
