"""`replicatord pause|resume --pair P --direction A:B`: stop and restart forwarding of one
direction without losing its position.

The flag is an item of region A's lease table (partition `control/<pair>`, sort key
`pause/A:B`); every daemon of region A reads it each lease cycle and holds its forwarder's shard
workers (positions and leases kept) while it is there. In a mesh of more than two regions the
forwarder of A sends each change to every peer, so pausing A:B holds A's forwarding of the pair
to all of them. While paused, the stream keeps the changes for its retention (24 hours):
`replicatord status` shows how long is left.
"""

from __future__ import annotations

import getpass
import socket

from replicatord.aws import StartupError
from replicatord.config import Topology
from replicatord.ops.tables import Regions, pick_pairs


def parse_direction(topology: Topology, direction: str) -> tuple[str, str]:
    source, sep, target = direction.partition(":")
    if not sep or source not in topology.regions or target not in topology.regions or source == target:
        raise StartupError(f"--direction: expected SOURCE:TARGET, two regions of the topology, got {direction!r}")
    return source, target


async def set_paused(topology: Topology, pair_name: str, direction: str, paused: bool,
                     profiles: dict[str, str]) -> str:
    (pair,) = pick_pairs(topology, pair_name)
    source, target = parse_direction(topology, direction)
    async with Regions(topology, [source], profiles) as ops:
        leases = ops[source].leases()
        if paused:
            await leases.pause(pair.name, f"{source}:{target}", f"{getpass.getuser()}@{socket.gethostname()}")
            return (f"pair {pair.name}: forwarding {source} -> {target} paused; every daemon in {source} holds it "
                    "within a lease cycle, positions kept (the stream keeps changes for 24 h: see "
                    "'replicatord status')")
        await leases.resume(pair.name, f"{source}:{target}")
        return f"pair {pair.name}: forwarding {source} -> {target} resumed"
