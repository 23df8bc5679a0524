"""The one place that maps AWS errors to typed exceptions, and says what each gets.

Every caller branches on what its error class declares, never on an isinstance ladder of its
own (aiokafka's errors.py):

- `record`: what a record whose step failed with it gets (retry.verdict): retried until it
  passes (the service's trouble, or this host's clock), retried up to
  `tuning.max_record_attempts` (it may pass), or dead-lettered at once (refused for its content);
- `read`: what a shard read that failed with it gets (consumer.next_step): read again after a
  backoff, a new iterator from the checkpoint, the oldest record (the position was trimmed), a
  look at whether the shard left the stream, or the end of this shard's work (lease lost);
- `peer_trouble`: a whole call to a peer that failed with it is the peer's trouble, not its
  records': retried until it passes (forwarder);
- `peer_keys`: the peer refused our key pair: read it from SSM again;
- `passing`: an operator command may wait it out a few times (ops/tables.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, ParamValidationError


class RecordAction(enum.Enum):
    RETRY = "retry until it passes"
    RETRY_BOUNDED = "retry up to tuning.max_record_attempts, then dead-letter"
    DEAD_LETTER = "dead-letter at once"


class ReadAction(enum.Enum):
    RETRY = "read again after a backoff"
    RENEW_ITERATOR = "a new iterator from the checkpoint"
    FROM_OLDEST = "read from the oldest record and report what was trimmed"
    SHARD_GONE = "look whether the shard left the stream"
    STOP = "stop reading this shard"


class ReplicatorError(Exception):
    """Base of the typed errors; `kind` labels the errors metric."""

    kind = "error"
    record = RecordAction.RETRY_BOUNDED
    read = ReadAction.RETRY
    peer_trouble = False
    peer_keys = False

    @property
    def passing(self) -> bool:
        return self.record is RecordAction.RETRY


class Throttled(ReplicatorError):
    kind = "throttled"
    record = RecordAction.RETRY
    peer_trouble = True


class ExpiredIterator(ReplicatorError):
    """The shard iterator expired (or the emulator rejected it): get a new one from the checkpoint."""

    kind = "expired_iterator"
    record = RecordAction.RETRY
    read = ReadAction.RENEW_ITERATOR


class TrimmedData(ReplicatorError):
    """The checkpoint is older than the stream's retention: records were lost to trimming."""

    kind = "trimmed_data"
    read = ReadAction.FROM_OLDEST


class NotFound(ReplicatorError):
    """A missing resource: a table, queue or stream not (yet) there, a shard gone from its stream."""

    kind = "not_found"
    read = ReadAction.SHARD_GONE
    peer_trouble = True  # a peer's stream is created there, not here


class ConditionFailed(ReplicatorError):
    kind = "condition_failed"


class AccessDenied(ReplicatorError):
    """Refused: a policy, or a key pair revoked, rotated or unknown."""

    kind = "access_denied"
    peer_trouble = True
    peer_keys = True


class Transient(ReplicatorError):
    """A server-side failure worth retrying (5xx, internal failure)."""

    kind = "transient"
    record = RecordAction.RETRY
    read = ReadAction.RENEW_ITERATOR  # the emulator answers a bad iterator with a 500 (docs/design.md §7)
    peer_trouble = True


class Unreachable(ReplicatorError):
    """No answer from the endpoint or the proxy: network, DNS, a call past its deadline."""

    kind = "unreachable"
    record = RecordAction.RETRY
    peer_trouble = True


class ClockSkew(ReplicatorError):
    """The request's signing time is outside what AWS accepts (5 to 15 minutes): this host's clock
    is off. No record's fault and no key's: retried with backoff until the clock is fixed, never
    a reason to dead-letter a record or to read the peer's key pair again. `skew_s`: the
    endpoint's clock minus ours, from its Date header, when known."""

    kind = "clock_skew"
    record = RecordAction.RETRY
    peer_trouble = True

    def __init__(self, message: str, skew_s: float | None = None) -> None:
        super().__init__(message)
        self.skew_s = skew_s


class InvalidRequest(ReplicatorError):
    """The service refuses the request for its content (ValidationException and kin)."""

    kind = "invalid_request"
    record = RecordAction.DEAD_LETTER
    read = ReadAction.RENEW_ITERATOR  # an iterator refused as invalid: take a new one


class Unclassified(ReplicatorError):
    """An error code this table does not know, answered as the caller's fault (4xx). It may pass,
    so a record is retried, but only up to `tuning.max_record_attempts` (retry.py)."""

    kind = "unknown"


class Contended(ReplicatorError):
    """The application kept rewriting an item while replicatord tried to change it: retried a
    bounded number of times per record, like an unknown error."""

    kind = "contended"


class LeaseLost(ReplicatorError):
    """Another instance owns the lease now (fencing): stop working on that shard."""

    kind = "lease_lost"
    read = ReadAction.STOP


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
            # with HTTP 500 (docs/design.md §7): Transient, and the shard consumer takes a new iterator.
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
