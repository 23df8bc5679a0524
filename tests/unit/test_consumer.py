"""The shard consumer's states and transitions (consumer.next_step), as a table: every branch of
what a read can meet, with the errors as the taxonomy classifies them."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from replicatord.consumer import FAILED, Event, State, Step, next_step
from replicatord.errors import LeaseLost, classify

S, OLD, R, C, P, F, X = (State.START, State.OLDEST, State.READING, State.CHECK_GONE, State.PAUSED, State.FINISHED,
                       State.STOPPED)


def failed(code: str, status: int = 400) -> Event:
    """The event of a read that failed with this AWS error code."""
    error = classify(ClientError({"Error": {"Code": code, "Message": code},
                                  "ResponseMetadata": {"HTTPStatusCode": status}}, "GetRecords"))
    return FAILED[error.read]


@pytest.mark.parametrize(("state", "event", "step"), [
    # Starting, and reading on.
    (S, Event.ITERATOR, Step(R)),
    (R, Event.PAGE, Step(R)),
    (R, Event.EMPTY, Step(R)),
    # A closed shard's last page: read to its end.
    (R, Event.END, Step(F)),
    # Expired iterator, or one refused (the emulator's 500, a ValidationException): a new one from
    # the checkpoint, after a backoff.
    (R, failed("ExpiredIteratorException"), Step(S, backoff=True, drop_ahead=True)),
    (R, failed("InternalFailure", 500), Step(S, backoff=True, drop_ahead=True)),
    (R, failed("ValidationException"), Step(S, backoff=True, drop_ahead=True)),
    # Throttled, unreachable, clock skew, refused key, an unknown code: read again from the same
    # iterator after a backoff (the read ahead is given up).
    (R, failed("ProvisionedThroughputExceededException"), Step(R, backoff=True, drop_ahead=True)),
    (R, failed("LimitExceededException"), Step(R, backoff=True, drop_ahead=True)),
    (R, failed("AccessDeniedException"), Step(R, backoff=True, drop_ahead=True)),
    (R, failed("SomeFutureException"), Step(R, backoff=True, drop_ahead=True)),
    (S, failed("ThrottlingException"), Step(S, backoff=True, drop_ahead=True)),
    # Trimmed (DynamoDB Streams says so; Kinesis shows empty pages at the retention's edge): read
    # from the oldest record, and report.
    (R, failed("TrimmedDataAccessException"), Step(OLD, drop_ahead=True)),
    (S, failed("TrimmedDataAccessException"), Step(OLD, drop_ahead=True)),
    (R, Event.TRIMMED_EDGE, Step(OLD, drop_ahead=True)),
    (OLD, Event.ITERATOR, Step(R)),
    # Refused as unknown: did the shard leave the stream?
    (R, failed("ResourceNotFoundException"), Step(C, backoff=True, drop_ahead=True)),
    (C, Event.GONE, Step(F)),
    (C, Event.LISTED, Step(S)),
    (C, failed("ThrottlingException"), Step(C, backoff=True, drop_ahead=True)),
    # Paused: positions and the lease kept; on resume, from the checkpoint again.
    (R, Event.PAUSE, Step(P, drop_ahead=True)),
    (S, Event.PAUSE, Step(P, drop_ahead=True)),
    (P, Event.PAUSE, Step(P)),
    (P, Event.RESUME, Step(S)),
    (P, Event.STOP, Step(X, drop_ahead=True)),
    # Stopping, and a lease another instance took.
    (R, Event.STOP, Step(X, drop_ahead=True)),
    (C, Event.STOP, Step(X, drop_ahead=True)),
    (R, Event.LEASE_LOST, Step(X, drop_ahead=True)),
])
def test_what_a_shard_consumer_does_next(state: State, event: Event, step: Step) -> None:
    assert next_step(state, event) == step


def test_a_lost_lease_is_a_stop() -> None:
    assert FAILED[LeaseLost("taken").read] is Event.LEASE_LOST


@pytest.mark.parametrize(("state", "event"), [(S, Event.PAGE), (OLD, Event.END), (C, Event.ITERATOR),
                                              (R, Event.GONE)])
def test_an_event_a_state_cannot_meet_is_an_error_not_a_guess(state: State, event: Event) -> None:
    with pytest.raises(ValueError, match="no transition"):
        next_step(state, event)
