"""The AWS-behaviour layer's settings and state, in one emulator process (aws_behaviour.py has
what each setting does)."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from replicatord.iam import Call

if TYPE_CHECKING:
    from replicatord.local.stream_model import StreamModel

CONTROL_PREFIX = "/_replicatord/"


@dataclass
class Behaviour:
    """AWS's limits and failures, with time scaled as a test wants. None switches one off."""

    whole_second_timestamps: bool = True
    stream_rollover_s: float | None = 4 * 3600
    stream_retention_s: float = 24 * 3600
    stream_iterator_expiry_s: float = 15 * 60
    stream_reads_per_shard_s: float | None = 5
    kinesis_reads_per_shard_s: float | None = 5
    kinesis_iterator_expiry_s: float = 5 * 60
    kinesis_retention_s: float = 24 * 3600
    kinesis_put_throttle_rate: float = 0.0
    throttle_rate: float = 0.0
    error_rate: float = 0.0
    error_after_rate: float = 0.0
    faults_user_agent: str = "aiobotocore"
    seed: int | None = None
    iam_record: bool = False
    iam_policies: dict[str, Any] = field(default_factory=dict)  # access key id -> policy document(s)
    # Refuse every access key but those of `iam_policies` and the tests' own (LOCAL_CREDENTIALS), as
    # AWS refuses a key it does not know: UnrecognizedClientException.
    iam_known_keys_only: bool = False
    clock_offset_s: float = 0.0  # the region's clock is this far ahead of the host's
    signature_window_s: float = 15 * 60
    signature_window_by_service_s: dict[str, float] = field(
        default_factory=lambda: {"kinesis": 5 * 60.0, "ssm": 5 * 60.0})

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown behaviour settings: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self, name, value)


TESTS_KEY = "testing"  # the access key of the tests' own clients (emulators.LOCAL_CREDENTIALS)

# The end-to-end tests' world: AWS's behaviour with hours made seconds, and a little of every
# failure. Rollover every few seconds, retention long enough that only the tests about it see it.
TEST_BEHAVIOUR: dict[str, Any] = {
    "stream_rollover_s": 4.0,
    "stream_retention_s": 600.0,
    "stream_iterator_expiry_s": 20.0,
    "kinesis_iterator_expiry_s": 10.0,
    "kinesis_retention_s": 600.0,
    "kinesis_put_throttle_rate": 0.01,
    "throttle_rate": 0.005,
    "error_rate": 0.003,
    "error_after_rate": 0.003,
    "iam_record": True,
}


class State:
    """Everything the layer holds in one emulator process (which serves one request at a time)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.random = random.Random(behaviour.seed)
        self.revoked: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.daemon_calls: Counter[str] = Counter()  # calls made with aiobotocore: the daemons' (or the sample's)
        self.faults: Counter[str] = Counter()
        self.iam_calls: Counter[tuple[str, str, Call]] = Counter()  # (access key, caller region, iam.Call) -> requests
        self.busy_s: defaultdict[str, float] = defaultdict(float)  # time spent serving each operation (all callers)
        self.reads: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self.streams: dict[tuple[str, str], StreamModel] = {}  # (table, stream label) -> stream (stream_model.py)
        self.system_delete = False  # set while a TTL sweep deletes

    def over_read_limit(self, key: tuple[str, str], per_s: float | None) -> bool:
        """Count a GetRecords on a shard; True if it is over `per_s` in the last second."""
        if per_s is None:
            return False
        now = time.monotonic()
        window = self.reads[key]
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= per_s:
            return True
        window.append(now)
        return False


STATE = State(Behaviour())


def _error(code: str, message: str) -> Exception:
    from moto.core.exceptions import JsonRESTError

    return JsonRESTError(code, message)
