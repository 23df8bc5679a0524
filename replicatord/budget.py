"""How many bytes of stream pages the daemon holds: read, and not yet handled.

Every page a shard consumer must read is taken (so every shard always moves on); a page read ahead
only while the daemon-wide budget (`tuning.read_ahead_budget_mib`) has room for the largest page
the stream can answer. So the pages held are at most one per shard consumer plus the budget, and
the applier decodes them `tuning.apply_chunk_bytes` at a time: the memory a worst-case input
can take is bounded by configuration (README, "Memory").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class Hold:
    """The bytes one page holds in the budget (0 once given back)."""

    bytes: int = 0


class ByteBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0

    def hold(self, nbytes: int) -> Hold:
        """Take `nbytes` whatever the budget says (a page that must be read)."""
        self.used += nbytes
        return Hold(nbytes)

    def try_hold(self, nbytes: int) -> Hold | None:
        """Take `nbytes` only if there is room (a page read ahead); None if not."""
        if self.used + nbytes > self.limit:
            return None
        return self.hold(nbytes)

    def resize(self, hold: Hold, nbytes: int) -> None:
        """What the page really holds, once read."""
        self.used += nbytes - hold.bytes
        hold.bytes = nbytes

    def release(self, hold: Hold) -> None:
        """Give the page's bytes back; a second release is a no-op."""
        self.used -= hold.bytes
        hold.bytes = 0
