"""`Aws` at the client seam: deadlines, clock skew, unprocessed keys, replaced peer clients.

The clients are fakes put where aiobotocore's would be (`Aws.local`, `Aws.peers`): what is under
test is what `Aws` does around a call whatever the network and the service answer.
"""

from __future__ import annotations

import asyncio
import re
import time
from email.utils import formatdate
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from replicatord import aws as aws_module
from replicatord.aws import Aws
from replicatord.config import Tuning, parse_topology, resolve_settings
from replicatord.errors import AccessDenied, ClockSkew, Throttled, Unreachable, classify
from replicatord.local.world import topology_document
from replicatord.metrics import Metrics
from replicatord.retry import Verdict, verdict

CN, SG, NX = "cn-north-1", "ap-southeast-1", "cn-northwest-1"


def _aws(tuning: dict[str, Any] | None = None, regions: tuple[str, ...] = (CN, SG)) -> Aws:
    document = topology_document({r: f"http://127.0.0.1:{9 + i}" for i, r in enumerate(regions)}, tuning=tuning)
    settings = resolve_settings(parse_topology(yaml.safe_dump(document)), CN, "seam-1")
    return Aws(settings, Metrics())


def _client_error(code: str, message: str, status: int = 400, date: str | None = None) -> ClientError:
    headers = {"date": date} if date else {}
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers}}, "PutItem")


class Hangs:
    """A client whose every call waits for an answer that never comes (a silent border)."""

    async def describe_table(self, **_: Any) -> Any:
        await asyncio.Event().wait()


async def test_a_call_that_gets_no_answer_ends_at_its_deadline_as_unreachable() -> None:
    aws = _aws({"aws_timeout_s": 0.3})
    aws.local["dynamodb"] = Hangs()
    started = time.monotonic()
    with pytest.raises(Unreachable, match="no answer within 0.3s"):
        await aws.call("dynamodb", "describe_table", TableName="user-cn")
    assert 0.25 < time.monotonic() - started < 2.0


async def test_every_client_has_its_deadline_and_an_unknown_one_the_default() -> None:
    aws = _aws({"aws_timeout_s": 7, "failover_s": 6, "renew_interval_s": 1})
    async with aws:
        assert aws.deadline_s(aws.local["dynamodb"]) == 7
        assert aws.deadline_s(aws.local["leases"]) == 3  # half the failover time
        assert aws.deadline_s(object()) == 7


# --- clock skew -------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "message", "skewed"), [
    ("InvalidSignatureException", "Signature expired: 20261207T020000Z is now earlier than 20261207T021500Z "
     "(20261207T023000Z - 15 min.)", True),
    ("InvalidSignatureException", "Signature not yet current: 20261207T030000Z is still later than "
     "20261207T022000Z (20261207T021500Z + 5 min.)", True),
    ("SignatureDoesNotMatch", "Signature expired: 20261207T020000Z is now earlier than ...", True),
    ("RequestTimeTooSkewed", "The difference between the request time and the current time is too large.", True),
    ("RequestExpired", "Request has expired.", True),
    # A wrong secret key is a key problem, not a clock problem: the forwarder reads SSM again.
    ("InvalidSignatureException", "The request signature we calculated does not match the signature you "
     "provided.", False),
    ("UnrecognizedClientException", "The security token included in the request is invalid.", False),
])
def test_clock_skew_is_its_own_error_and_a_bad_key_is_not(code: str, message: str, skewed: bool) -> None:
    error = classify(_client_error(code, message))
    assert isinstance(error, ClockSkew) is skewed
    if not skewed:
        assert isinstance(error, AccessDenied)


def test_a_skewed_clock_never_dead_letters_a_record() -> None:
    assert verdict(ClockSkew("Signature expired"), 10_000, 10**6, Tuning(max_record_attempts=3)) is Verdict.RETRY


class Skewed:
    """Answers every call with AWS's clock-skew refusal, dated `skew_s` from our clock."""

    def __init__(self, skew_s: float) -> None:
        self.skew_s = skew_s
        self.calls = 0

    async def put_records(self, **_: Any) -> Any:
        self.calls += 1
        raise _client_error("InvalidSignatureException", "Signature expired: ... (... - 5 min.)",
                            date=formatdate(time.time() + self.skew_s, usegmt=True))


async def test_clock_skew_is_measured_from_the_date_header_logged_once_and_exported(
        caplog: pytest.LogCaptureFixture) -> None:
    aws = _aws()
    peer = Skewed(-1200)
    aws.peers[SG] = peer
    for _ in range(3):
        with pytest.raises(ClockSkew) as raised:
            await aws.call("kinesis", "put_records", client=peer, StreamName="s", Records=[])
    assert raised.value.skew_s == pytest.approx(-1200, abs=2)
    assert aws.metrics.registry.get_sample_value("replicatord_clock_skew_seconds", {"region": CN}) == \
        pytest.approx(-1200, abs=2)  # the fake is not registered: calls count as the local region's
    lines = [r.getMessage() for r in caplog.records if "clock skew" in r.getMessage()]
    assert len(lines) == 1 and re.search(r"-120[01]s", lines[0]) and "chrony/NTP" in lines[0], lines
    assert aws.metrics.registry.get_sample_value("replicatord_errors_total",
                                                 {"pipeline": "aws", "type": "clock_skew"}) == 3


