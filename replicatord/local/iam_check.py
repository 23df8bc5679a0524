"""Every call the local world's identities made, checked against the policies `replicatord iam`
generates for the topology: what would AWS have refused?

The local regions record each authorization a request needed, per access key
(local/iam_recorder.py, `Behaviour.iam_record`); each identity of the local world has a key of
its own (world.identities). A daemon's calls are judged by its region's instance-role policy
wherever they went (a peer in its partition is reached with that role), a peer writer's and an
operator's by their policy in the region they called. Keys of no identity (the tests' own
clients, standing for the application) are not judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from replicatord.config import load_topology
from replicatord.iam import Accounts, allows, identity_files, policies
from replicatord.local.aws_behaviour import Control
from replicatord.local.iam_recorder import account_id, call_of
from replicatord.local.world import identities


def refused_calls(config: Path, endpoints: Mapping[str, str]) -> list[str]:
    """One line per kind of call the generated policies do not allow, naming the identity, the
    region called, the action, the resource and how many times; [] if every call is allowed."""
    topology = load_topology(config)
    documents = policies(topology, Accounts({region: account_id() for region in topology.regions}))
    files = identity_files(topology)
    who = identities(list(topology.regions))
    refused = []
    for called, endpoint in endpoints.items():
        for entry in Control(endpoint).iam_calls():
            identity = who.get(entry["access_key"])
            if identity is None:
                continue
            kind, home = identity
            file = files.get((kind, home if kind == "daemon" and home else called))
            call = call_of(entry)
            policy: dict[str, Any] | None = documents.get(file) if file else None
            if policy is None or not allows(policy, call):
                context = f" {dict(call.context)}" if call.context else ""
                refused.append(f"{kind} of {home or called} calling {called}: {call.action} on {call.resource}"
                               f"{context} ({entry['count']} calls; policy {file or 'none'})")
    return sorted(refused)
