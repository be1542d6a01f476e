"""One upstream download per digest, and one rate-limit state per upstream, for the whole cluster.

Replicas that share a bucket coordinate through Redis. The first replica to take a digest's
lease (`SET NX PX`, renewed while it works) leads: it downloads from the upstream and publishes
to the bucket. A replica that gets a request for a digest another replica leads streams the
bytes from the leader's spool as they arrive (`GET /_mirror/cluster/fills/<digest>?from=N`, with
the cluster's token), into a spool of its own that its clients tail, and verifies the digest
itself; it publishes nothing. If the leader goes (its stream breaks, its lease lapses), a
follower takes the lease and resumes from the upstream with a Range request from what it holds,
its clients still connected. An upstream that rate-limits one replica (a 429, Docker Hub's
`ratelimit-remaining: 0`) is held off by every replica until its `Retry-After`: the news goes
out on a Redis channel, and stays in a key for replicas that start meanwhile. Redis out of reach
costs only this: each replica downloads, and learns of rate limits, alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import aiohttp
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from mirror.errors import Denied
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.upstream import BlobSink, Source

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_HEADER = "X-Mirror-Cluster-Token"
SIZE_HEADER = "X-Mirror-Blob-Size"
FILL_PATH = "/_mirror/cluster/fills/"
# A lease lapses this long after its holder stops renewing it (a kill -9, a network split).
LEASE_TTL = 5.0
_RENEW_EVERY = LEASE_TTL / 3
# Between two looks at a lease held by a replica that does not answer.
_RETRY_PAUSE = 0.25
_REDIS_TIMEOUT = 2.0
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class PeerGone(Exception):
    """The leader's stream ended before the blob did: its replica went, or its fill failed."""


def default_advertise(host: str, port: int, tls: bool) -> str:
    """How other replicas reach this one: the listen address, or this machine's address when
    it listens on every interface (in a pod, the pod's IP)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    holder: str
    """This replica's advertised URL and a random nonce: the value only the holder can renew."""


