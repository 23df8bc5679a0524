"""Which of a table's DynamoDB streams the forwarder reads at startup (docs/streams.md)."""

from __future__ import annotations

import pytest

from replicatord.streams import StreamInfo, StreamPlan, plan_streams

T = "user-cn"
OLD = "arn:aws-cn:dynamodb:cn-north-1:1:table/user-cn/stream/2026-12-01T00:00:00.000"
MID = "arn:aws-cn:dynamodb:cn-north-1:1:table/user-cn/stream/2026-12-03T00:00:00.000"
NEW = "arn:aws-cn:dynamodb:cn-north-1:1:table/user-cn/stream/2026-12-05T00:00:00.000"
GOOD = "NEW_AND_OLD_IMAGES"


def info(arn: str, leases: int = 0, unfinished: int = 0, view: str | None = GOOD) -> StreamInfo:
    return StreamInfo(arn, view, leases, unfinished)


def follows(plan: StreamPlan) -> list[tuple[str, str, bool]]:
    return [(f.arn.rsplit("/", 1)[1][:10], f.start, f.retiring) for f in plan.follow]


@pytest.mark.parametrize(("streams", "current", "ran_before", "initial", "expected"), [
    # A first deployment: the current stream from initial_position.
    ([info(NEW)], NEW, False, "latest", [("2026-12-05", "latest", False)]),
    ([info(NEW)], NEW, False, "trim_horizon", [("2026-12-05", "trim_horizon", False)]),
    # Running before on the same stream: its leases say where; new shards from their oldest record.
    ([info(NEW, leases=3, unfinished=1)], NEW, True, "latest", [("2026-12-05", "trim_horizon", False)]),
    # Re-enabled while the daemons were stopped: the old stream's unread records, then the new
    # stream from its oldest record, never from `latest`.
    ([info(OLD, leases=2, unfinished=1), info(NEW)], NEW, True, "latest",
     [("2026-12-01", "trim_horizon", True), ("2026-12-05", "trim_horizon", False)]),
    # The old stream was read to its end before: nothing of it.
    ([info(OLD, leases=2, unfinished=0), info(NEW)], NEW, True, "latest", [("2026-12-05", "trim_horizon", False)]),
    # Re-enabled twice while stopped: the middle stream was never seen, and is read whole.
    ([info(OLD, leases=1, unfinished=0), info(MID), info(NEW)], NEW, True, "trim_horizon",
     [("2026-12-03", "trim_horizon", True), ("2026-12-05", "trim_horizon", False)]),
    # The old streams' leases are gone (deleted after they left the stream), but the followed
    # row says the pair ran: the new stream is still not started at `latest`.
    ([info(NEW)], NEW, True, "latest", [("2026-12-05", "trim_horizon", False)]),
    # A first deployment at trim_horizon reads an older stream's last 24 hours too; at latest not.
    ([info(OLD), info(NEW)], NEW, False, "trim_horizon",
     [("2026-12-01", "trim_horizon", True), ("2026-12-05", "trim_horizon", False)]),
    ([info(OLD), info(NEW)], NEW, False, "latest", [("2026-12-05", "latest", False)]),
])
def test_which_streams_are_read_and_from_where(
        streams: list[StreamInfo], current: str, ran_before: bool, initial: str,
        expected: list[tuple[str, str, bool]]) -> None:
    plan = plan_streams(T, streams, current, ran_before, initial)
    assert follows(plan) == expected
    assert plan.problem is None


@pytest.mark.parametrize("view", ["KEYS_ONLY", "NEW_IMAGE", "OLD_IMAGE", None])
def test_a_current_stream_of_the_wrong_view_type_is_a_problem_not_a_silent_skip(view: str | None) -> None:
    plan = plan_streams(T, [info(OLD, leases=1, unfinished=1), info(NEW, view=view)], NEW, True, "latest")
    assert follows(plan) == [("2026-12-01", "trim_horizon", True)]  # the old stream is still read to its end
    assert plan.problem is not None and f"view type {view or 'unknown'}" in plan.problem
    assert "NEW_AND_OLD_IMAGES" in plan.problem


def test_an_older_stream_of_the_wrong_view_type_is_noted_and_not_read() -> None:
    plan = plan_streams(T, [info(OLD, view="KEYS_ONLY"), info(NEW)], NEW, True, "trim_horizon")
    assert follows(plan) == [("2026-12-05", "trim_horizon", False)]
    assert plan.problem is None
    assert any("KEYS_ONLY" in note for note in plan.notes)


def test_a_disabled_stream_is_a_problem_and_the_old_one_is_still_read() -> None:
    plan = plan_streams(T, [info(NEW, leases=1, unfinished=1)], None, True, "trim_horizon")
    assert follows(plan) == [("2026-12-05", "trim_horizon", True)]
    assert plan.problem is not None and "no enabled stream" in plan.problem

