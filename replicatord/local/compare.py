"""Compare the tables of a pair across regions in memory, item by item.

The tests' and the demo's oracle, kept independent of `replicatord verify` (which streams the
tables at a bounded rate, and is one of the things the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from replicatord.records import partition_key

Item = dict[str, Any]


@dataclass
class TableDiff:
    counts: dict[str, int]
    only_in: dict[str, list[Item]] = field(default_factory=dict)  # region -> keys found only there
    different: list[tuple[Item, dict[str, Item]]] = field(default_factory=list)  # key, region -> item

    @property
    def identical(self) -> bool:
        return not self.different and not any(self.only_in.values())

    def describe(self, limit: int = 10) -> list[str]:
        lines = [f"items per region: {self.counts}"]
        for region, keys in self.only_in.items():
            if keys:
                lines.append(f"{len(keys)} items only in {region}, e.g. {keys[:limit]}")
        for key, items in self.different[:limit]:
            lines.append(f"differs: {key}: {items}")
        if len(self.different) > limit:
            lines.append(f"... and {len(self.different) - limit} more items that differ")
        return lines


def key_of(item: Item, key_names: list[str]) -> Item:
    return {name: item[name] for name in key_names}


def scan_items(client: Any, table: str) -> tuple[list[str], dict[str, Item]]:
    """All items of a table by canonical key, with a strongly consistent scan."""
    desc = client.describe_table(TableName=table)["Table"]
    key_names = [k["AttributeName"] for k in desc["KeySchema"]]
    items: dict[str, Item] = {}
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = client.scan(**kwargs)
        for item in page.get("Items", []):
            items[partition_key(key_of(item, key_names))] = item
        if "LastEvaluatedKey" not in page:
            return key_names, items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def diff_items(tables: dict[str, tuple[list[str], dict[str, Item]]]) -> TableDiff:
    """Compare {region: (key names, items by canonical key)}."""
    regions = list(tables)
    key_names = tables[regions[0]][0]
    result = TableDiff({r: len(items) for r, (_, items) in tables.items()})
    all_keys = set().union(*(items for _, items in tables.values()))
    for region in regions:
        result.only_in[region] = []
    for k in sorted(all_keys):
        present = {r: items[k] for r, (_, items) in tables.items() if k in items}
        if len(present) < len(regions):
            if len(present) == 1:
                (region, item), = present.items()
                result.only_in[region].append(key_of(item, key_names))
            else:
                first = next(iter(present.values()))
                result.different.append((key_of(first, key_names), present))
            continue
        values = list(present.values())
        if any(v != values[0] for v in values[1:]):
            result.different.append((key_of(values[0], key_names), present))
    return result


def compare_tables(clients: dict[str, Any], tables: dict[str, str]) -> TableDiff:
    """Scan `tables[region]` with `clients[region]` (boto3 DynamoDB clients) and diff them."""
    return diff_items({region: scan_items(clients[region], tables[region]) for region in tables})
