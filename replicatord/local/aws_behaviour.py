"""AWS behaviour for the local regions: what AWS does and moto 5.2 does not (docs/design.md §7).

Installed into an emulator process (`emulators.serve --behaviour JSON`), in-process: moto's
backends are Python, so the DynamoDB stream model is replaced and the Kinesis backend wrapped;
a WSGI layer in front of moto adds faults, revoked keys and a control API. Every duration is a
setting, so tests scale AWS's hours down to seconds. What each setting does, as AWS does it:

DynamoDB Streams (https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_streams_GetRecords.html)
- `ApproximateCreationDateTime` rounded down to the second;
- shard rollover every `stream_rollover_s` (about 4 h on AWS): the closed shard gets an
  `EndingSequenceNumber`, its last page has no `NextShardIterator`, and `DescribeStream`
  lists the child with its `ParentShardId` (shards in creation order, paginated);
- retention `stream_retention_s` (24 h): a record older than that is trimmed
  (`TrimmedDataAccessException` for an iterator at or before it), a closed shard leaves
  `DescribeStream` that long after it closed (`ResourceNotFoundException` from then on);
- iterators expire after `stream_iterator_expiry_s` (15 min): `ExpiredIteratorException`;
- at most `stream_reads_per_shard_s` GetRecords per second per shard: `LimitExceededException`;
- a stream disabled and enabled again: the old stream's shards close and it stays readable
  for the retention; the table's `LatestStreamArn` names a new stream;
- TTL deletes (`ttl_sweep`): REMOVE records with `userIdentity` {Type: Service,
  PrincipalId: dynamodb.amazonaws.com}.
Kinesis (https://docs.aws.amazon.com/kinesis/latest/APIReference/API_GetRecords.html)
- at most `kinesis_reads_per_shard_s` GetRecords per second per shard for all consumers
  together (`ProvisionedThroughputExceededException`; the iterator stays valid);
- a share `kinesis_put_throttle_rate` of PutRecords entries refused per entry with
  `ProvisionedThroughputExceededException`;
- iterators expire after `kinesis_iterator_expiry_s` (5 min): `ExpiredIteratorException`;
- retention `kinesis_retention_s` (24 h): older records are trimmed, and an iterator from a
  sequence number before the trim point reads on from the oldest record left, without an
  error (what AWS does: observed in harlow/kinesis-consumer#125, and what AWS's own DynamoDB
  Streams adapter says of Kinesis; no TrimmedDataAccessException).
Every service
- `throttle_rate`, `error_rate` (HTTP 500 before the call) and `error_after_rate` (HTTP 500
  after the call took effect) on calls whose User-Agent contains `faults_user_agent` (the
  daemons' aiobotocore; tests' own boto3 calls are spared unless it is set to "");
- a revoked access key (`revoke`) gets `UnrecognizedClientException` (HTTP 400), as a deleted
  or deactivated IAM key does;
- the region's clock is `clock_offset_s` ahead of the host's: it is every response's `Date`, and
  a request signed further than `signature_window_s` from it (Kinesis and SSM: 5 min, not 15) is
  refused as AWS refuses it; with `iam_record` each request's IAM authorizations are counted per
  access key, and a key given policies in `iam_policies` is refused what they do not allow
  (the answers, and where they come from: local/iam_recorder.py).

Control API, on the emulator's own port: POST /_replicatord/behaviour (JSON: settings to
change), /_replicatord/revoke and /unrevoke ({"access_key_id"}), /_replicatord/ttl-sweep
({"table", "attribute"?}), /_replicatord/rollover ({"table"}), GET /_replicatord/stats (calls
per operation, of all clients and of aiobotocore's (the daemons'), and faults injected),
POST /_replicatord/stats/reset, /_replicatord/iam-calls and /iam-calls/reset. `Control` is its
client (over https too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import functools
import json
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from replicatord.local import iam_recorder
from replicatord.local.aws_state import CONTROL_PREFIX, STATE, TEST_BEHAVIOUR, TESTS_KEY, Behaviour, State
from replicatord.local.kinesis_model import _install_kinesis
from replicatord.local.stream_model import _install_streams, ttl_sweep

__all__ = ["CONTROL_PREFIX", "STATE", "TESTS_KEY", "TEST_BEHAVIOUR", "Behaviour", "Control", "Layer", "State",
           "install"]

# --- the WSGI layer: faults, revoked keys, control ---------------------------------------------

_THROTTLE = {
    "dynamodb": "ProvisionedThroughputExceededException",
    "dynamodbstreams": "LimitExceededException",
    "kinesis": "ProvisionedThroughputExceededException",
    "ssm": "ThrottlingException",
    "sqs": "ThrottlingException",
}
_INTERNAL = {"kinesis": "InternalFailure", "sqs": "InternalError"}
_TARGETS = {"DynamoDB_20120810": "dynamodb", "DynamoDBStreams_20120810": "dynamodbstreams",
            "Kinesis_20131202": "kinesis", "AmazonSSM": "ssm", "AmazonSQS": "sqs"}

StartResponse = Callable[..., Any]


def _json_error(start_response: StartResponse, status: str, code: str, message: str,
                headers: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    body = json.dumps({"__type": code, "message": message}).encode()
    start_response(status, [("Content-Type", "application/x-amz-json-1.1"),
                            ("x-amzn-ErrorType", code.rpartition("#")[2]), ("x-amzn-RequestId", os.urandom(8).hex()),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


# --- the region's clock ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _http_date(epoch_s: int) -> str:
    return email.utils.formatdate(epoch_s, usegmt=True)  # RFC 7231's IMF-fixdate


def _dated(start_response: StartResponse) -> StartResponse:
    """`start_response` with the region's clock as the response's one Date header (the emulator's
    request handler adds its own only to a response without one)."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        headers = [h for h in headers if h[0].lower() != "date"]
        headers.append(("Date", _http_date(int(time.time() + STATE.behaviour.clock_offset_s))))
        return start_response(status, headers, exc_info)

    return start


