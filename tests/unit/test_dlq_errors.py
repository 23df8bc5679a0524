"""Dead-letter message sizing and the AWS error taxonomy."""

from __future__ import annotations

import base64
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError

from replicatord.dlq import bodies
from replicatord.errors import (
    AccessDenied,
    ConditionFailed,
    ExpiredIterator,
    InvalidRequest,
    NotFound,
    Throttled,
    Transient,
    TrimmedData,
    Unclassified,
    Unreachable,
    classify,
)

PAYLOADS = {
    "text_large": "x" * 400_000,
    "text_escapes": '"\\' * 200_000,
    "text_controls": "\u0001" * 100_000,
    "text_cjk": "\u77ed" * 300_000,
    "text_surrogate": "ok \ud800 then",
    "text_small": "ok",
    "bytes_mib": bytes(range(256)) * 4096,
    "bytes_small": b"\x00\xff",
    "bytes_empty": b"",
}


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
@pytest.mark.parametrize("limit", [256 * 1024, 1024 * 1024, 8 * 1024])
def test_dead_letter_bodies_fit_and_give_the_record_back_whole(payload: bytes | str, limit: int) -> None:
    sent = bodies({"reason": "r", "detail": "d"}, payload, limit=limit)
    docs = [json.loads(body) for body in sent]
    for body in sent:
        assert body.isascii() and len(body) <= limit  # SQS takes any ASCII; bytes == characters
    assert [d["part"] for d in docs] == list(range(1, len(sent) + 1))
    assert {d["parts"] for d in docs} == {len(sent)} and len({d["letter_id"] for d in docs}) == 1
    joined = "".join(d["payload"] for d in docs)
    if docs[0]["encoding"] == "text":
        assert len(sent) == 1 and joined == payload
    else:
        raw = base64.b64decode(joined)
        assert raw == (payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass"))
    # The same record gives the same letter id: a part sent twice is recognisably the same.
    assert bodies({"reason": "r", "detail": "d"}, payload, limit=limit)[0] == sent[0]


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
        ("ItemCollectionSizeLimitExceededException", InvalidRequest, False),
        ("UnrecognizedClientException", AccessDenied, False),
        ("TransactionConflictException", Transient, True),
        ("SomeFutureException", Unclassified, True),  # unknown: retried a bounded number of times
        ("SomeFutureException/500", Transient, True),  # unknown, but the server says it failed
    ],
)
def test_error_codes(code: str, expected: type, retriable: bool) -> None:
    code, _, status = code.partition("/")
    typed = classify(_client_error(code, int(status or 400)))
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
