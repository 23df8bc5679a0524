"""IAM for the local regions: how AWS authenticates a request's signature time, and the
authorizations it makes for the request, recorded per access key and checked against the policies
a test gives a key (aws_behaviour's `clock_offset_s`, `iam_record` and `iam_policies` settings).

`signature_time_refusal` is AWS's answer to a request whose X-Amz-Date is outside the service's
window around the region's clock: `InvalidSignatureException` (HTTP 400) "Signature expired: T is
now earlier than NOW-W (NOW - N min.)" or "Signature not yet current: T is still later than NOW+W
(NOW + N min.)" (aws/aws-sdk-js#254 and praetorian-inc/chariot-ui#453 for DynamoDB,
aws/aws-sdk-go#2194 for Kinesis, middyjs/middy#1123 for SSM); SQS answers `SignatureDoesNotMatch`
with HTTP 403 and the same message (aws/aws-sdk-go#487, aws/aws-sdk-php#642), over its JSON
protocol in the `x-amzn-query-error` header botocore takes the code from.

`calls_for` maps one JSON-protocol request (the X-Amz-Target operation and its JSON body) to the
`replicatord.iam.Call`s IAM evaluates for it, resources as ARNs in the region and partition of
the request's SigV4 credential scope, in moto's account. A request may need several: one per
table of a batch, one per item of a transaction, and the KMS calls SSM makes on the caller's
behalf for a SecureString (https://docs.aws.amazon.com/kms/latest/developerguide/services-parameter-store.html:
kms:Decrypt / kms:Encrypt / kms:GenerateDataKey with kms:ViaService and the
PARAMETER_ARN encryption context).

`refusal` is the answer AWS gives the first call no policy allows, in the service's error shape:
HTTP 400 AccessDeniedException "User: ARN is not authorized to perform: ACTION on resource: ARN
because no identity-based policy allows the ACTION action" (or "... with an explicit deny in an
identity-based policy"), except SQS's JSON protocol, which answers as its Query protocol did: HTTP
403, `x-amzn-query-error: AccessDenied;Sender`, from which botocore takes the code `AccessDenied`
(https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-json-api-responses.html),
and the action in lower case ("sqs:sendmessage": an answer captured from AWS in Floci's design
notes on resource-policy enforcement).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import functools
import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from replicatord.config import CALLER_TAG, partition_of
from replicatord.iam import Call, PolicyError, decide


@functools.cache
def account_id() -> str:
    """moto's account: every resource the emulator holds is in it."""
    from moto.core.models import DEFAULT_ACCOUNT_ID

    return str(DEFAULT_ACCOUNT_ID)


@dataclass(frozen=True)
class Scope:
    """Where a request's resources live: its credential scope's region, that region's partition,
    moto's account."""

    partition: str
    region: str
    account: str

    def arn(self, service: str, resource: str) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{self.account}:{resource}"


@functools.cache
def scope_of(region: str) -> Scope:
    return Scope(partition_of(region), region, account_id())


class Credential(NamedTuple):
    """The SigV4 credential of a request: `Credential=AKID/DATE/REGION/SERVICE/aws4_request`."""

    access_key: str
    region: str
    service: str


def credential(authorization: str) -> Credential | None:
    marker = authorization.find("Credential=")
    if marker < 0:
        return None
    parts = authorization[marker + 11:].split(",", 1)[0].split("/")
    if len(parts) < 4:
        return None
    return Credential(parts[0].strip(), parts[2], parts[3])


def json_body(environ: dict[str, Any]) -> dict[str, Any]:
    """A WSGI request's JSON body, read once: the application gets the bytes in a fresh stream."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    raw = environ["wsgi.input"].read(length) if length > 0 else b""
    environ["wsgi.input"] = io.BytesIO(raw)
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Refusal(NamedTuple):
    """An error answer: HTTP status, the body's __type and message, extra headers."""

    status: str
    type: str
    message: str
    headers: tuple[tuple[str, str], ...]


# --- the signature's time -------------------------------------------------------------------------


