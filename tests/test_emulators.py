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


def test_a_client_that_sends_nothing_does_not_hold_the_others(tmp_path: Path) -> None:
    """The emulator serves one request at a time: a connection that never sends its request (a
    TLS handshake or a request cut by a black-holed link) is given up after
    EMULATOR_SOCKET_TIMEOUT_S, as AWS gives up on it, and the next caller is answered."""
    region = REGIONS[0]
    with emulators.running({region: emulators.free_port()}, tmp_path) as emus, \
            socket.create_connection(("127.0.0.1", emus[region].port)):  # connected, silent
        ddb = client("dynamodb", region, emus[region].endpoint_url)  # before: no answer, ever
        assert ddb.list_tables()["TableNames"] == []
