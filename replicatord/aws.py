"""AWS clients: the local region's (default credential chain) and each peer's Kinesis.

A peer's Kinesis client uses the peer's proxy and, for a peer in another partition, that
partition's key pair, read from SSM Parameter Store in the local region (the local region's
credentials never go across the border); a peer in the same partition is reached with the
instance's own role, like the local region.
Every call goes through `Aws.call`, which times it and maps its errors (errors.classify).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from replicatord.config import Settings, redact_url
from replicatord.errors import AWS_ERRORS, NotFound, ReplicatorError, classify
from replicatord.metrics import Metrics

log = logging.getLogger(__name__)

LOCAL_SERVICES = ("dynamodb", "dynamodbstreams", "kinesis", "sqs", "ssm")
LEASES = "leases"  # the DynamoDB client of the lease table (Aws.local)


class StartupError(Exception):
    """A fatal problem found before any task starts; the message is one line."""


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
        self._peer_digests: dict[str, bytes] = {}
        self._peer_refreshed: dict[str, float] = {}
        self._peer_locks: dict[str, asyncio.Lock] = {}

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
        )

    async def __aenter__(self) -> Aws:
        me = self.settings.me
        for service in LOCAL_SERVICES:
            self.local[service] = await self._stack.enter_async_context(
                self._session.create_client(
                    service,  # type: ignore[call-overload]
                    region_name=self.settings.region,
                    endpoint_url=me.endpoint_url,
                    config=self._config(),
                )
            )
        # Lease calls on connections of their own, each within half the failover time: a renewal
        # never waits behind apply traffic, nor longer than the lease can afford.
        self.local[LEASES] = await self._stack.enter_async_context(
            self._session.create_client(
                "dynamodb",
                region_name=self.settings.region,
                endpoint_url=me.endpoint_url,
                config=self._config(timeout_s=self.settings.topology.tuning.failover_s / 2, pool=16),
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

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
        credentials = self.settings.topology.regions[peer].credentials
        assert credentials is not None
        access_name, secret_name = peer_credential_names(credentials.ssm_prefix)
        return (await self.read_parameter(access_name, decrypt=False),
                await self.read_parameter(secret_name, decrypt=True))

    async def _peer_client(self, peer: str, keys: tuple[str, str] | None) -> Any:
        """A Kinesis client for `peer`: with `keys`, or (None) the default chain, as local clients."""
        target = self.settings.topology.regions[peer]
        explicit = {"aws_access_key_id": keys[0], "aws_secret_access_key": keys[1]} if keys else {}
        client = await self._stack.enter_async_context(
            self._session.create_client(
                "kinesis",  # type: ignore[call-overload]
                region_name=peer,
                endpoint_url=target.endpoint_url,
                config=self._config(target.proxy),
                **explicit,
            )
        )
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

    async def call(self, service: str, operation: str, *, client: Any = None, **kwargs: Any) -> Any:
        """Call `operation` on the local `service` client (or `client`); raise ReplicatorError."""
        target = client if client is not None else self.local[service]
        started = time.monotonic()
        try:
            return await getattr(target, operation)(**kwargs)
        except AWS_ERRORS as exc:
            raise classify(exc) from exc
        finally:
            self.metrics.aws_request.labels(service, operation).observe(time.monotonic() - started)
