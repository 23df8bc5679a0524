"""Every call the local world's identities made, checked against the policies `replicatord iam`
generates for the topology: what would AWS have refused?

The local regions record each authorization a request needed, per access key
(local/iam_recorder.py, `Behaviour.iam_record`); each identity of the local world has a key of
its own (world.identities). A daemon's calls are judged by its region's instance-role policy
wherever they went (a peer in its partition is reached with that role), a peer writer's by its
policy in its region. The operator has one key locally but a role per region on AWS: its calls are
judged by the policy of the region whose settings made the client (the User-Agent's
`config.CALLER_TAG`: status and dlq redrive reach a same-partition peer with their own region's
role), or of the region called when a client carries no tag. Keys of no identity (the tests' own
clients, standing for the application) are not judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicatord.config import load_topology
from replicatord.iam import Accounts, allowing_statements, allows, identity_files, policies, statements
from replicatord.local.aws_behaviour import Control
from replicatord.local.iam_recorder import account_id, call_of
from replicatord.local.world import identities


@dataclass
class Checked:
    """What the calls of one test showed: what the policies would refuse, which statements the
    calls used, and which the policies grant ((identity kind, Sid) pairs)."""

    refused: list[str] = field(default_factory=list)
    used: set[tuple[str, str]] = field(default_factory=set)
    granted: set[tuple[str, str]] = field(default_factory=set)


def refused_calls(config: Path, endpoints: Mapping[str, str]) -> list[str]:
    """One line per kind of call the generated policies do not allow, naming the identity, the
    region called, the action, the resource and how many times; [] if every call is allowed."""
    return check_calls(config, endpoints).refused


def check_calls(config: Path, endpoints: Mapping[str, str]) -> Checked:
    """Every recorded call of the local world's identities against the generated policies."""
    topology = load_topology(config)
    documents = policies(topology, Accounts({region: account_id() for region in topology.regions}))
    files = identity_files(topology)
    who = identities(list(topology.regions))
    checked = Checked()
    for (kind, _), name in files.items():
        checked.granted |= {(kind, str(s.get("Sid"))) for s in statements(documents[name])}
    refused = checked.refused
    for called, endpoint in endpoints.items():
        for entry in Control(endpoint).iam_calls():
            identity = who.get(entry["access_key"])
            if identity is None:
                continue
            kind, home = identity
            # An operator command signs each region's calls with that region's role, and a peer
            # in the same partition with the role of the region whose settings opened it.
            file = files.get((kind, home or entry["caller"] or called))
            call = call_of(entry)
            policy: dict[str, Any] | None = documents.get(file) if file else None
            if policy is None or not allows(policy, call):
                context = f" {dict(call.context)}" if call.context else ""
                refused.append(f"{kind} of {home or called} calling {called}: {call.action} on {call.resource}"
                               f"{context} ({entry['count']} calls; policy {file or 'none'})")
            else:
                checked.used |= {(kind, sid) for sid in allowing_statements(policy, call)}
    refused.sort()
    return checked
