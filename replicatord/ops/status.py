"""`replicatord status`: per pair and direction, where replication stands and how long is left.

For each direction A -> B of each pair: the sample's counters (loaded in A, replicated in B), the
age of the oldest record not yet handled by A's forwarder and by B's applier (read at the
stream: the first record after each shard's checkpoint), the time to data loss (how long until
that record leaves its stream's retention), whether forwarding is paused, whether B's Kinesis can
be reached with the key pair and proxy A's daemons use, and B's outbox in A (outbox.py): the
oldest record not yet shipped, which counts in the time to data loss against the outbox's
retention, and the peer's mode as it shows from outside (direct: the outbox is empty; diverted:
it holds records and B does not answer; draining: it holds records and B answers); per region
the dead-letter queue's depth and the leases per instance. The daemons export the same figures as
metrics (`replicatord_oldest_unprocessed_age_seconds`, `replicatord_time_to_data_loss_seconds`,
`replicatord_paused`, `replicatord_dead_letters`, `replicatord_peer_reachable`,
`replicatord_peer_mode`, `replicatord_outbox_oldest_age_seconds`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from typing import Any

from replicatord.aws import StartupError
from replicatord.config import Pair, Topology
from replicatord.errors import ReplicatorError
from replicatord.leases import Lease
from replicatord.ops.tables import RegionOps, Regions, pick_pairs
from replicatord.shipper import OutboxCount
from replicatord.sources import DynamoStreamSource, KinesisSource, oldest_unprocessed, shipper_role


def format_leases(region: str, leases: list[Lease]) -> list[str]:
    """One block per owner ("(none)" for free leases), a line per lease."""
    by_owner: dict[str, list[Lease]] = defaultdict(list)
    for lease in leases:
        by_owner[lease.owner or "(none)"].append(lease)
    lines = [f"{region}: {len(leases)} leases, {len([o for o in by_owner if o != '(none)'])} instances"]
    for owner in sorted(by_owner):
        held = sorted(by_owner[owner], key=lambda lease: lease.key)
        lines.append(f"  {owner}: {len(held)} leases")
        for lease in held:
            checkpoint = lease.checkpoint or "-"
            lines.append(f"    {lease.key}  {lease.state}  counter {lease.counter}  checkpoint {checkpoint}")
    return lines


async def _counter(ops: RegionOps, table: str, pk: str) -> int | None:
    try:
        item = (await ops.aws.call("dynamodb", "get_item", TableName=table, Key={"PK": {"S": pk}},
                                   ConsistentRead=True)).get("Item")
    except ReplicatorError:
        return None
    return int(item["cnt"]["N"]) if item else 0


async def _direction(topology: Topology, ops: dict[str, RegionOps], pair: Pair, source: str, target: str,
                     leases: dict[str, list[Lease]], pauses: dict[str, dict[str, float]], now: float) -> dict[str, Any]:
    a, b = ops[source], ops[target]
    table = pair.tables[source]
    desc = (await a.aws.call("dynamodb", "describe_table", TableName=table))["Table"]
    arn = str(desc.get("LatestStreamArn", ""))
    forwarding = DynamoStreamSource(a.aws, table, arn)
    summary = (await b.aws.call("kinesis", "describe_stream_summary", StreamName=pair.streams[target]))
    created = summary["StreamDescriptionSummary"]["StreamCreationTimestamp"]
    applying = KinesisSource(b.aws, pair.streams[target], f"{created.timestamp():.0f}",
                             float(summary["StreamDescriptionSummary"].get("RetentionPeriodHours") or 24) * 3600)
    fwd_leases = [lease for lease in leases[source] if lease.key.startswith(f"forwarder/{forwarding.incarnation}/")]
    app_leases = [lease for lease in leases[target] if lease.key.startswith(f"applier/{applying.incarnation}/")]
    fwd_age = await oldest_unprocessed(forwarding, fwd_leases, now)
    app_age = await oldest_unprocessed(applying, app_leases, now)
    losses = [retention - age for retention, age in ((forwarding.retention_s, fwd_age), (applying.retention_s, app_age))
              if age is not None]
    outbox = await _outbox(a, pair, target, leases[source], now)
    if outbox is not None and outbox["oldest_unshipped_s"] is not None:
        losses.append(outbox["retention_s"] - outbox["oldest_unshipped_s"])
    direction = f"{source}:{target}"
    reachable: bool | str = True
    try:
        if target not in a.aws.peers:
            await a.aws.open_peer(target)
        await a.aws.call("kinesis", "describe_stream_summary", client=a.aws.peers[target],
                         StreamName=pair.streams[target])
    except (ReplicatorError, StartupError) as exc:
        reachable = str(exc)
    return {
        "direction": f"{source} -> {target}",
        "loaded": await _counter(a, a.config.loader_stats_table, "loaded_count"),
        "replicated": await _counter(b, b.config.stats_table, "replicated_count"),
        "forwarder_oldest_unprocessed_s": fwd_age,
        "applier_oldest_unprocessed_s": app_age,
        "time_to_data_loss_s": min(losses, default=None),
        "paused_since": pauses[source].get(direction),
        "peer_reachable": reachable,
        "outbox": outbox,
        "mode": _mode(outbox, reachable is True and direction not in pauses[source]),
    }


async def _outbox(a: RegionOps, pair: Pair, target: str, leases: list[Lease], now: float) -> dict[str, Any] | None:
    """`target`'s outbox in a's region: its oldest record not yet shipped, and its retention."""
    if a.config.outbox is None:
        return None
    name = pair.outbox_stream(a.region, target)
    summary = (await a.aws.call("kinesis", "describe_stream_summary", StreamName=name))["StreamDescriptionSummary"]
    source = KinesisSource(a.aws, name, f"{summary['StreamCreationTimestamp'].timestamp():.0f}",
                           float(summary.get("RetentionPeriodHours") or 24) * 3600, shipper_role(target))
    mine = [lease for lease in leases if lease.key.startswith(f"{source.role}/{source.incarnation}/")]
    oldest = await oldest_unprocessed(source, mine, now)
    try:
        depth: int | None = await OutboxCount(a.aws, a.config.stats_table).depth(pair.name, target) if oldest else 0
    except ReplicatorError:
        depth = None
    return {"stream": name, "retention_s": source.retention_s, "oldest_unshipped_s": oldest, "depth": depth}


def _mode(outbox: dict[str, Any] | None, reachable: bool) -> str:
    """What the daemons' peer mode (outbox.Mode) is, seen from outside: an outbox that holds
    records is being filled (the peer does not answer, or the direction is paused) or emptied."""
    if outbox is None or outbox["oldest_unshipped_s"] is None:
        return "direct"
    return "draining" if reachable else "diverted"


async def collect(topology: Topology, pair_name: str | None, regions: list[str] | None,
                  profiles: dict[str, str]) -> dict[str, Any]:
    pairs = pick_pairs(topology, pair_name)
    now = time.time()
    async with Regions(topology, list(topology.regions), profiles) as ops:
        leases = {r: await ops[r].leases().all_leases() for r in topology.regions}
        out: dict[str, Any] = {"time": now, "regions": {}, "pairs": {}}
        for region in regions or list(topology.regions):
            attributes = await ops[region].aws.call(
                "sqs", "get_queue_attributes", QueueUrl=(await ops[region].dlq()).queue_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
            depth = sum(int(v) for v in attributes.get("Attributes", {}).values())
            out["regions"][region] = {"dead_letters": depth, "leases": [
                {"key": lease.key, "owner": lease.owner, "state": lease.state, "counter": lease.counter,
                 "checkpoint": lease.checkpoint} for lease in leases[region]]}
        for pair in pairs:
            pauses = {r: await ops[r].leases().paused(pair.name) for r in topology.regions}
            out["pairs"][pair.name] = [
                await _direction(topology, ops, pair, source, target, leases, pauses, now)
                for source in topology.regions for target in topology.regions
                if source != target and (not regions or source in regions or target in regions)]
        return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "none waiting"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _outbox_line(outbox: dict[str, Any] | None) -> str:
    if outbox is None:
        return "; no outbox"
    held = outbox["oldest_unshipped_s"]
    return f"; outbox {outbox['stream']}: " + ("empty" if held is None else
                                               f"{outbox['depth']} records, oldest unshipped {_duration(held)}")


def render(status: dict[str, Any]) -> str:
    lines = []
    for pair, directions in status["pairs"].items():
        lines.append(f"pair {pair}:")
        for d in directions:
            paused = (f"PAUSED for {_duration(status['time'] - d['paused_since'])}" if d["paused_since"]
                      else "forwarding")
            reach = "reachable" if d["peer_reachable"] is True else f"UNREACHABLE ({d['peer_reachable']})"
            loss = d["time_to_data_loss_s"]
            lines.append(f"  {d['direction']}: {paused}; loaded {d['loaded']}, replicated {d['replicated']}; "
                         f"oldest unprocessed: forwarder {_duration(d['forwarder_oldest_unprocessed_s'])}, "
                         f"applier {_duration(d['applier_oldest_unprocessed_s'])}; time to data loss "
                         f"{'-' if loss is None else _duration(loss)}; peer {reach}, {d['mode']}"
                         + _outbox_line(d["outbox"]))
    for region, info in status["regions"].items():
        leases = [Lease(x["key"], x["owner"], x["counter"], x["checkpoint"], (), x["state"]) for x in info["leases"]]
        lines += format_leases(region, leases)
        lines.append(f"  dead-letter queue: {info['dead_letters']} messages")
    return "\n".join(lines)


async def watch(topology: Topology, pair: str | None, regions: list[str] | None, profiles: dict[str, str],
                as_json: bool, every_s: float) -> None:
    while True:
        status = await collect(topology, pair, regions, profiles)
        text = json.dumps(status, indent=2, default=str) if as_json else render(status)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[2J\x1b[H")
        print(text, flush=True)
        await asyncio.sleep(every_s)
