"""Lease decisions: expiry as seen locally, lineage readiness, taking and stealing (table-driven)."""

from __future__ import annotations

import pytest

from replicatord.leases import ACTIVE, FINISHED, Lease, LeaseClock, plan_leases, ready_leases


def lease(
    key: str, owner: str | None = None, counter: int = 1, state: str = ACTIVE, parents: tuple[str, ...] = ()
) -> Lease:
    return Lease(key, owner, counter, None, parents, state)


def test_clock_expires_a_lease_whose_counter_stands_still() -> None:
    clock = LeaseClock()
    held = lease("a", "x", 5)
    clock.observe([held], now=100.0)
    assert not clock.expired(held, 109.9, failover_s=10)
    assert clock.expired(held, 110.0, failover_s=10)
    renewed = lease("a", "x", 6)
    clock.observe([renewed], now=109.0)
    assert not clock.expired(renewed, 118.9, failover_s=10)


def test_clock_restarts_on_a_new_owner_and_forgets_deleted_leases() -> None:
    clock = LeaseClock()
    clock.observe([lease("a", "x", 5), lease("b", "x")], now=0.0)
    taken = lease("a", "y", 5)  # same counter, new owner: a new observation
    clock.observe([taken], now=50.0)
    assert not clock.expired(taken, 55.0, failover_s=10)
    assert set(clock.seen) == {"a"}


def test_free_leases_are_expired_at_once() -> None:
    assert LeaseClock().expired(lease("a", None), 0.0, failover_s=10)


def test_a_fresh_clock_does_not_expire_owned_leases() -> None:
    clock = LeaseClock()
    owned = lease("a", "x")
    clock.observe([owned], now=1000.0)
    assert not clock.expired(owned, 1000.0, failover_s=10)


@pytest.mark.parametrize(
    ("leases", "ready"),
    [
        ([lease("p"), lease("c", parents=("p",))], {"p"}),
        ([lease("p", state=FINISHED), lease("c", parents=("p",))], {"c"}),
        ([lease("c", parents=("gone",))], {"c"}),  # parent trimmed and its lease deleted
        ([lease("p1", state=FINISHED), lease("p2"), lease("m", parents=("p1", "p2"))], {"p2"}),  # merge
        ([lease("p1", state=FINISHED), lease("p2", state=FINISHED), lease("m", parents=("p1", "p2"))], {"m"}),
        ([lease("done", state=FINISHED)], set()),
    ],
    ids=["child-waits", "parent-finished", "parent-gone", "merge-waits", "merge-ready", "finished-excluded"],
)
def test_ready_leases(leases: list[Lease], ready: set[str]) -> None:
    assert ready_leases(leases) == ready


def shards(owners: str) -> list[Lease]:
    """'AAB-' -> leases s0..s3 owned by A, A, B and nobody."""
    return [lease(f"s{i}", None if o == "-" else o) for i, o in enumerate(owners)]


@pytest.mark.parametrize(
    ("owners", "me", "expired", "running", "take", "steal"),
    [
        ("----", "A", "0123", "", ("s0", "s1", "s2", "s3"), None),  # first instance takes all
        ("AAAA", "B", "", "", (), "s3"),  # scale 1 -> 2: steal one at a time
        ("AAAB", "B", "", "s3", (), "s2"),
        ("AABB", "B", "", "s2 s3", (), None),  # balanced
        ("AAAA", "C", "", "", (), "s3"),  # scale to 3 (B not there yet)
        ("AABC", "C", "", "s3", (), None),  # 2/1/1 is balanced: never trade back and forth
        ("AABC", "B", "", "s2", (), None),
        ("AABB", "C", "23", "", ("s2", "s3"), None),  # B died: its expired leases go to C, up to target
        ("AAAABBBB", "C", "4567", "", ("s4", "s5", "s6", "s7"), None),  # B died: A and C, 4 each
        ("AAAAAB--", "C", "67", "", ("s6", "s7"), None),  # target ceil(8/3)=3: free ones first, no steal
        ("AA--", "B", "23", "", ("s2", "s3"), None),
        ("BBAA", "B", "", "", ("s0", "s1"), None),  # ours in the table, no worker: resume
        ("BA", "B", "", "s0", (), None),
    ],
)
def test_plan_leases(
    owners: str, me: str, expired: str, running: str, take: tuple[str, ...], steal: str | None
) -> None:
    leases = shards(owners)
    plan = plan_leases(
        leases, me, {f"s{i}" for i in expired}, {x.key for x in leases}, set(running.split()),
    )
    assert (plan.take, plan.steal) == (take, steal)


def test_plan_takes_nothing_that_is_not_ready() -> None:
    leases = [lease("p"), lease("c", parents=("p",))]
    plan = plan_leases(leases, "A", {"p", "c"}, ready_leases(leases), set())
    assert plan.take == ("p",)


def test_rebalancing_converges_to_one_or_two_each() -> None:
    """Three instances apply plan_leases in turns on a 4-shard stream that one of them held."""
    leases = {f"s{i}": lease(f"s{i}", "A") for i in range(4)}
    for _ in range(6):
        for me in "ABC":
            plan = plan_leases(list(leases.values()), me, set(), set(leases), set())
            for key in plan.take + ((plan.steal,) if plan.steal else ()):
                leases[key] = lease(key, me)
    counts = sorted(sum(1 for x in leases.values() if x.owner == me) for me in "ABC")
    assert counts == [1, 1, 2]
