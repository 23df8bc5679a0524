"""The one backoff of the package: capped exponential, jittered, timings from `tuning`.

Every wait between two tries of the same thing goes through `backoff_s` (records, pages, shard
reads, batch reads' unprocessed keys), and every wait that a shutdown must cut short through
`sleep_or_stop`.
"""

from __future__ import annotations

import asyncio
import random

from replicatord.config import Tuning


def backoff_s(attempt: int, tuning: Tuning) -> float:
    """The wait before try `attempt` + 1: capped exponential (`backoff_base_ms` doubling up to
    `backoff_max_ms`) with equal jitter, a uniform draw from the upper half of the cap, so that
    clients that failed together do not come back together and none comes back at once."""
    cap = min(tuning.backoff_max_ms, tuning.backoff_base_ms * 2 ** min(attempt, 20)) / 1000
    return random.uniform(cap / 2, cap)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stop` is set; True if stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
