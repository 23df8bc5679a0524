"""AWS clients: the local region's (default credential chain) and each peer's Kinesis.

A peer's Kinesis client uses the peer's proxy and, for a peer in another partition, that
partition's key pair, read from SSM Parameter Store in the local region (the local region's
credentials never go across the border); a peer in the same partition is reached with the
instance's own role, like the local region.

Every call goes through `Aws.call`, which bounds it end to end (connection from the pool, the
proxy's CONNECT, the request, the answer and botocore's own retries, all within one deadline:
`tuning.aws_timeout_s`, or half the failover time for the lease client), times it, samples the
endpoint's clock, and maps its errors (errors.classify). A border that drops packets silently
costs a call its deadline and no more (docs/aws-behaviour.md, "Deadlines").
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import time
from contextlib import AsyncExitStack
from typing import Any, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from replicatord.backoff import backoff_s
from replicatord.config import CALLER_TAG, ConfigError, Settings, Tuning, proxy_with_password, redact_url
from replicatord.errors import (
    AWS_ERRORS,
    ClockSkew,
    NotFound,
    ReplicatorError,
    Throttled,
    Unreachable,
    classify,
    server_skew_s,
)
from replicatord.metrics import Metrics

log = logging.getLogger(__name__)

LOCAL_SERVICES = ("dynamodb", "dynamodbstreams", "kinesis", "sqs", "ssm")
LEASES = "leases"  # the DynamoDB client of the lease table (Aws.local)
# The endpoint's clock is read off the Date header of an answer at most this often per region.
SKEW_SAMPLE_S = 10.0
# BatchGetItem rounds for the keys DynamoDB left unprocessed, with backoff between them.
BATCH_ROUNDS = 10
# A clock this far off is logged: AWS refuses signatures 5 minutes off (Kinesis, SSM) or 15
# (DynamoDB, SQS, STS), and versions stamped by a skewed clock win or lose wrongly long before.
SKEW_LOG_S = 60.0


class StartupError(Exception):
    """A fatal problem found before any task starts; the message is one line."""


PR_SET_DUMPABLE = 4


def make_non_dumpable() -> bool:
    """Make this process non-dumpable (Linux prctl): no core file, and no ptrace or /proc/<pid>/mem
    reads by other processes of the same user, so a peer's secret key read here stays here
    whatever the host's core handler does with LimitCORE. Every process that reads the secret
    calls it (the daemon at start, and `Aws` before it reads SSM: status, dlq redrive, preflight,
    provision). False where prctl is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def peer_credential_names(prefix: str) -> tuple[str, str]:
    return f"{prefix}AccessKey", f"{prefix}SecretKey"


