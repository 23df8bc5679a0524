"""Dead-letter message sizing and the AWS error taxonomy."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError

from replicatord.dlq import fit_body
from replicatord.errors import (
    AccessDenied,
    ConditionFailed,
    ExpiredIterator,
    InvalidRequest,
    NotFound,
    Throttled,
    Transient,
    TrimmedData,
    Unreachable,
    classify,
)


@pytest.mark.parametrize("payload", ["x" * 400_000, '"\\' * 200_000, "\u0001" * 100_000, "短" * 300_000, "ok"])
def test_dead_letter_body_fits_the_sqs_limit(payload: str) -> None:
    body = fit_body({"reason": "r", "detail": "d"}, payload, limit=256 * 1024)
    assert len(body.encode()) <= 256 * 1024
    doc = json.loads(body)
    assert payload.startswith(doc["payload"])
    assert doc["truncated"] is (doc["payload"] != payload)
    assert len(doc["payload"]) > 0


def _client_error(code: str, status: int = 400, **extra: object) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status},
                        **extra}, "Op")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "expected", "retriable"),
    [
        ("ProvisionedThroughputExceededException", Throttled, True),
        ("ThrottlingException", Throttled, True),
        ("ExpiredIteratorException", ExpiredIterator, True),
        ("TrimmedDataAccessException", TrimmedData, False),
        ("ResourceNotFoundException", NotFound, False),
        ("ConditionalCheckFailedException", ConditionFailed, False),
        ("AccessDeniedException", AccessDenied, False),
        ("ValidationException", InvalidRequest, False),
        ("InternalServerError", Transient, True),
        ("ItemCollectionSizeLimitExceededException", Transient, True),  # unknown: retried, not dead-lettered
    ],
)
def test_error_codes(code: str, expected: type, retriable: bool) -> None:
    typed = classify(_client_error(code))
    assert type(typed) is expected
    assert typed.retriable is retriable
    assert code in str(typed)


def test_transaction_cancelled_by_a_condition() -> None:
    exc = _client_error("TransactionCanceledException", CancellationReasons=[{"Code": "ConditionalCheckFailed"}])
    assert isinstance(classify(exc), ConditionFailed)


def test_network_and_parameter_errors() -> None:
    assert isinstance(classify(EndpointConnectionError(endpoint_url="http://x")), Unreachable)
    assert isinstance(classify(TimeoutError()), Unreachable)
    assert isinstance(classify(ParamValidationError(report="bad")), InvalidRequest)
