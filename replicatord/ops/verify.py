"""`replicatord verify [--repair]`: compare a pair's tables in two regions by key and content.

Each other region is compared against a reference region with parallel segmented scans at a
bounded read rate, never holding a table in memory: every page of one side's scan is looked up
in the other side (a strongly consistent BatchGetItem), then the other side is scanned for what
the first lacks. Apparent differences are read again after `--recheck-s` (a change may still be
in flight) and reported only if they remain. `--repair` writes each difference's winner (the
higher version, or the live tombstone) to the other side through the applier's conditional
writes (ops/tables.py); items without version attributes are reported, never guessed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from replicatord.config import Pair, Topology
from replicatord.conflict import DELETE, Item, Version, version_of, without_marker
from replicatord.errors import InvalidRequest, ReplicatorError
from replicatord.ops.tables import (
    Progress,
    RateLimit,
    RegionOps,
    Regions,
    key_text,
    pick_pairs,
    put_record,
    same_item,
)
from replicatord.provenance import future_beyond_bound
from replicatord.records import ReplicationRecord, partition_key

SAMPLES = 10


@dataclass
class Comparison:
    """One pair, one region against the reference."""

    pair: str
    reference: str
    other: str
    scanned: dict[str, int] = field(default_factory=dict)
    only_in: dict[str, list[Item]] = field(default_factory=dict)  # region -> keys
    different: list[Item] = field(default_factory=list)
    unversioned: list[Item] = field(default_factory=list)  # differences we cannot decide
    # Items whose version is further ahead than conflict.max_future_s: reported, never spread (a
    # version from the future wins every conflict for ever; its clock or a forgery is the cause).
    future: list[Item] = field(default_factory=list)
    repaired: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.different and not any(self.only_in.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "pair": self.pair, "reference": self.reference, "region": self.other, "scanned": self.scanned,
            "identical": self.identical,
            "only_in": {r: len(keys) for r, keys in self.only_in.items()},
            "different": len(self.different), "unversioned": len(self.unversioned), "future": len(self.future),
            "samples": {
                **{f"only_in_{r}": [key_text(k) for k in keys[:SAMPLES]] for r, keys in self.only_in.items()},
                "different": [key_text(k) for k in self.different[:SAMPLES]],
                "unversioned": [key_text(k) for k in self.unversioned[:SAMPLES]],
                "future": [key_text(k) for k in self.future[:SAMPLES]],
            },
            "repaired": dict(self.repaired), "repair_failed": self.failed[:SAMPLES],
        }

    def describe(self) -> list[str]:
        scanned = ", ".join(f"{r} {n:,} items" for r, n in self.scanned.items())
        head = f"pair {self.pair}: {self.reference} vs {self.other} ({scanned}): "
        if self.identical and not self.repaired:
            return [head + "identical"]
        lines = [head + ("differences found" if not self.repaired else "repaired")]
        for region, keys in self.only_in.items():
            if keys:
                lines.append(f"  only in {region}: {len(keys):,}, e.g. " + ", ".join(key_text(k) for k in keys[:3]))
        if self.different:
            lines.append(f"  different: {len(self.different):,}, e.g. "
                         + ", ".join(key_text(k) for k in self.different[:3]))
        if self.unversioned:
            lines.append(f"  without version attributes (reported, not repaired): {len(self.unversioned):,}, e.g. "
                         + ", ".join(key_text(k) for k in self.unversioned[:3]))
        if self.future:
            lines.append(f"  versions more than conflict.max_future_s ahead (reported, not spread; fix or delete "
                         f"them): {len(self.future):,}, e.g. " + ", ".join(key_text(k) for k in self.future[:3]))
        for kind, n in sorted(self.repaired.items()):
            lines.append(f"  repair: {kind}: {n:,}")
        for failure in self.failed[:SAMPLES]:
            lines.append(f"  repair failed: {failure}")
        return lines


class Verifier:
    def __init__(self, topology: Topology, ops: dict[str, RegionOps], segments: int, rate: float | None,
                 recheck_s: float, progress: bool = True) -> None:
        self.topology = topology
        self.ops = ops
        self.segments = segments
        self.rates = {r: RateLimit(rate) for r in ops}
        self.recheck_s = recheck_s
        self.progress = progress

    async def compare(self, pair: Pair, reference: str, other: str) -> tuple[Comparison, dict[str, Item]]:
        """Scan both sides; return the comparison and the apparent differences (keys)."""
        result = Comparison(pair.name, reference, other, scanned={reference: 0, other: 0})
        candidates: dict[str, Item] = {}
        progress = Progress(f"verify {pair.name} {reference}/{other}") if self.progress else None

        async def side(scanned: str, lookup: str, compare_present: bool, segment: int) -> None:
            table, other_table = pair.tables[scanned], pair.tables[lookup]
            names = await self.ops[scanned].key_names(table)
            async for items, _ in self.ops[scanned].scan_pages(table, segment, self.segments, self.rates[scanned]):
                keys = [{n: item[n] for n in names} for item in items]
                found = await self.ops[lookup].get_many(other_table, keys, self.rates[lookup])
                result.scanned[scanned] += len(items)
                for item, keys_of_item in zip(items, keys, strict=True):
                    k = partition_key(keys_of_item)
                    there = found.get(k)
                    if there is None or (compare_present and not same_item(item, there)):
                        candidates[k] = keys_of_item
                if progress:
                    progress.add(len(items), f"{len(candidates)} apparent differences")

        await asyncio.gather(*(side(reference, other, True, s) for s in range(self.segments)))
        await asyncio.gather(*(side(other, reference, False, s) for s in range(self.segments)))
        if progress:
            progress.close()
        return result, candidates

    async def confirm(self, pair: Pair, result: Comparison, candidates: dict[str, Item]) -> dict[str, dict[str, Any]]:
        """Read the apparent differences again after a delay; keep those that remain."""
        if not candidates:
            return {}
        await asyncio.sleep(self.recheck_s)  # what was in flight has landed by now
        keys = list(candidates.values())
        sides = {r: await self.ops[r].get_many(pair.tables[r], keys, self.rates[r])
                 for r in (result.reference, result.other)}
        confirmed: dict[str, dict[str, Any]] = {}
        result.only_in = {result.reference: [], result.other: []}
        for k, key in candidates.items():
            a, b = sides[result.reference].get(k), sides[result.other].get(k)
            if same_item(a, b):
                continue
            confirmed[k] = {"keys": key, result.reference: a, result.other: b}
            if a is None or b is None:
                result.only_in[result.reference if b is None else result.other].append(key)
            else:
                result.different.append(key)
        return confirmed

    async def repair(self, pair: Pair, result: Comparison, confirmed: dict[str, dict[str, Any]]) -> None:
        """Write each difference's winner to the side that lacks it, by the normal version rules."""
        conflict = self.topology.conflict
        regions = (result.reference, result.other)
        keys = [d["keys"] for d in confirmed.values()]
        tombs = {r: await self.ops[r].tombstones_of(pair.name, keys) for r in regions}
        for difference in confirmed.values():
            key = difference["keys"]
            items = {r: difference[r] for r in regions}
            versions = {r: version_of(items[r], conflict) if items[r] is not None else None for r in regions}
            if any(items[r] is not None and versions[r] is None for r in regions):
                result.unversioned.append(key)
                continue
            now = time.time()
            if any(v is not None and future_beyond_bound(v.timestamp, conflict, now) for v in versions.values()):
                result.future.append(key)
                continue
            present = [r for r in regions if items[r] is not None]
            if len(present) == 2:
                a, b = regions
                va, vb = versions[a], versions[b]
                assert va is not None and vb is not None
                if va == vb:
                    result.failed.append(f"{key_text(key)}: equal versions {va.encode()} with different content")
                    continue
                winner, loser = (a, b) if vb < va else (b, a)
                winning = versions[winner]
                assert winning is not None
                await self._write(pair, result, loser, put_record(
                    pair.name, key, without_marker(items[winner], conflict), winning, winning.region), "copied newer")
                continue
            (holder,) = present
            lacking = regions[1] if holder == regions[0] else regions[0]
            version = versions[holder]
            assert version is not None
            tombstone = max((t for t in (tombs[lacking].get(pair.name, key), tombs[holder].get(pair.name, key))
                             if t is not None), default=None)
            if tombstone is not None and version < tombstone:
                # Deleted later than this item was written: the delete is the winner.
                await self._write(pair, result, holder, ReplicationRecord(
                    "DELETE", pair.name, key, None, Version(tombstone.timestamp, DELETE, tombstone.region),
                    tombstone.region, "ops", 0.0), "deleted (tombstone newer)")
            else:
                await self._write(pair, result, lacking, put_record(
                    pair.name, key, without_marker(items[holder], conflict), version, version.region), "copied missing")

    async def _write(self, pair: Pair, result: Comparison, region: str, record: ReplicationRecord, kind: str) -> None:
        applier = await self.ops[region].applier(pair)
        try:
            landed = await applier.apply(record)
        except (InvalidRequest, ReplicatorError) as exc:
            result.failed.append(f"{key_text(record.keys)} in {region}: {exc}")
            return
        result.repaired[f"{kind} in {region}" if landed else "already newer there (changed meanwhile)"] += 1


