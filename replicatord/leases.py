"""Shard leases (docs/design.md §5), KCL-style: what a lease is, and the decisions over leases.

One lease per stream shard: owner, counter, checkpoint, parent shard ids, state. A lease is
expired when it has no owner, or when its counter has not moved for `failover_s` as seen from
here (clocks of other hosts are never compared). The decisions (which leases to take, which one
to steal) are pure functions over plain data: `LeaseClock`, `ready_leases`, `plan_leases`. The
table that holds leases, and every other item of it, is lease_table.py.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

ACTIVE = "active"
FINISHED = "finished"

# A checkpoint that is not a sequence number: `LATEST@<epoch s>` (a pipeline that starts at
# `latest`) reads the shard from its oldest record and skips what was written before that second,
# until the first real checkpoint replaces it. A LATEST iterator would instead miss what is
# written between the lease's creation and the shard's first read.
LATEST = "LATEST@"
def latest_since(checkpoint: str | None) -> float | None:
    """The second a `latest` start counts from, if the checkpoint is such a marker."""
    if checkpoint is None or not checkpoint.startswith(LATEST):
        return None
    try:
        return float(checkpoint[len(LATEST):])
    except ValueError:
        return None
@dataclass(frozen=True)
class Lease:
    key: str
    owner: str | None
    counter: int
    checkpoint: str | None
    parents: tuple[str, ...]  # lease keys of the parent shards
    state: str
    checkpoint_at: float | None = None  # when the checkpoint's record entered its stream


def lease_key(role: str, incarnation: str, shard_id: str) -> str:
    """`role/incarnation/shard`: the role (forwarder or applier), the incarnation of the stream it
    reads (`name@created`) and the shard. The first two are the lease partition."""
    return f"{role}/{incarnation}/{shard_id}"


def shard_of(key: str) -> str:
    return key.rsplit("/", 1)[1]


def partition_of(key: str) -> str:
    """The lease table partition of a lease key: role and stream incarnation."""
    return key.rsplit("/", 1)[0]


# --- decisions --------------------------------------------------------------------------------


@dataclass
class LeaseClock:
    """When each lease's (owner, counter) was first seen as it is now, on the local monotonic clock."""

    seen: dict[str, tuple[str | None, int, float]] = field(default_factory=dict)

    def observe(self, leases: Sequence[Lease], now: float) -> None:
        current = {}
        for lease in leases:
            before = self.seen.get(lease.key)
            if before is not None and before[:2] == (lease.owner, lease.counter):
                current[lease.key] = before
            else:
                current[lease.key] = (lease.owner, lease.counter, now)
        self.seen = current

    def expired(self, lease: Lease, now: float, failover_s: float) -> bool:
        if lease.owner is None:
            return True
        seen = self.seen.get(lease.key)
        return seen is not None and now - seen[2] >= failover_s


def ready_leases(leases: Sequence[Lease]) -> set[str]:
    """Active leases whose parents were read to their end (or are gone from the table)."""
    state = {lease.key: lease.state for lease in leases}
    return {
        lease.key
        for lease in leases
        if lease.state == ACTIVE and all(state.get(parent, FINISHED) == FINISHED for parent in lease.parents)
    }


@dataclass(frozen=True)
class Plan:
    take: tuple[str, ...]  # free or expired leases (or ours, not being worked on) to take now
    steal: str | None  # at most one lease to take from the most loaded instance


def plan_leases(
    leases: Sequence[Lease], me: str, expired: set[str], ready: set[str], running: set[str]
) -> Plan:
    """Which leases this instance takes now (KCL's balancing, per stream).

    The target is an even share: ceil(ready leases / live instances). Below it, take expired
    leases first; with none to take, steal one from the most loaded instance if it holds at
    least two more than we do (so two instances never trade a lease back and forth).
    """
    candidates = sorted((lease for lease in leases if lease.key in ready), key=lambda lease: lease.key)
    mine = [lease for lease in candidates if lease.owner == me]
    resume = [lease.key for lease in mine if lease.key not in running]
    load = Counter(
        lease.owner for lease in candidates if lease.owner and lease.owner != me and lease.key not in expired
    )
    instances = len(load) + 1
    target = math.ceil(len(candidates) / instances) if candidates else 0
    need = target - len(mine)
    free = [lease.key for lease in candidates if lease.key in expired and lease.owner != me]
    take = resume + free[: max(0, need)]
    steal = None
    if need > 0 and not free and load:
        victim, most = max(sorted(load.items()), key=lambda item: item[1])
        if most >= len(mine) + 2:
            steal = next(lease.key for lease in reversed(candidates) if lease.owner == victim)
    return Plan(tuple(take), steal)
