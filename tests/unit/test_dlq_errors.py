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
    ReadAction,
    RecordAction,
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


R, B, D = RecordAction.RETRY, RecordAction.RETRY_BOUNDED, RecordAction.DEAD_LETTER
AGAIN, RENEW, OLDEST, GONE = ReadAction.RETRY, ReadAction.RENEW_ITERATOR, ReadAction.FROM_OLDEST, ReadAction.SHARD_GONE


@pytest.mark.parametrize(
    ("code", "expected", "record", "read", "peer_trouble", "peer_keys"),
    [
        ("ProvisionedThroughputExceededException", Throttled, R, AGAIN, True, False),
        ("ThrottlingException", Throttled, R, AGAIN, True, False),
        ("ExpiredIteratorException", ExpiredIterator, R, RENEW, False, False),
        ("TrimmedDataAccessException", TrimmedData, B, OLDEST, False, False),
        ("ResourceNotFoundException", NotFound, B, GONE, True, False),
        ("ConditionalCheckFailedException", ConditionFailed, B, AGAIN, False, False),
        ("AccessDeniedException", AccessDenied, B, AGAIN, True, True),
        ("ValidationException", InvalidRequest, D, RENEW, False, False),
        ("InternalServerError", Transient, R, RENEW, True, False),
        ("ItemCollectionSizeLimitExceededException", InvalidRequest, D, RENEW, False, False),
        ("UnrecognizedClientException", AccessDenied, B, AGAIN, True, True),
        ("TransactionConflictException", Transient, R, RENEW, True, False),
        ("SomeFutureException", Unclassified, B, AGAIN, False, False),  # unknown: a bounded number of times
        ("SomeFutureException/500", Transient, R, RENEW, True, False),  # unknown, but the server says it failed
    ],
)
def test_error_codes_and_what_each_gets(code: str, expected: type, record: RecordAction, read: ReadAction,
                                        peer_trouble: bool, peer_keys: bool) -> None:
    """The taxonomy every caller branches on: a record's fate, a shard read's, a peer call's."""
    code, _, status = code.partition("/")
    typed = classify(_client_error(code, int(status or 400)))
    assert type(typed) is expected
    assert (typed.record, typed.read, typed.peer_trouble, typed.peer_keys) == (record, read, peer_trouble, peer_keys)
    assert typed.passing is (record is R)
    assert code in str(typed)


def test_transaction_cancelled_by_a_condition() -> None:
    exc = _client_error("TransactionCanceledException", CancellationReasons=[{"Code": "ConditionalCheckFailed"}])
    assert isinstance(classify(exc), ConditionFailed)


def test_network_and_parameter_errors() -> None:
    assert isinstance(classify(EndpointConnectionError(endpoint_url="http://x")), Unreachable)
    assert isinstance(classify(TimeoutError()), Unreachable)
    assert isinstance(classify(ParamValidationError(report="bad")), InvalidRequest)
