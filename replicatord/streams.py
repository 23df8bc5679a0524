"""Which DynamoDB streams of a table the forwarder follows, at startup and while it runs.

A table's stream that is disabled and enabled again is a new stream (a new ARN and label); the
old one stays readable for 24 hours. So at startup the forwarder lists every stream of the table
(ListStreams), not only the current one, and decides for each (`plan_streams`, a pure function):

- an older stream with unfinished leases, or one that is new since the last run, is read to its
  end (a retiring pipeline), so nothing it holds is skipped;
- the current stream starts where `initial_position` says only on a first deployment; a stream
  that is new since the last run starts at its oldest record;
- a stream whose view type is not NEW_AND_OLD_IMAGES, or a table whose stream is disabled, is a
  problem of the pair: an error in the log, `replicatord_stream_problem` and `/readyz`, never a
  silent skip of every change.

"The last run" is the `followed` row of the lease table (LeaseTable.followed): the
incarnations of the table's stream this pair's forwarder has followed in this region.
docs/streams.md has the cases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from replicatord.aws import Aws
from replicatord.lease_table import LeaseTable
from replicatord.leases import FINISHED, lease_key, partition_of
from replicatord.metrics import Metrics
from replicatord.pipeline import Pipeline
from replicatord.sources import FORWARDER

log = logging.getLogger(__name__)

NEEDED_VIEW_TYPE = "NEW_AND_OLD_IMAGES"


def stream_label(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def incarnation(table: str, arn: str) -> str:
    """The name of one stream of a table in lease keys (`DynamoStreamSource.incarnation`)."""
    return f"{table}@{stream_label(arn)}"


def lease_partition(table: str, arn: str) -> str:
    return partition_of(lease_key(FORWARDER, incarnation(table, arn), "-"))


@dataclass(frozen=True)
class StreamInfo:
    """One stream of a table, as found at startup."""

    arn: str
    view_type: str | None
    leases: int  # leases of it in the lease table
    unfinished: int  # of which not read to their end

    @property
    def label(self) -> str:
        return stream_label(self.arn)


@dataclass(frozen=True)
class Follow:
    """A stream to read: from the checkpoints of its leases, and for shards without a lease from
    `start`. A retiring stream is read to its end, then its pipeline stops."""

    arn: str
    start: str  # "trim_horizon" or "latest"
    retiring: bool


@dataclass(frozen=True)
class StreamPlan:
    follow: tuple[Follow, ...]
    problem: str | None = None  # why the table's changes are not forwarded now
    notes: tuple[str, ...] = ()  # what was decided about the other streams, for the log


def view_type_problem(table: str, arn: str, view_type: str | None) -> str | None:
    if view_type == NEEDED_VIEW_TYPE:
        return None
    return (f"the stream {stream_label(arn)} of table {table} has view type {view_type or 'unknown'}; "
            f"replicatord needs {NEEDED_VIEW_TYPE} (disable the stream and enable it with "
            f"{NEEDED_VIEW_TYPE}; then 'replicatord verify --repair' for the changes made meanwhile)")


def disabled_problem(table: str) -> str:
    return (f"table {table} has no enabled stream: its changes are not captured until a "
            f"{NEEDED_VIEW_TYPE} stream is enabled ('replicatord verify --repair' afterwards)")


def plan_streams(table: str, streams: Sequence[StreamInfo], current_arn: str | None, ran_before: bool,
                 initial_position: str) -> StreamPlan:
    """What to read of a table's streams at startup. `current_arn`: the table's enabled stream
    (None if disabled); `ran_before`: this pair's forwarder ran here before (leases or the
    followed row say so); `initial_position` applies only to a first deployment's current stream."""
    follow: list[Follow] = []
    notes: list[str] = []
    problem = None
    for stream in sorted(streams, key=lambda s: s.label):
        if stream.arn == current_arn:
            continue
        if stream.leases and not stream.unfinished:
            continue  # read to its end before
        if not stream.leases and not ran_before and initial_position == "latest":
            notes.append(f"older stream {stream.label} of table {table} not read: a first start at 'latest'")
            continue
        wrong = view_type_problem(table, stream.arn, stream.view_type)
        if wrong is not None:
            notes.append(f"older stream {stream.label} cannot be forwarded: {wrong}")
            continue
        follow.append(Follow(stream.arn, "trim_horizon", retiring=True))
    current = next((s for s in streams if s.arn == current_arn), None)
    if current_arn is None:
        problem = disabled_problem(table)
    elif (wrong := view_type_problem(table, current_arn, current.view_type if current else None)) is not None:
        problem = wrong
    else:
        first = not ran_before and not (current and current.leases)
        follow.append(Follow(current_arn, initial_position if first else "trim_horizon", retiring=False))
    return StreamPlan(tuple(follow), problem, tuple(notes))


# --- what the plan needs, read from AWS ------------------------------------------------------------


