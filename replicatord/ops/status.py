"""`replicatord status`: who holds which shard lease, with checkpoints, per region."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from replicatord.aws import StartupError
from replicatord.config import Topology
from replicatord.leases import STREAM_KEY, Lease, from_item


def read_leases(topology: Topology, region: str) -> list[Lease]:
    config = topology.regions[region]
    ddb: Any = boto3.session.Session(region_name=region).client("dynamodb", endpoint_url=config.endpoint_url)
    leases: list[Lease] = []
    kwargs: dict[str, Any] = {"TableName": config.lease_table, "ConsistentRead": True}
    try:
        while True:
            page = ddb.scan(**kwargs)
            leases.extend(from_item(item) for item in page.get("Items", []) if STREAM_KEY in item)
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    except ClientError as exc:
        error = exc.response.get("Error", {})
        why = f"{error.get('Code')}: {error.get('Message')}"
        raise StartupError(f"{region}: lease table {config.lease_table}: {why}") from None
    except BotoCoreError as exc:
        raise StartupError(f"{region}: {exc}") from None


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


def status(topology: Topology, regions: list[str] | None) -> int:
    for region in regions or list(topology.regions):
        if region not in topology.regions:
            raise StartupError(f"unknown region {region!r} (regions: {', '.join(topology.regions)})")
        print("\n".join(format_leases(region, read_leases(topology, region))))
    return 0
