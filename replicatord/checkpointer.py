"""A shard's checkpoint: the position delivered so far, written to its lease (KCL's checkpointer).

The consumer says what was delivered; the checkpointer writes it at most every
`checkpoint_interval_ms` while records come, and whenever the shard is caught up, paused, read to
its end or left: a crash replays at most that much, and applying again is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time

from replicatord.config import Tuning
from replicatord.errors import ReplicatorError
from replicatord.lease_table import HeldLease, LeaseTable

log = logging.getLogger(__name__)

# How long a checkpoint or a lease release may take on the way out.
RELEASE_TIMEOUT_S = 2.0


class Checkpointer:
    def __init__(self, leases: LeaseTable, held: HeldLease, tuning: Tuning, name: str) -> None:
        """`name` says which shard, for log lines ("applier user: shard X")."""
        self.leases = leases
        self.held = held
        self.tuning = tuning
        self.name = name
        self.position: tuple[str, float] | None = None  # delivered, not yet written
        self._written_at = time.monotonic()

    def delivered(self, sequence: str, at: float) -> None:
        """Everything up to `sequence` (a record that entered its stream at `at`) is handled."""
        self.position = (sequence, at)

    async def due(self) -> None:
        """Write the position if `checkpoint_interval_ms` has passed since the last write."""
        if time.monotonic() - self._written_at >= self.tuning.checkpoint_interval_ms / 1000:
            await self.flush()

    async def flush(self, finished: bool = False) -> None:
        """Write the position delivered so far (and with `finished`, that the shard was read to
        its end); a position not written stays to do."""
        position, self.position = self.position, None
        if position is None and not finished:
            return
        sequence, at = position if position is not None else (None, None)
        try:
            await self.leases.checkpoint(self.held, sequence, finished=finished, at=at)
        except BaseException:
            self.position = self.position or position
            raise
        self._written_at = time.monotonic()

    async def keep(self) -> None:
        """On the way out, write what was delivered (best effort, bounded: a record delivered but
        not checkpointed is delivered again by the next owner)."""
        try:
            await asyncio.wait_for(self.flush(), RELEASE_TIMEOUT_S)
        except (ReplicatorError, TimeoutError) as exc:
            log.warning("%s: cannot checkpoint on the way out (the next reader replays from the last "
                        "checkpoint): %s", self.name, exc or "timed out")

    async def release(self) -> None:
        """Give the lease up, so another instance takes it at once (bounded; else it expires)."""
        try:
            await asyncio.wait_for(self.leases.release(self.held), RELEASE_TIMEOUT_S)
        except (ReplicatorError, TimeoutError) as exc:
            log.warning("%s: cannot release the lease (it will expire): %s", self.name, exc or "timed out")

    async def finish(self) -> None:
        """The shard left the stream before it was read to its end: its lease is finished, so its
        children start."""
        await self.leases.checkpoint(self.held, None, finished=True)