async def list_streams(aws: Aws, table: str) -> list[str]:
    """The ARNs of every stream of `table` that AWS still lists (an old one for 24 hours)."""
    arns: list[str] = []
    kwargs: dict[str, Any] = {"TableName": table}
    while True:
        result = await aws.call("dynamodbstreams", "list_streams", **kwargs)
        arns += [str(s["StreamArn"]) for s in result.get("Streams", []) if s.get("TableName", table) == table]
        last = result.get("LastEvaluatedStreamArn")
        if not last:
            return arns
        kwargs["ExclusiveStartStreamArn"] = last


async def view_type(aws: Aws, arn: str) -> str | None:
    result = await aws.call("dynamodbstreams", "describe_stream", StreamArn=arn, Limit=1)
    found = result.get("StreamDescription", {}).get("StreamViewType")
    return str(found) if found else None


async def survey(aws: Aws, leases: LeaseTable, table: str, arns: Sequence[str]) -> list[StreamInfo]:
    """Each stream's view type and leases."""
    found = []
    for arn in dict.fromkeys(arns):
        held = await leases.query(lease_partition(table, arn), consistent=True)
        found.append(StreamInfo(arn, await view_type(aws, arn), len(held),
                                sum(1 for lease in held if lease.state != FINISHED)))
    return found


# --- one pair's forwarding, kept on its table's current stream ----------------------------------

PipelineFactory = Callable[[str, str, bool], Pipeline]
"""(stream ARN, start for shards without a lease, retiring) -> a forwarder pipeline."""


class Forwarding:
    """The forwarder pipelines of one pair's table in this region: the current stream's, and the
    older streams' that are read to their end. `startup()` plans them from every stream the table
    has; `check()`, run every `shard_refresh_s`, follows a stream disabled and enabled again."""

    def __init__(self, aws: Aws, leases: LeaseTable, pair: str, table: str, build: PipelineFactory,
                 metrics: Metrics) -> None:
        self.aws = aws
        self.leases = leases
        self.pair = pair
        self.table = table
        self.build = build
        self.metrics = metrics
        self.current_arn: str | None = None
        self.current: Pipeline | None = None
        self.problem: str | None = None

    async def startup(self, initial_position: str) -> list[Pipeline]:
        desc = (await self.aws.call("dynamodb", "describe_table", TableName=self.table))["Table"]
        enabled = bool((desc.get("StreamSpecification") or {}).get("StreamEnabled"))
        current = str(desc["LatestStreamArn"]) if enabled and desc.get("LatestStreamArn") else None
        arns = await list_streams(self.aws, self.table)
        infos = await survey(self.aws, self.leases, self.table, [*arns, *([current] if current else [])])
        followed = await self.leases.followed(self.pair, FORWARDER, self.table)
        ran_before = bool(followed) or any(info.leases for info in infos)
        plan = plan_streams(self.table, infos, current, ran_before, initial_position)
        for note in plan.notes:
            log.warning("pair %s: %s", self.pair, note)
        self.current_arn = current
        self._set_problem(plan.problem)
        pipelines = []
        for follow in plan.follow:
            pipeline = self.build(follow.arn, follow.start, follow.retiring)
            if not follow.retiring:
                self.current = pipeline
            else:
                why = "was being read" if stream_label(follow.arn) in followed else "is new since the last run"
                log.warning("pair %s: older stream %s of table %s %s: reading what is left of it to its end",
                            self.pair, stream_label(follow.arn), self.table, why)
            await self._note(follow.arn)
            pipelines.append(pipeline)
        return pipelines

    async def check(self) -> list[Pipeline]:
        """The table's stream now: a new one is followed from its oldest record (the old one is
        read to its end), a disabled one or a wrong view type is the pair's problem. Returns the
        pipelines to start."""
        desc = (await self.aws.call("dynamodb", "describe_table", TableName=self.table))["Table"]
        spec = desc.get("StreamSpecification") or {}
        arn = str(desc["LatestStreamArn"]) if spec.get("StreamEnabled") and desc.get("LatestStreamArn") else None
        if arn == self.current_arn:
            return []
        if self.current is not None:
            self.current.retiring = True  # its shards are closed: read to their end, then it stops
        self.current_arn, self.current = arn, None
        if arn is None:
            self._set_problem(disabled_problem(self.table))
            return []
        log.warning("pair %s: table %s has a new stream %s (disabled and enabled again): forwarding it from its "
                    "oldest record; the old stream is read to its end", self.pair, self.table, stream_label(arn))
        wrong = view_type_problem(self.table, arn, spec.get("StreamViewType"))
        self._set_problem(wrong)
        if wrong is not None:
            return []
        self.current = self.build(arn, "trim_horizon", False)
        await self._note(arn)
        return [self.current]

    async def _note(self, arn: str) -> None:
        await self.leases.note_followed(self.pair, FORWARDER, self.table, stream_label(arn))

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        self.problem = problem
        self.metrics.stream_problem.labels(self.pair).set(1 if problem else 0)
        if problem:
            self.metrics.errors.labels(FORWARDER, "stream_unusable").inc()
            log.error("pair %s: %s", self.pair, problem)
        else:
            log.info("pair %s: the stream of table %s is forwarded again", self.pair, self.table)