def _amz_seconds(stamp: str) -> int | None:
    """Epoch seconds of an X-Amz-Date (20260101T000000Z); None if it is not one."""
    if len(stamp) != 16 or stamp[8] != "T":
        return None
    try:
        return calendar.timegm((int(stamp[0:4]), int(stamp[4:6]), int(stamp[6:8]),
                                int(stamp[9:11]), int(stamp[11:13]), int(stamp[13:15]), 0, 0, 0))
    except ValueError:
        return None


def _stamp(epoch_s: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch_s))


def signature_time_refusal(service: str, amz_date: str, now: float, window_s: float) -> Refusal | None:
    """AWS's answer to a request to `service` signed at `amz_date` (X-Amz-Date) that reaches a
    region whose clock reads `now`, if it is more than `window_s` away; None if it is not."""
    signed = _amz_seconds(amz_date)
    if signed is None:
        return None
    minutes = f"{window_s / 60:g}"
    if signed < now - window_s:
        message = (f"Signature expired: {amz_date} is now earlier than {_stamp(now - window_s)} "
                   f"({_stamp(now)} - {minutes} min.)")
    elif signed > now + window_s:
        message = (f"Signature not yet current: {amz_date} is still later than {_stamp(now + window_s)} "
                   f"({_stamp(now)} + {minutes} min.)")
    else:
        return None
    if service == "sqs":
        return Refusal("403 Forbidden", "com.amazon.coral.service#InvalidSignatureException", message,
                       (("x-amzn-query-error", "SignatureDoesNotMatch;Sender"),))
    code = "InvalidSignatureException" if service == "kinesis" else "com.amazon.coral.service#InvalidSignatureException"
    return Refusal("400 Bad Request", code, message, ())


# --- what each request needs --------------------------------------------------------------------


def _unique(calls: list[Call]) -> list[Call]:
    return list(dict.fromkeys(calls))


def _table(scope: Scope, name: str, index: str | None = None) -> str:
    arn = name if name.startswith("arn:") else scope.arn("dynamodb", f"table/{name}")
    return f"{arn}/index/{index}" if index else arn


_TRANSACT_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                     "ConditionCheck": "ConditionCheckItem", "Get": "GetItem"}


def _dynamodb(operation: str, body: Mapping[str, Any], scope: Scope) -> list[Call]:
    action = f"dynamodb:{operation}"
    if operation in ("BatchGetItem", "BatchWriteItem"):
        return [Call(action, _table(scope, name)) for name in body.get("RequestItems") or {}]
    if operation in ("TransactWriteItems", "TransactGetItems"):
        calls = []
        for item in body.get("TransactItems") or []:
            for kind, detail in item.items():
                if kind in _TRANSACT_ACTIONS and isinstance(detail, Mapping):
                    calls.append(Call(f"dynamodb:{_TRANSACT_ACTIONS[kind]}",
                                      _table(scope, str(detail.get("TableName", "")))))
        return _unique(calls)
    table = body.get("TableName")
    if table:
        index = body.get("IndexName") if operation in ("Query", "Scan") else None
        return [Call(action, _table(scope, str(table), index))]
    # TagResource, ListTagsOfResource, ...: the ARN given; ListTables, DescribeLimits: none.
    return [Call(action, str(body.get("ResourceArn") or "*"))]


def _dynamodb_streams(operation: str, body: Mapping[str, Any], scope: Scope) -> list[Call]:
    action = f"dynamodb:{operation}"  # DynamoDB Streams' actions are DynamoDB's
    if operation == "GetRecords":
        # The layer's own iterator: "stream ARN|shard|position|issued" (stream_model._iterator).
        arn = str(body.get("ShardIterator", "")).split("|", 1)[0]
        return [Call(action, arn if arn.startswith("arn:") else "*")]
    return [Call(action, str(body.get("StreamArn") or "*"))]


def _kinesis_iterator_stream(iterator: str) -> str | None:
    """The stream name in an iterator the layer handed out: moto's base64 of
    "stream:shard:sequence", with "~issued" after it (kinesis_model._wrap)."""
    inner = iterator.rpartition("~")[0] or iterator
    try:
        text = base64.b64decode(inner).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    name = text.split(":", 1)[0]
    return name or None


