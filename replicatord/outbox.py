"""Store and forward: where a forwarder puts one peer's records, and the shipper that empties an outbox.

Each region has, per pair and peer, an outbox: a Kinesis stream in the region itself, reachable
whatever the border does, kept `outbox.retention_hours` (docs/outbox.md). A forwarder puts each
peer's records straight on the peer's stream while the peer answers (`DIRECT`). When puts to it
have failed for `tuning.outbox_after_s`, or the peer probe finds it unreachable, or the direction
is paused, that peer's records go to its outbox instead (`DIVERTED`): the page completes for that
peer and no other peer waits. A shipper pipeline reads the outbox with the same leases,
checkpoints and pacing as every pipeline and puts its records on the peer's stream once it
answers; the forwarder then puts new records direct again while the shipper empties the outbox
(`DRAINING`), and the peer is `DIRECT` once the outbox holds nothing unshipped.

Records of one item may arrive at the peer out of order (a newer one direct, an older one from the
outbox): every apply is conditional on the version (docs/design.md), so the winner is the same.

`next_mode` is the whole per-peer state machine, a pure function with table tests
(tests/unit/test_outbox.py); `Route` keeps one peer's state in a daemon.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    DIRECT = "direct"  # records go to the peer's stream
    DIVERTED = "diverted"  # records go to the outbox; the shipper ships when the peer answers
    DRAINING = "draining"  # records go to the peer's stream; the shipper still empties the outbox


MODE_VALUE = {Mode.DIRECT: 0, Mode.DIVERTED: 1, Mode.DRAINING: 2}  # replicatord_peer_mode


class Happened(enum.Enum):
    PUT_OK = "a put to the peer's stream was accepted"
    PUT_FAILED = "a put to the peer's stream failed for the peer's trouble"
    REACHABLE = "the peer probe reached the peer's stream"
    UNREACHABLE = "the peer probe did not reach the peer's stream"
    DRAINED = "the outbox holds nothing unshipped"
    PAUSED = "the direction was paused"
    RESUMED = "the direction was resumed"


@dataclass(frozen=True)
class PeerState:
    mode: Mode = Mode.DIRECT
    failing_since: float | None = None  # when puts to the peer started failing (DIRECT)
    paused: bool = False


def next_mode(state: PeerState, happened: Happened, now: float, after_s: float) -> PeerState:
    """Where one peer's records go after `happened` at `now` (`after_s`: tuning.outbox_after_s)."""
    if happened is Happened.PAUSED:
        return PeerState(Mode.DIVERTED, None, True)
    if happened is Happened.RESUMED:
        return replace(state, paused=False)
    if state.mode is Mode.DIRECT:
        return _direct(state, happened, now, after_s)
    if state.mode is Mode.DIVERTED:
        # The peer answers again: new records go direct, the shipper empties the outbox. Paused,
        # everything waits in the outbox until resumed.
        if happened in (Happened.REACHABLE, Happened.PUT_OK) and not state.paused:
            return PeerState(Mode.DRAINING)
        return state
    # DRAINING: the peer was just down, so a failure diverts at once, without the grace period.
    if happened in (Happened.PUT_FAILED, Happened.UNREACHABLE):
        return PeerState(Mode.DIVERTED)
    if happened is Happened.DRAINED:
        return PeerState(Mode.DIRECT)
    return state


def _direct(state: PeerState, happened: Happened, now: float, after_s: float) -> PeerState:
    if happened is Happened.PUT_OK or happened is Happened.REACHABLE:
        return PeerState(Mode.DIRECT) if state.failing_since is not None else state
    if happened is Happened.UNREACHABLE:
        return PeerState(Mode.DIVERTED)
    if happened is Happened.PUT_FAILED:
        since = state.failing_since if state.failing_since is not None else now
        if now - since >= after_s:
            return PeerState(Mode.DIVERTED)
        return PeerState(Mode.DIRECT, since)
    return state  # DRAINED: nothing to drain


class Route:
    """One peer's mode in this daemon, for every forwarder of the pair, and who is told."""

    def __init__(self, pair: str, peer: str, after_s: float, watch: Callable[[Mode], None] | None = None) -> None:
        """`watch` is told every mode the route takes (the daemon's replicatord_peer_mode)."""
        self.pair = pair
        self.peer = peer
        self.after_s = after_s
        self.state = PeerState()
        self.changed_at = time.time()
        self.watch = watch
        if watch is not None:
            watch(self.state.mode)

    @property
    def mode(self) -> Mode:
        return self.state.mode

    def diverted(self) -> bool:
        return self.state.mode is Mode.DIVERTED

    def note(self, happened: Happened, now: float | None = None) -> Mode:
        """Feed what happened to the machine; log a change of mode. Returns the mode now."""
        now = time.time() if now is None else now
        before = self.state.mode
        self.state = next_mode(self.state, happened, now, self.after_s)
        if self.state.mode is not before:
            log.warning("pair %s -> %s: %s -> %s (%s)", self.pair, self.peer, before.value, self.state.mode.value,
                        happened.value)
            self.changed_at = now
            if self.watch is not None:
                self.watch(self.state.mode)
        return self.state.mode