class Cluster:
    """This replica's view of the others: leases in Redis, and streams from their fills."""

    def __init__(self, url: str, advertise: str, metrics: Metrics, prefix: str = "mirror:") -> None:
        self.advertise = advertise.rstrip("/")
        self._peer_bytes = metrics.peer_bytes
        # One quick retry: the first command on a pooled connection after a Redis restart fails.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=_REDIS_TIMEOUT, socket_timeout=_REDIS_TIMEOUT,
                                           retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))
        self._prefix = prefix
        self._session: aiohttp.ClientSession | None = None
        self.token = ""
        self.problem: str | None = None
        self._listening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._announcing: set[asyncio.Task[None]] = set()
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    async def open(self, rate_limited: Callable[[str, float, str], None]) -> None:
        """Join: the cluster's token is the first replica's, kept in Redis for the others; the
        rate limits the others saw are passed to `rate_limited(upstream, seconds, reason)`, now
        and as they come."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60), auto_decompress=False)
        self._listening = asyncio.ensure_future(self._listen(rate_limited))
        try:
            await self._join(rate_limited)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)

    async def _join(self, rate_limited: Callable[[str, float, str], None]) -> None:
        await self._redis.set(f"{self._prefix}cluster-token", secrets.token_hex(32), nx=True)
        self.token = _text(await self._redis.get(f"{self._prefix}cluster-token"))
        async for key in self._redis.scan_iter(match=f"{self._prefix}ratelimit:*"):
            self._heard(_text(await self._redis.get(key)), rate_limited)
        self.problem = None

    async def close(self) -> None:
        self._listening.cancel()
        await asyncio.gather(self._listening, *self._announcing, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self._redis.aclose()

    def announce_rate_limit(self, upstream: str, wait: float, reason: str) -> None:
        """Tell the other replicas to hold off `upstream` for `wait` s."""
        news = json.dumps({"upstream": upstream, "until": time.time() + wait, "reason": reason,
                           "from": self.advertise})
        task = asyncio.ensure_future(self._announce(upstream, news, wait))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce(self, upstream: str, news: str, wait: float) -> None:
        try:
            await self._redis.set(f"{self._prefix}ratelimit:{upstream}", news, px=max(1, int(wait * 1000)))
            await self._redis.publish(f"{self._prefix}ratelimits", news)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)

    async def _listen(self, rate_limited: Callable[[str, float, str], None]) -> None:
        """Hear the other replicas' rate limits, for as long as this one runs; Redis going away
        is waited out, and its coming back noticed here first."""
        while True:
            try:
                async with self._redis.pubsub() as channel:
                    await channel.subscribe(f"{self._prefix}ratelimits")
                    if self.problem is not None or not self.token:
                        # Started without Redis, or lost it: the token and the news missed.
                        lost = self.problem is not None
                        await self._join(rate_limited)
                        if lost:
                            log.warning("Redis answers again: downloading with the other replicas")
                    async for message in channel.listen():
                        if message.get("type") == "message":
                            self._heard(_text(message.get("data")), rate_limited)
            except (RedisError, OSError) as exc:
                self._unreachable(exc)
            await asyncio.sleep(_RETRY_PAUSE * 4)

    def _heard(self, news: str, rate_limited: Callable[[str, float, str], None]) -> None:
        try:
            told = json.loads(news)
            upstream, until, reason, sender = told["upstream"], float(told["until"]), told["reason"], told["from"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed rate-limit message from Redis")
            return
        if sender != self.advertise and (wait := until - time.time()) > 0:
            rate_limited(str(upstream), wait, f"{reason} (seen by the replica at {sender})")

    def _unreachable(self, error: BaseException) -> None:
        if self.problem is None:
            log.warning("Redis is out of reach (%s): downloading without the other replicas", type(error).__name__)
        self.problem = f"Redis is out of reach ({type(error).__name__}): each replica downloads on its own"

    async def _take(self, key: str) -> tuple[Lease | None, str | None]:
        """(the lease, if this replica now holds it; the holder's URL, if another does). Redis
        out of reach: this replica leads on its own."""
        holder = f"{self.advertise} {secrets.token_hex(8)}"
        try:
            if await self._redis.set(key, holder, nx=True, px=int(LEASE_TTL * 1000)):
                self.problem = None
                return Lease(key, holder), None
            current = await self._redis.get(key)
            self.problem = None
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return Lease(key, ""), None
        if current is None:
            return await self._take(key)
        return None, _text(current).split(" ", 1)[0]

    async def working(self, name: str) -> bool:
        """Whether some replica holds the lease for `name` (Redis out of reach: no)."""
        try:
            return bool(await self._redis.exists(f"{self._prefix}lease:{name}"))
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return False

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Whether this replica may do `name` alone (True) while the block runs, or another one is
        doing it (False). Redis out of reach: each replica does it alone."""
        lease, _ = await self._take(f"{self._prefix}lease:{name}")
        if lease is None:
            yield False
            return
        async with self._holding(lease):
            yield True

    @asynccontextmanager
    async def _holding(self, lease: Lease) -> AsyncIterator[None]:
        """Renew `lease` while the block runs, then release it."""
        renewing = asyncio.ensure_future(self._keep(lease)) if lease.holder else None
        try:
            yield
        finally:
            if renewing is not None:
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)
                try:
                    await self._release(keys=[lease.key], args=[lease.holder])
                except (RedisError, OSError) as exc:
                    self._unreachable(exc)

    async def _keep(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(_RENEW_EVERY)
            try:
                if not await self._renew(keys=[lease.key], args=[lease.holder, int(LEASE_TTL * 1000)]):
                    log.warning("lost the lease %s: another replica may download it too", lease.key)
                    return
            except (RedisError, OSError) as exc:
                self._unreachable(exc)

    async def fetch_blob(self, upstream: Source, name: str, digest: Digest, sink: FollowingSink,
                         publish: Callable[[], Awaitable[None]], from_store: Callable[[], Awaitable[bool]]) -> None:
        """Fill `sink` with `digest` and `publish` it: from the upstream if this replica leads
        (holding the lease until it is published, so no other replica starts meanwhile), else
        from the leader's fill (and then `publish` verifies and records, but uploads nothing).
        `from_store` finishes the sink from the bucket if the blob is there by now."""
        key = f"{self._prefix}lease:blob:{digest}"
        while True:
            lease, leader = await self._take(key)
            if lease is not None:
                async with self._holding(lease):
                    sink.follow()
                    if not await from_store():
                        sink.lead()
                        if not (sink.begun and sink.written == sink.size):
                            await upstream.fetch_blob(name, digest, sink)
                    await publish()
                return
            assert leader is not None
            sink.follow()
            try:
                await self._stream(leader, digest, sink)
            except PeerGone as exc:
                if await from_store():
                    break
                log.info("the replica at %s stopped sending %s (%s): taking over", leader, digest, exc)
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            break
        await publish()

    async def _stream(self, leader: str, digest: Digest, sink: BlobSink) -> None:
        assert self._session is not None
        url = f"{leader}{FILL_PATH}{digest}?from={sink.written}"
        started = time.monotonic()
        try:
            async with self._session.get(url, headers={TOKEN_HEADER: self.token}) as response:
                if response.status != 200:
                    raise PeerGone(f"it answered {response.status}")
                if not sink.begun:
                    announced = response.headers.get(SIZE_HEADER)
                    sink.begin(int(announced) if announced and announced.isdigit() else None)
                async for chunk in response.content.iter_any():
                    self._peer_bytes.inc(len(chunk))
                    await sink.write(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerGone(type(exc).__name__) from exc
        if sink.size is None or sink.written != sink.size:
            raise PeerGone(f"it sent {sink.written} bytes in {time.monotonic() - started:.1f} s, and stopped")


class FollowingSink(BlobSink, Protocol):
    """A fill that follows another replica's download (it then publishes nothing) or leads."""

    def lead(self) -> None: ...
    def follow(self) -> None: ...


async def poll(check: Callable[[], Awaitable[T | None]], working: Callable[[], Awaitable[bool]],
               timeout: float) -> T | None:
    """What `check` finds once it finds something (another replica's work landing in the shared
    cache), looking more and more rarely; None once that replica is no longer `working` and it
    is still not there, or after `timeout`."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while (found := await check()) is None:
        if time.monotonic() + pause > deadline or not await working():
            return await check()
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.25)
    return found


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


def check_token(expected: str, given: str | None) -> None:
    """Raise unless a peer request carries the cluster's token."""
    if not expected or given is None or not secrets.compare_digest(expected, given):
        raise Denied("not a replica of this cluster")
