"""The per-peer mode machine of store and forward (outbox.next_mode): every transition."""

from __future__ import annotations

import pytest

from replicatord.outbox import Happened, Mode, PeerState, Route, next_mode

AFTER = 30.0
D, V, R = Mode.DIRECT, Mode.DIVERTED, Mode.DRAINING
H = Happened

CASES = [
    # (state before, what happened, now, state after)
    (PeerState(D), H.PUT_OK, 100, PeerState(D)),
    (PeerState(D), H.REACHABLE, 100, PeerState(D)),
    (PeerState(D, 90), H.PUT_OK, 100, PeerState(D)),  # an answer ends the failing spell
    (PeerState(D, 90), H.REACHABLE, 100, PeerState(D)),
    (PeerState(D), H.PUT_FAILED, 100, PeerState(D, 100)),  # the spell starts
    (PeerState(D, 100), H.PUT_FAILED, 129.9, PeerState(D, 100)),  # within outbox_after_s: keep trying
    (PeerState(D, 100), H.PUT_FAILED, 130, PeerState(V)),  # failing for outbox_after_s: divert
    (PeerState(D), H.UNREACHABLE, 100, PeerState(V)),  # known unreachable: divert at once
    (PeerState(D, 95), H.UNREACHABLE, 100, PeerState(V)),
    (PeerState(D), H.DRAINED, 100, PeerState(D)),
    (PeerState(D), H.PAUSED, 100, PeerState(V, None, True)),
    (PeerState(D), H.RESUMED, 100, PeerState(D)),
    (PeerState(V), H.PUT_FAILED, 100, PeerState(V)),
    (PeerState(V), H.UNREACHABLE, 100, PeerState(V)),
    (PeerState(V), H.DRAINED, 100, PeerState(V)),  # records keep coming to the outbox
    (PeerState(V), H.REACHABLE, 100, PeerState(R)),  # the peer answers: new records go direct
    (PeerState(V), H.PUT_OK, 100, PeerState(R)),  # the shipper's put was accepted
    (PeerState(V, None, True), H.REACHABLE, 100, PeerState(V, None, True)),  # paused: everything waits
    (PeerState(V, None, True), H.PUT_OK, 100, PeerState(V, None, True)),
    (PeerState(V, None, True), H.RESUMED, 100, PeerState(V)),  # resumed: ships once the peer answers
    (PeerState(V), H.PAUSED, 100, PeerState(V, None, True)),
    (PeerState(R), H.PUT_OK, 100, PeerState(R)),
    (PeerState(R), H.REACHABLE, 100, PeerState(R)),
    (PeerState(R), H.PUT_FAILED, 100, PeerState(V)),  # just back and failing again: no grace period
    (PeerState(R), H.UNREACHABLE, 100, PeerState(V)),
    (PeerState(R), H.DRAINED, 100, PeerState(D)),
    (PeerState(R), H.PAUSED, 100, PeerState(V, None, True)),
    (PeerState(R), H.RESUMED, 100, PeerState(R)),
]


@pytest.mark.parametrize(("before", "happened", "now", "after"), CASES,
                         ids=[f"{b.mode.value}{'-failing' if b.failing_since else ''}"
                              f"{'-paused' if b.paused else ''}-{h.name}-{n}" for b, h, n, _ in CASES])
def test_next_mode(before: PeerState, happened: Happened, now: float, after: PeerState) -> None:
    assert next_mode(before, happened, now, AFTER) == after


def test_every_mode_and_happening_is_in_the_table() -> None:
    seen = {(before.mode, happened) for before, happened, _, _ in CASES}
    assert seen == {(mode, happened) for mode in Mode for happened in Happened}


def test_a_route_goes_round_the_whole_cycle() -> None:
    route = Route("user", "ap-southeast-1", AFTER)
    assert route.note(H.PUT_FAILED, 0) is D
    assert route.note(H.PUT_FAILED, 31) is V
    assert route.diverted()
    assert route.note(H.REACHABLE, 40) is R
    assert route.note(H.DRAINED, 41) is D
    assert route.changed_at == 41