class Aws:
    """Owns the aiobotocore clients of one daemon. Use as an async context manager."""

    def __init__(self, settings: Settings, metrics: Metrics, profile: str | None = None) -> None:
        """`profile`: a named AWS profile for this region's clients (operator commands that work in
        two partitions at once); the daemon uses the default chain (instance profile)."""
        self.settings = settings
        self.metrics = metrics
        self._stack = AsyncExitStack()
        self._session = get_session()
        if profile:
            self._session.set_config_variable("profile", profile)
        self.local: dict[str, Any] = {}
        self.peers: dict[str, Any] = {}  # peer region -> its current Kinesis client
        self._peer_contexts: dict[str, Any] = {}  # peer region -> what closes its current client
        self._retired: list[tuple[float, Any]] = []  # (close after, context) of replaced peer clients
        self._peer_digests: dict[str, bytes] = {}
        self._peer_refreshed: dict[str, float] = {}
        self._peer_locks: dict[str, asyncio.Lock] = {}
        # id(client) -> (the region it talks to, its deadline per call)
        self._endpoints: dict[int, tuple[str, float]] = {}
        self._skew_sampled: dict[str, float] = {}
        self._skew_logged: dict[str, float] = {}

    def _config(self, proxy: str | None = None, timeout_s: float | None = None, pool: int = 64) -> AioConfig:
        tuning = self.settings.topology.tuning
        timeout_s = timeout_s or tuning.aws_timeout_s
        return AioConfig(
            connect_timeout=min(5.0, timeout_s),
            read_timeout=timeout_s,
            retries={"mode": "standard", "max_attempts": 3},
            # Never None: botocore then reads HTTP(S)_PROXY from the environment.
            proxies={"http": proxy, "https": proxy} if proxy else {},
            max_pool_connections=pool,
            # Which region's daemon or operator command made a call, as CloudTrail's userAgent shows
            # it (a peer's stream is written with this region's identity; the local IAM check reads it).
            user_agent_extra=f"{CALLER_TAG}{self.settings.region}",
        )

    async def __aenter__(self) -> Aws:
        me = self.settings.me
        region = self.settings.region
        tuning = self.settings.topology.tuning
        for service in LOCAL_SERVICES:
            self.local[service] = await self._stack.enter_async_context(
                self._session.create_client(
                    service,  # type: ignore[call-overload]
                    region_name=region,
                    endpoint_url=me.endpoint_url,
                    config=self._config(),
                )
            )
            self._endpoints[id(self.local[service])] = (region, tuning.aws_timeout_s)
        # Lease calls on connections of their own, each within half the failover time: a renewal
        # never waits behind apply traffic, nor longer than the lease can afford.
        lease_deadline_s = tuning.failover_s / 2
        self.local[LEASES] = await self._stack.enter_async_context(
            self._session.create_client(
                "dynamodb",
                region_name=region,
                endpoint_url=me.endpoint_url,
                config=self._config(timeout_s=lease_deadline_s, pool=16),
            )
        )
        self._endpoints[id(self.local[LEASES])] = (region, lease_deadline_s)
        return self

    async def open_local(self, service: str) -> Any:
        """Another client of this region (closed with the others), for a service the daemon does
        not use (STS for `preflight`)."""
        client = await self._stack.enter_async_context(self._session.create_client(
            service,  # type: ignore[call-overload]
            region_name=self.settings.region, endpoint_url=self.settings.me.endpoint_url, config=self._config()))
        self._endpoints[id(client)] = (self.settings.region, self.settings.topology.tuning.aws_timeout_s)
        return client

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close_retired(everything=True)
            for context in self._peer_contexts.values():
                await context.__aexit__(None, None, None)
            self._peer_contexts.clear()
        finally:
            await self._stack.aclose()

    async def close_retired(self, everything: bool = False) -> int:
        """Close the clients of replaced key pairs whose calls have all ended: every call ends
        within its deadline, so a client retired that long ago has none left. Returns how many."""
        now = time.monotonic()
        due = [(at, context) for at, context in self._retired if everything or at <= now]
        self._retired = [(at, context) for at, context in self._retired if not (everything or at <= now)]
        for _, context in due:
            await context.__aexit__(None, None, None)
        return len(due)

    async def open_peer(self, peer: str) -> Any:
        """Kinesis client for `peer`, with its proxy: with the instance's own role in the same
        partition, else with the peer partition's key pair from SSM."""
        target = self.settings.topology.regions[peer]
        if self.settings.peer_uses_own_role(peer):
            client = await self._peer_client(peer, None)
            log.info("peer %s: kinesis via %s, with this instance's own role (same partition)", peer,
                     redact_url(target.proxy) if target.proxy else "direct connection")
            return client
        if target.credentials is None:
            raise StartupError(
                f"regions.{peer}.credentials: missing; a daemon in {self.settings.region} needs an "
                f"ssm_prefix to authenticate in {peer} (another partition)"
            )
        keys = await self._peer_keys(peer)
        client = await self._peer_client(peer, keys)
        log.info(
            "peer %s: kinesis via %s, credentials from SSM %s* in %s",
            peer,
            redact_url(target.proxy) if target.proxy else "direct connection",
            target.credentials.ssm_prefix,
            self.settings.region,
        )
        return client

    async def _peer_keys(self, peer: str) -> tuple[str, str]:
        """Both halves read with decryption: SSM ignores it for a String and needs it for a
        SecureString, and operators store the access key id either way."""
        credentials = self.settings.topology.regions[peer].credentials
        assert credentials is not None
        make_non_dumpable()  # whichever command reads the secret (the daemon, status, dlq, preflight)
        access_name, secret_name = peer_credential_names(credentials.ssm_prefix)
        return (await self.read_parameter(access_name, decrypt=True),
                await self.read_parameter(secret_name, decrypt=True))

    async def _peer_client(self, peer: str, keys: tuple[str, str] | None) -> Any:
        """A Kinesis client for `peer`: with `keys`, or (None) the default chain, as local clients."""
        target = self.settings.topology.regions[peer]
        try:
            proxy = proxy_with_password(peer, target, os.environ)
        except ConfigError as exc:
            raise StartupError(exc.lines[0]) from None
        explicit = {"aws_access_key_id": keys[0], "aws_secret_access_key": keys[1]} if keys else {}
        context = self._session.create_client(
            "kinesis",  # type: ignore[call-overload]
            region_name=peer,
            endpoint_url=target.endpoint_url,
            config=self._config(proxy),
            **explicit,
        )
        client = await context.__aenter__()
        self._endpoints[id(client)] = (peer, self.settings.topology.tuning.aws_timeout_s)
        replaced = self._peer_contexts.get(peer)
        if replaced is not None:
            # Calls already under way finish with it, each within its deadline; then it is closed.
            self._retired.append((time.monotonic() + self.settings.topology.tuning.aws_timeout_s + 1.0, replaced))
        self._peer_contexts[peer] = context
        self.peers[peer] = client
        if keys:
            # Only a digest is kept, to tell whether SSM holds another pair; never the keys themselves.
            self._peer_digests[peer] = hashlib.sha256("\0".join(keys).encode()).digest()
        return client

    async def refresh_peer(self, peer: str) -> bool:
        """After the peer refused our key pair (rotated, revoked, expired): read the pair from SSM
        again, at most every `tuning.peer_credentials_refresh_s`, and use it if it changed.
        True if a new pair is in use. Calls already under way finish with the old client."""
        if self.settings.peer_uses_own_role(peer):
            return False  # the instance's own role: its credentials refresh by themselves
        lock = self._peer_locks.setdefault(peer, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            every_s = self.settings.topology.tuning.peer_credentials_refresh_s
            if now - self._peer_refreshed.get(peer, -float("inf")) < every_s:
                return False
            self._peer_refreshed[peer] = now
            try:
                keys = await self._peer_keys(peer)
            except StartupError as exc:
                log.warning("peer %s: cannot read the key pair from SSM again: %s", peer, exc)
                return False
            if hashlib.sha256("\0".join(keys).encode()).digest() == self._peer_digests.get(peer):
                log.warning("peer %s: refused our key pair, and SSM holds the same pair: rotate it there "
                            "('replicatord provision --store-peer-credentials')", peer)
                return False
            await self._peer_client(peer, keys)
            self.metrics.peer_credentials_refreshed.labels(peer).inc()
            log.info("peer %s: a new key pair from SSM is in use", peer)
            return True

    async def read_parameter(self, name: str, decrypt: bool) -> str:
        try:
            result = await self.call("ssm", "get_parameter", Name=name, WithDecryption=decrypt)
        except NotFound:
            raise StartupError(
                f"SSM parameter {name} not found in {self.settings.region}: store the peer's key pair "
                "with 'replicatord provision --store-peer-credentials'"
            ) from None
        except ReplicatorError as exc:
            raise StartupError(f"SSM parameter {name} in {self.settings.region}: {exc}") from None
        value = result["Parameter"]["Value"]
        if not isinstance(value, str) or not value:
            raise StartupError(f"SSM parameter {name} in {self.settings.region} is empty")
        return value

    def deadline_s(self, client: Any) -> float:
        """How long one call on `client` may take, from asking for a connection to the answer."""
        return self._endpoints.get(id(client), (self.settings.region, self.settings.topology.tuning.aws_timeout_s))[1]

    async def call(self, service: str, operation: str, *, client: Any = None, **kwargs: Any) -> Any:
        """Call `operation` on the local `service` client (or `client`), ended within the client's
        deadline whatever the network does; raise ReplicatorError (Unreachable past the deadline)."""
        target = client if client is not None else self.local[service]
        region, deadline_s = self._endpoints.get(id(target), (self.settings.region,
                                                               self.settings.topology.tuning.aws_timeout_s))
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline_s):
                result = await getattr(target, operation)(**kwargs)
        except TimeoutError:
            raise Unreachable(f"{region} {service} {operation}: no answer within {deadline_s:g}s") from None
        except AWS_ERRORS as exc:
            error = classify(exc)
            if isinstance(error, ClockSkew):
                self._clock_skewed(region, service, error)
            raise error from exc
        finally:
            self.metrics.aws_request.labels(service, operation).observe(time.monotonic() - started)
        if started - self._skew_sampled.get(region, -SKEW_SAMPLE_S) >= SKEW_SAMPLE_S and isinstance(result, dict):
            self._sample_skew(region, service, result)
        return result

    def _sample_skew(self, region: str, service: str, result: dict[str, Any]) -> None:
        skew_s = server_skew_s(result)
        if skew_s is None:
            return
        self._skew_sampled[region] = time.monotonic()
        self.metrics.clock_skew.labels(region).set(skew_s)
        if abs(skew_s) >= SKEW_LOG_S:
            self._log_skew(region, service, skew_s, refused=False)

    def _clock_skewed(self, region: str, service: str, error: ClockSkew) -> None:
        """A request refused for its signing time: the metric, and one line a minute per region."""
        self.metrics.errors.labels("aws", error.kind).inc()
        if error.skew_s is not None:
            self._skew_sampled[region] = time.monotonic()
            self.metrics.clock_skew.labels(region).set(error.skew_s)
        self._log_skew(region, service, error.skew_s, refused=True)

    def _log_skew(self, region: str, service: str, skew_s: float | None, refused: bool) -> None:
        now = time.monotonic()
        if now - self._skew_logged.get(region, -SKEW_LOG_S) < SKEW_LOG_S:
            return
        self._skew_logged[region] = now
        endpoint = self.endpoint_of(region, service)
        measured = f"{skew_s:+.0f}s" if skew_s is not None else "unknown (no Date header)"
        if refused:
            log.error("clock skew: %s refused a request signed by this host's clock (its clock minus ours: "
                      "%s); AWS accepts 5 to 15 minutes depending on the service. Fix the host's time "
                      "(chrony/NTP); calls are retried until then", endpoint, measured)
        else:
            log.warning("clock skew: %s's clock minus this host's is %s; fix the host's time (chrony/NTP) "
                        "before AWS refuses its signatures (5 minutes off for Kinesis and SSM)", endpoint, measured)

    def endpoint_of(self, region: str, service: str) -> str:
        """The endpoint a service of `region` is reached at, for log lines."""
        target = self.settings.topology.regions.get(region)
        if target is not None and target.endpoint_url:
            return f"{service} {redact_url(target.endpoint_url)} ({region})"
        return f"{service}.{region} (AWS)"


class Caller(Protocol):
    async def call(self, service: str, operation: str, *, client: Any = None, **kwargs: Any) -> Any: ...


async def batch_get_item(aws: Caller, request: dict[str, Any], tuning: Tuning) -> dict[str, list[dict[str, Any]]]:
    """BatchGetItem of `request` (RequestItems) until DynamoDB has answered every key: what it
    leaves unprocessed (throttling, or 16 MB per call) is asked again after a jittered, growing
    wait (backoff_s), as AWS asks, at most BATCH_ROUNDS times (then Throttled). Items by table."""
    found: dict[str, list[dict[str, Any]]] = {}
    for attempt in range(BATCH_ROUNDS):
        result = await aws.call("dynamodb", "batch_get_item", RequestItems=request)
        for table, items in result.get("Responses", {}).items():
            found.setdefault(table, []).extend(items)
        request = result.get("UnprocessedKeys") or {}
        if not request:
            return found
        if attempt + 1 < BATCH_ROUNDS:
            await asyncio.sleep(backoff_s(attempt, tuning))
    raise Throttled(f"BatchGetItem: keys of {', '.join(sorted(request))} stayed unprocessed")
