"""The emulator processes: each region's emulator serves the port it says it serves."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from replicatord.local import emulators
from replicatord.local.world import REGIONS, client

pytestmark = pytest.mark.integration


def test_a_port_taken_by_another_process_is_replaced_not_shared(tmp_path: Path) -> None:
    """free_port() only finds a port free: if another process binds it before the emulator does,
    the emulator must not take that process for itself (the CI run where both regions' calls
    reached one emulator, and the IAM check judged them by the wrong region)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with emulators.running({REGIONS[0]: taken, REGIONS[1]: emulators.free_port()}, tmp_path) as emus:
            assert emus[REGIONS[0]].port != taken
            for region, emulator in emus.items():  # each answers as itself
                ddb = client("dynamodb", region, emulator.endpoint_url)
                ddb.create_table(TableName=f"t-{region}", KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
                                 AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
                                 BillingMode="PAY_PER_REQUEST")
                assert ddb.list_tables()["TableNames"] == [f"t-{region}"]