async def verify(
    topology: Topology, pair_name: str | None, reference: str | None, repair: bool, segments: int,
    rate: float | None, recheck_s: float, profiles: dict[str, str], progress: bool = True,
) -> list[Comparison]:
    pairs = pick_pairs(topology, pair_name)
    reference = reference or next(iter(topology.regions))
    others = [r for r in topology.regions if r != reference]
    results = []
    async with Regions(topology, [reference, *others], profiles) as ops:
        verifier = Verifier(topology, ops, segments, rate, recheck_s, progress)
        for pair in pairs:
            for other in others:
                result, candidates = await verifier.compare(pair, reference, other)
                confirmed = await verifier.confirm(pair, result, candidates)
                if repair and confirmed:
                    await verifier.repair(pair, result, confirmed)
                results.append(result)
    return results


def report(results: list[Comparison], as_json: bool, repaired: bool) -> tuple[str, int]:
    """The output and the exit status: 0 only if identical (or every difference repaired)."""
    ok = all(r.identical or (repaired and not r.failed and not r.unversioned and not r.future) for r in results)
    if as_json:
        return json.dumps({"identical": all(r.identical for r in results), "ok": ok,
                           "comparisons": [r.to_json() for r in results]}, indent=2), 0 if ok else 1
    lines = [line for r in results for line in r.describe()]
    return "\n".join(lines), 0 if ok else 1