def _kinesis(operation: str, body: Mapping[str, Any], scope: Scope) -> list[Call]:
    action = f"kinesis:{operation}"
    if body.get("ConsumerARN"):
        return [Call(action, str(body["ConsumerARN"]))]
    if body.get("StreamARN"):
        return [Call(action, str(body["StreamARN"]))]
    name = body.get("StreamName")
    if not name and operation == "GetRecords":
        name = _kinesis_iterator_stream(str(body.get("ShardIterator", "")))
    # ListShards with only a NextToken: moto's token names a shard, not the stream.
    return [Call(action, scope.arn("kinesis", f"stream/{name}") if name else "*")]


_SQS_BATCHES = {"DeleteMessageBatch": "DeleteMessage", "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
                "SendMessageBatch": "SendMessage"}


def _sqs(operation: str, body: Mapping[str, Any], scope: Scope) -> list[Call]:
    action = f"sqs:{_SQS_BATCHES.get(operation, operation)}"
    url = body.get("QueueUrl")
    name = str(url).rstrip("/").rsplit("/", 1)[-1] if url else body.get("QueueName")
    return [Call(action, scope.arn("sqs", str(name)) if name else "*")]


def parameter_arn(scope: Scope, name: str) -> str:
    """The ARN of an SSM parameter, given its name or ARN, with any ":version" or ":label" off."""
    if name.startswith("arn:"):
        head = name.split(":", 5)
        return ":".join([*head[:5], head[5].split(":", 1)[0]]) if len(head) == 6 else name
    base = name.split(":", 1)[0]
    return scope.arn("ssm", "parameter" + (base if base.startswith("/") else f"/{base}"))


def _kms_key_arn(scope: Scope, key_id: str) -> str:
    """KMS authorizes a call on the key's ARN, also when the caller named an alias (such as SSM's
    default, alias/aws/ssm): an alias stands for a key id of its own here, the same each time."""
    if key_id.startswith("arn:") and ":alias/" not in key_id:
        return key_id
    if key_id.startswith(("alias/", "arn:")):
        alias = key_id if key_id.startswith("arn:") else scope.arn("kms", key_id)
        return scope.arn("kms", f"key/{uuid.uuid5(uuid.NAMESPACE_URL, alias)}")
    return scope.arn("kms", f"key/{key_id}")


def _kms_calls(actions: Sequence[str], scope: Scope, key_id: str, parameter: str) -> list[Call]:
    context = (("kms:ViaService", f"ssm.{scope.region}.amazonaws.com"),
               ("kms:EncryptionContext:PARAMETER_ARN", parameter))
    return [Call(action, _kms_key_arn(scope, key_id), context) for action in actions]


def moto_secure_key(scope: Scope, name: str) -> str | None:
    """The KMS key id moto holds for a SecureString parameter; None if not one (or no such)."""
    from moto.core.exceptions import JsonRESTError
    from moto.ssm.models import ssm_backends

    try:
        found = ssm_backends[scope.account][scope.region].get_parameter(name)
    except JsonRESTError:
        return None
    if found is None or found.parameter_type != "SecureString":
        return None
    return str(found.keyid or "alias/aws/ssm")


SecureKey = Callable[[Scope, str], "str | None"]


def _ssm(operation: str, body: Mapping[str, Any], scope: Scope, secure_key: SecureKey) -> list[Call]:
    action = f"ssm:{operation}"
    if "Names" in body:
        names = [str(n) for n in body.get("Names") or []]
    elif "Name" in body:
        names = [str(body["Name"])]
    elif body.get("Path"):
        path = str(body["Path"])
        return [Call(action, parameter_arn(scope, path.rstrip("/") or "/"))]
    else:
        return [Call(action, "*")]
    calls = []
    for name in names:
        arn = parameter_arn(scope, name)
        calls.append(Call(action, arn))
        if operation in ("GetParameter", "GetParameters") and body.get("WithDecryption"):
            key = secure_key(scope, name)
            if key is not None:
                calls += _kms_calls(["kms:Decrypt"], scope, key, arn)
        elif operation == "PutParameter" and body.get("Type") == "SecureString":
            key = str(body.get("KeyId") or secure_key(scope, name) or "alias/aws/ssm")
            calls += _kms_calls(["kms:Encrypt", "kms:GenerateDataKey"], scope, key, arn)
    return _unique(calls)