class Layer:
    """WSGI middleware in front of moto's application."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response = _dated(start_response)
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL_PREFIX):
            return self.control(path[len(CONTROL_PREFIX):], environ, start_response)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        prefix, _, operation = target.partition(".")
        service = _TARGETS.get(prefix)
        if service is None:
            return self.app(environ, start_response)
        name = f"{service}.{operation}"
        STATE.calls[name] += 1
        if "aiobotocore" in environ.get("HTTP_USER_AGENT", ""):
            STATE.daemon_calls[name] += 1
        started = time.perf_counter()
        try:
            return self._serve(service, operation, environ, start_response)
        finally:
            STATE.busy_s[name] += time.perf_counter() - started

    def _serve(self, service: str, operation: str, environ: dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
        b = STATE.behaviour
        stamp = environ.get("HTTP_X_AMZ_DATE")
        if stamp:
            window = b.signature_window_by_service_s.get(service, b.signature_window_s)
            refused = iam_recorder.signature_time_refusal(service, stamp, time.time() + b.clock_offset_s, window)
            if refused is not None:
                STATE.faults["signature_time"] += 1
                return _json_error(start_response, refused.status, refused.type, refused.message, refused.headers)
        credential = iam_recorder.credential(environ.get("HTTP_AUTHORIZATION", ""))
        unknown = (b.iam_known_keys_only and credential is not None
                   and credential.access_key not in b.iam_policies and credential.access_key != TESTS_KEY)
        if credential is not None and (credential.access_key in STATE.revoked or unknown):
            STATE.faults["revoked_key" if not unknown else "unknown_key"] += 1
            return _json_error(start_response, "400 Bad Request", "UnrecognizedClientException",
                               "The security token included in the request is invalid.")
        if credential is not None and (b.iam_record or credential.access_key in b.iam_policies):
            record = STATE.iam_calls if b.iam_record else None
            refused = iam_recorder.authorize(service, operation, credential, environ, record, b.iam_policies)
            if refused is not None:
                STATE.faults["iam_denied"] += 1
                return _json_error(start_response, refused.status, refused.type, refused.message, refused.headers)
        if b.faults_user_agent not in environ.get("HTTP_USER_AGENT", ""):
            return self.app(environ, start_response)
        draw = STATE.random.random()
        if draw < b.throttle_rate:
            STATE.faults[f"{service}.throttled"] += 1
            return _json_error(start_response, "400 Bad Request", _THROTTLE[service], "Rate exceeded")
        draw -= b.throttle_rate
        internal = _INTERNAL.get(service, "InternalServerError")
        if draw < b.error_rate:
            STATE.faults[f"{service}.error_before"] += 1
            return _json_error(start_response, "500 Internal Server Error", internal, "Internal server error")
        draw -= b.error_rate
        if draw < b.error_after_rate:
            STATE.faults[f"{service}.error_after"] += 1
            for _ in self.app(environ, lambda *args, **kwargs: None):  # the call takes effect
                pass
            return _json_error(start_response, "500 Internal Server Error", internal, "Internal server error")
        return self.app(environ, start_response)

    def control(self, command: str, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            request = json.loads(environ["wsgi.input"].read(length) or b"{}")
            result = self._command(command, request)
        except (ValueError, KeyError, TypeError) as exc:
            body = json.dumps({"error": str(exc)}).encode()
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [body]
        body = json.dumps(result).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def _command(self, command: str, request: dict[str, Any]) -> Any:
        if command == "behaviour":
            STATE.behaviour.update(request)
            if "seed" in request:
                STATE.random.seed(request["seed"])
            return dataclasses.asdict(STATE.behaviour)
        if command == "revoke":
            STATE.revoked.add(request["access_key_id"])
            return {"revoked": len(STATE.revoked)}
        if command == "unrevoke":
            STATE.revoked.discard(request["access_key_id"])
            return {"revoked": len(STATE.revoked)}
        if command == "ttl-sweep":
            return {"deleted": ttl_sweep(request["table"], request.get("attribute"), request.get("now"))}
        if command == "rollover":
            rolled = 0
            for (table, _), stream in STATE.streams.items():
                if table == request["table"] and stream.disabled_at is None:
                    stream.rollover()
                    rolled += 1
            return {"rolled_over": rolled}
        if command == "stats":
            return {"calls": dict(STATE.calls), "daemon_calls": dict(STATE.daemon_calls), "faults": dict(STATE.faults),
                    "busy_s": {name: round(s, 3) for name, s in STATE.busy_s.items()}}
        if command == "iam-calls":
            return iam_recorder.entries(STATE.iam_calls)
        if command == "iam-calls/reset":
            STATE.iam_calls.clear()
            return {}
        if command == "stats/reset":
            STATE.calls.clear()
            STATE.busy_s.clear()
            STATE.daemon_calls.clear()
            STATE.faults.clear()
            return {}
        raise ValueError(f"unknown command {command!r}")


def install(app: Callable[..., Iterable[bytes]], behaviour: Behaviour) -> Layer:
    """Patch moto in this process and return `app` wrapped in the layer."""
    STATE.behaviour = behaviour
    STATE.random.seed(behaviour.seed)
    _install_streams()
    _install_kinesis()
    return Layer(app)


# --- the client ----------------------------------------------------------------------------------


class Control:
    """Drives the layer of one emulator (one region) from a test or the demo. An https emulator's
    certificate is trusted from `ca_bundle`, else from AWS_CA_BUNDLE (as botocore trusts it)."""

    def __init__(self, endpoint_url: str, ca_bundle: str | None = None) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if self.endpoint_url.startswith("https:"):
            self._ssl = ssl.create_default_context(cafile=ca_bundle or os.environ.get("AWS_CA_BUNDLE") or None)

    def _post(self, command: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.endpoint_url}{CONTROL_PREFIX}{command}", data=json.dumps(body or {}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30, context=self._ssl) as response:  # noqa: S310 - loopback
            return json.loads(response.read())

    def behaviour(self, **changes: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._post("behaviour", changes)
        return result

    def revoke(self, access_key_id: str) -> None:
        self._post("revoke", {"access_key_id": access_key_id})

    def unrevoke(self, access_key_id: str) -> None:
        self._post("unrevoke", {"access_key_id": access_key_id})

    def ttl_sweep(self, table: str, attribute: str | None = None) -> int:
        return int(self._post("ttl-sweep", {"table": table, "attribute": attribute})["deleted"])

    def rollover(self, table: str) -> int:
        return int(self._post("rollover", {"table": table})["rolled_over"])

    def stats(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self._post("stats")
        return result

    def reset_stats(self) -> None:
        self._post("stats/reset")

    def iam_calls(self) -> list[dict[str, Any]]:
        """The IAM authorizations recorded (`iam_record`): one entry per access key and
        iam.Call, {access_key, caller, action, resource, context, count}: `caller` is the region
        whose settings made the client (iam_recorder.caller_region); iam_recorder.call_of makes
        the Call of one."""
        result: list[dict[str, Any]] = self._post("iam-calls")
        return result

    def reset_iam_calls(self) -> None:
        self._post("iam-calls/reset")

    @contextlib.contextmanager
    def changed(self, **changes: Any) -> Iterator[None]:
        """Change settings for the duration of a block."""
        before = self.behaviour()
        self.behaviour(**changes)
        try:
            yield
        finally:
            self.behaviour(**{name: before[name] for name in changes})