class Answers:
    """Answers DescribeTable with a Date header `skew_s` from our clock."""

    def __init__(self, skew_s: float) -> None:
        self.skew_s = skew_s

    async def describe_table(self, **_: Any) -> Any:
        date = formatdate(time.time() + self.skew_s, usegmt=True)
        return {"Table": {}, "ResponseMetadata": {"HTTPStatusCode": 200, "HTTPHeaders": {"date": date}}}


async def test_the_clock_is_sampled_from_answers_that_succeed() -> None:
    aws = _aws()
    aws.local["dynamodb"] = Answers(90)
    await aws.call("dynamodb", "describe_table", TableName="user-cn")
    assert aws.metrics.registry.get_sample_value("replicatord_clock_skew_seconds", {"region": CN}) == \
        pytest.approx(90, abs=2)


# --- BatchGetItem's unprocessed keys ------------------------------------------------------------


class Unprocessed:
    """BatchGetItem that leaves every key unprocessed `rounds` times, then answers them."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.calls = 0

    async def batch_get_item(self, *, RequestItems: dict[str, Any]) -> Any:  # noqa: N803
        self.calls += 1
        if self.calls <= self.rounds:
            return {"Responses": {}, "UnprocessedKeys": RequestItems}
        return {"Responses": {t: [dict(k) for k in r["Keys"]] for t, r in RequestItems.items()}}


async def test_unprocessed_keys_are_asked_again_after_growing_jittered_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    aws = _aws({"backoff_base_ms": 100, "backoff_max_ms": 5000})
    aws.local["dynamodb"] = Unprocessed(rounds=4)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(aws_module.asyncio, "sleep", sleep)
    found = await aws_module.batch_get_item(aws, {"t": {"Keys": [{"k": {"S": "1"}}]}}, aws.settings.topology.tuning)
    assert found == {"t": [{"k": {"S": "1"}}]}
    assert len(waits) == 4
    for attempt, wait in enumerate(waits):  # capped exponential, jittered within its upper half
        cap = min(5.0, 0.1 * 2 ** attempt)
        assert cap / 2 <= wait <= cap, (attempt, wait)


async def test_keys_that_stay_unprocessed_end_in_throttled_after_a_bounded_number_of_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    aws = _aws()
    fake = Unprocessed(rounds=10**6)
    aws.local["dynamodb"] = fake

    async def sleep(_: float) -> None:
        return None

    monkeypatch.setattr(aws_module.asyncio, "sleep", sleep)
    with pytest.raises(Throttled, match="stayed unprocessed"):
        await aws_module.batch_get_item(aws, {"t": {"Keys": [{"k": {"S": "1"}}]}}, aws.settings.topology.tuning)
    assert fake.calls == aws_module.BATCH_ROUNDS


# --- peer clients of replaced key pairs ---------------------------------------------------------


class Context:
    """What `create_client` gives: opened by the first `__aenter__`, closed by `__aexit__`."""

    def __init__(self, closed: list[Context]) -> None:
        self.closed_into = closed

    async def __aenter__(self) -> Context:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.closed_into.append(self)


async def test_the_client_of_a_replaced_key_pair_is_closed_once_its_calls_have_ended(
        monkeypatch: pytest.MonkeyPatch) -> None:
    aws = _aws({"aws_timeout_s": 2})
    closed: list[Context] = []
    monkeypatch.setattr(aws._session, "create_client", lambda *_a, **_k: Context(closed))
    first = await aws._peer_client(SG, ("AKIDOLD", "old-secret"))
    second = await aws._peer_client(SG, ("AKIDNEW", "new-secret"))
    assert aws.peers[SG] is second
    assert await aws.close_retired() == 0 and not closed  # a call on it may still be under way
    monkeypatch.setattr(aws_module.time, "monotonic", lambda: time.perf_counter() + 1e6)
    assert await aws.close_retired() == 1 and closed == [first]
    await aws.__aexit__(None, None, None)
    assert closed == [first, second]


# --- SSM -------------------------------------------------------------------------------------------


class Ssm:
    def __init__(self) -> None:
        self.asked: list[tuple[str, bool]] = []

    async def get_parameter(self, *, Name: str, WithDecryption: bool) -> Any:  # noqa: N803
        self.asked.append((Name, WithDecryption))
        return {"Parameter": {"Name": Name, "Type": "SecureString", "Value": f"plain-{Name.rsplit('/', 1)[1]}"}}


async def test_both_halves_of_the_peer_key_pair_are_read_with_decryption() -> None:
    aws = _aws()
    ssm = Ssm()
    aws.local["ssm"] = ssm
    keys = await aws._peer_keys(SG)
    assert keys == ("plain-AccessKey", "plain-SecretKey")
    assert ssm.asked == [("/DDBReplication/TableSG/AccessKey", True), ("/DDBReplication/TableSG/SecretKey", True)]