def calls_for(service: str, operation: str, body: Mapping[str, Any], scope: Scope,
              secure_key: SecureKey = moto_secure_key) -> list[Call]:
    """The IAM authorizations AWS makes for one request to `service` (the layer's name for it:
    dynamodb, dynamodbstreams, kinesis, sqs, ssm). `secure_key` finds a SecureString's KMS key
    (moto's SSM backend by default)."""
    if service == "dynamodb":
        return _dynamodb(operation, body, scope)
    if service == "dynamodbstreams":
        return _dynamodb_streams(operation, body, scope)
    if service == "kinesis":
        return _kinesis(operation, body, scope)
    if service == "sqs":
        return _sqs(operation, body, scope)
    if service == "ssm":
        return _ssm(operation, body, scope, secure_key)
    raise ValueError(f"no IAM mapping for service {service!r}")


# --- recording ----------------------------------------------------------------------------------


def caller_region(user_agent: str) -> str:
    """The region whose daemon or operator command made a request, from the tag `aws.Aws` puts in
    its User-Agent ("" for a client without it)."""
    marker = user_agent.find(CALLER_TAG)
    return user_agent[marker + len(CALLER_TAG):].split(" ", 1)[0] if marker >= 0 else ""


def entries(recorded: Mapping[tuple[str, str, Call], int]) -> list[dict[str, Any]]:
    """The recorded calls as the control API answers them, in a stable order."""
    out = [{"access_key": key, "caller": caller, "action": call.action, "resource": call.resource,
            "context": dict(call.context), "count": count} for (key, caller, call), count in recorded.items()]
    return sorted(out, key=lambda e: (e["access_key"], e["caller"], e["action"], e["resource"],
                                      sorted(e["context"].items())))


def call_of(entry: Mapping[str, Any]) -> Call:
    """The Call of one entry of `entries` (of Control.iam_calls())."""
    context = tuple((str(k), str(v)) for k, v in entry["context"].items())
    return Call(str(entry["action"]), str(entry["resource"]), context)


# --- enforcement ----------------------------------------------------------------------------------


def refusal(policy: Mapping[str, Any] | Sequence[Mapping[str, Any]], access_key: str, calls: Sequence[Call],
            scope: Scope, service: str) -> Refusal | None:
    """AWS's answer to the first of `calls` that `policy` (a key's document or list of documents)
    does not allow, or None if it allows them all. Raises iam.PolicyError for a policy the
    evaluator cannot judge."""
    documents = [policy] if isinstance(policy, Mapping) else list(policy)
    for call in calls:
        verdict = decide(documents, call)
        if verdict == "allow":
            continue
        action = call.action
        if service == "sqs" and action.startswith("sqs:"):
            action = action.lower()  # as SQS writes it (see above)
        user = f"arn:{scope.partition}:iam::{scope.account}:user/{access_key}"
        why = ("with an explicit deny in an identity-based policy" if verdict == "deny"
               else f"because no identity-based policy allows the {action} action")
        message = f"User: {user} is not authorized to perform: {action} on resource: {call.resource} {why}"
        if service == "sqs":
            return Refusal("403 Forbidden", "com.amazon.coral.service#AccessDeniedException", message,
                           (("x-amzn-query-error", "AccessDenied;Sender"),))
        return Refusal("400 Bad Request", "com.amazon.coral.service#AccessDeniedException", message, ())
    return None


def authorize(service: str, operation: str, credential: Credential, environ: dict[str, Any],
              record: Counter[tuple[str, str, Call]] | None, policies: Mapping[str, Any]) -> Refusal | None:
    """Count the request's IAM calls in `record` (if given); AWS's refusal if the policies of its
    key in `policies` do not allow one of them (a key without any is not checked)."""
    scope = scope_of(credential.region)
    calls = calls_for(service, operation, json_body(environ), scope)
    if record is not None:
        caller = caller_region(environ.get("HTTP_USER_AGENT", ""))
        for call in calls:
            record[credential.access_key, caller, call] += 1
    policy = policies.get(credential.access_key)
    if policy is None:
        return None
    try:
        return refusal(policy, credential.access_key, calls, scope, service)
    except PolicyError as exc:
        return Refusal("400 Bad Request", "PolicyError",
                       f"the emulator cannot judge {credential.access_key}'s policy: {exc}", ())
