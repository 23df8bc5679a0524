"""The one place that maps AWS errors to typed exceptions with a `retriable` flag."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, ParamValidationError


class ReplicatorError(Exception):
    """Base of the typed errors; `kind` labels the errors metric."""

    retriable = False
    kind = "error"


class Throttled(ReplicatorError):
    retriable = True
    kind = "throttled"


class ExpiredIterator(ReplicatorError):
    """The shard iterator expired (or the emulator rejected it): get a new one from the checkpoint."""

    retriable = True
    kind = "expired_iterator"


class TrimmedData(ReplicatorError):
    """The checkpoint is older than the stream's retention: records were lost to trimming."""

    kind = "trimmed_data"


class NotFound(ReplicatorError):
    kind = "not_found"


class ConditionFailed(ReplicatorError):
    kind = "condition_failed"


class AccessDenied(ReplicatorError):
    kind = "access_denied"


class Transient(ReplicatorError):
    """A server-side failure worth retrying (5xx, internal failure)."""

    retriable = True
    kind = "transient"


class Unreachable(ReplicatorError):
    """No answer from the endpoint or the proxy: network, DNS, timeout."""

    retriable = True
    kind = "unreachable"


class ClockSkew(ReplicatorError):
    """The request's signing time is outside what AWS accepts (SigV4: 15 minutes): this host's
    clock is off. No record's fault and no key's: retried with backoff until the clock is
    fixed, never a reason to dead-letter a record or to read the peer's key pair again.
    `skew_s`: the endpoint's clock minus ours, from its Date header, when known."""

    retriable = True
    kind = "clock_skew"

    def __init__(self, message: str, skew_s: float | None = None) -> None:
        super().__init__(message)
        self.skew_s = skew_s


class InvalidRequest(ReplicatorError):
    kind = "invalid_request"


class Unclassified(ReplicatorError):
    """An error code this table does not know, answered as the caller's fault (4xx). It may pass,
    so a record is retried, but only up to `tuning.max_record_attempts` (pipelines/retry.py)."""

    retriable = True
    kind = "unknown"


class Contended(ReplicatorError):
    """The application kept rewriting an item while replicatord tried to change it: retried a
    bounded number of times per record, like an unknown error."""

    retriable = True
    kind = "contended"


class LeaseLost(ReplicatorError):
    """Another instance owns the lease now (fencing): stop working on that shard."""

    kind = "lease_lost"


# What AWS answers a request signed too far from its clock: some services have a code of its own,
# the others (DynamoDB, Kinesis, SSM: InvalidSignatureException; the Query services:
# SignatureDoesNotMatch) say it in the message of a signature error.
_SKEW_CODES = frozenset({"RequestTimeTooSkewed", "RequestExpired", "RequestInTheFuture"})
_SKEW_SIGNATURE_CODES = frozenset({"InvalidSignatureException", "SignatureDoesNotMatch", "AuthFailure"})
_SKEW_MESSAGES = ("signature expired", "signature not yet current", "request has expired",
                  "request time too skewed", "request is expired")

_CODES: dict[str, type[ReplicatorError]] = {
    "ProvisionedThroughputExceededException": Throttled,
    "ThrottlingException": Throttled,
    "Throttling": Throttled,
    "RequestLimitExceeded": Throttled,
    "LimitExceededException": Throttled,
    "KMSThrottlingException": Throttled,
    "ExpiredIteratorException": ExpiredIterator,
    "TrimmedDataAccessException": TrimmedData,
    "ResourceNotFoundException": NotFound,
    "ParameterNotFound": NotFound,
    "AWS.SimpleQueueService.NonExistentQueue": NotFound,
    "QueueDoesNotExist": NotFound,
    "ConditionalCheckFailedException": ConditionFailed,
    "AccessDeniedException": AccessDenied,
    "AccessDenied": AccessDenied,
    "UnrecognizedClientException": AccessDenied,
    "InvalidSignatureException": AccessDenied,
    "ExpiredTokenException": AccessDenied,
    "RequestThrottled": Throttled,
    "OverLimit": Throttled,
    "IncompleteSignature": AccessDenied,
    "InvalidClientTokenId": AccessDenied,
    "MissingAuthenticationToken": AccessDenied,
    "KMSAccessDeniedException": AccessDenied,
    "KMSDisabledException": AccessDenied,
    "KMSInvalidStateException": AccessDenied,
    "KMSNotFoundException": AccessDenied,
    "KMSOptInRequired": AccessDenied,
    "InternalServerError": Transient,
    "InternalFailure": Transient,
    "InternalError": Transient,
    "ServiceUnavailable": Transient,
    "ServiceUnavailableException": Transient,
    "KMSInternalException": Transient,
    # Another request (a transaction, a multi-region strongly consistent write) holds the item.
    "TransactionConflictException": Transient,
    "ReplicatedWriteConflictException": Transient,
    "ValidationException": InvalidRequest,
    "InvalidArgumentException": InvalidRequest,
    "SerializationException": InvalidRequest,
    "InvalidMessageContents": InvalidRequest,
    # A local secondary index's item collection is over 10 GB: this item cannot be written.
    "ItemCollectionSizeLimitExceededException": InvalidRequest,
}


def is_clock_skew(code: str, message: str) -> bool:
    """Whether an error answer says the request's signing time was refused (not the key)."""
    if code in _SKEW_CODES:
        return True
    return code in _SKEW_SIGNATURE_CODES and any(text in message.lower() for text in _SKEW_MESSAGES)


def server_skew_s(response: Mapping[str, Any], now: float | None = None) -> float | None:
    """The endpoint's clock minus ours (seconds; whole-second precision), from the answer's Date
    header; None if it has none."""
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    date = headers.get("date")
    if not isinstance(date, str):
        return None
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return server - (time.time() if now is None else now)


def classify(exc: BaseException) -> ReplicatorError:
    """Map an exception raised by an AWS call to its typed error (the cause is kept)."""
    if isinstance(exc, ReplicatorError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or code
        if is_clock_skew(code, message):
            skewed = ClockSkew(f"{code}: {message}", server_skew_s(exc.response))
            skewed.__cause__ = exc
            return skewed
        cls = _CODES.get(code)
        if cls is None and code == "TransactionCanceledException":
            reasons = exc.response.get("CancellationReasons") or []
            codes = {r.get("Code") for r in reasons}
            cls = ConditionFailed if "ConditionalCheckFailed" in codes else Transient
        if cls is None:
            # A code this table does not know: a server error (5xx) is the service's passing
            # trouble; anything else is retried a bounded number of times per record, then the
            # record is dead-lettered (never retried forever). The emulator answers a bad iterator
            # with HTTP 500 (docs/design.md §7): Transient, and the shard worker takes a new iterator.
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            cls = Transient if isinstance(status, int) and status >= 500 else Unclassified
        typed: ReplicatorError = cls(f"{code}: {message}")
    elif isinstance(exc, ConnectionError | HTTPClientError | aiohttp.ClientError | OSError):
        typed = Unreachable(str(exc) or type(exc).__name__)
    elif isinstance(exc, asyncio.TimeoutError):
        typed = Unreachable("request timed out")
    elif isinstance(exc, ParamValidationError):
        typed = InvalidRequest(str(exc))
    elif isinstance(exc, BotoCoreError):
        typed = Transient(str(exc))
    else:
        return ReplicatorError(f"{type(exc).__name__}: {exc}")
    typed.__cause__ = exc
    return typed


AWS_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
"""What an AWS call may raise; `classify` maps each to a ReplicatorError."""
