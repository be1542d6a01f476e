"""The mirror's services, opened in one place: `open_services(config)` is what `serve` runs on,
and what every command that works on a cache (seed, import, export, gc) opens too, so they all
share the same store, index, single-flight downloads and upstream clients.

Opening takes the cache for this process alone, sweeps abandoned writes, reconciles the index
with the blobs, and starts the periodic work (access times, age expiry); closing cancels what is
in flight, publishes nothing partial, and lets the cache go.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp

from mirror.cluster import Cluster, default_advertise
from mirror.config import Config
from mirror.errors import CacheBusy, CacheWriteError, ConfigError, RequestInvalid
from mirror.eviction import Evicted, Evictor
from mirror.flight import Background
from mirror.imagelist import Platform
from mirror.index import (
    INDEX_FILE,
    CachedImage,
    Index,
    Miss,
    SqliteIndex,
    cached_images,
    recorded_misses,
    set_pinned,
)
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.offline import OfflineUpstream
from mirror.policy import SignatureGate
from mirror.proxy import Proxy
from mirror.redisindex import RedisIndex
from mirror.referrers import Referrers
from mirror.s3store import S3Store
from mirror.storage import BlobStore, DiskStore
from mirror.upstream import Source, Upstream

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often access times are written to the index, in one transaction.
ACCESS_FLUSH_INTERVAL = 10.0
# How often content past its upstream's max_age is looked for.
EXPIRE_INTERVAL = 60.0
# Big enough that the download loop hands the hasher and disk megabyte-sized writes.
UPSTREAM_READ_BUFFER = 4 << 20


@dataclass(slots=True)
class Services:
    """What a running mirror is made of; exposed for the CLI, tests and benchmarks."""

    config: Config
    store: BlobStore
    index: Index
    background: Background
    proxy: Proxy
    referrers: Referrers
    evictor: Evictor
    signatures: SignatureGate | None = None
    """The operator's signature policies, where any is configured."""
    cluster: Cluster | None = None
    """The other replicas on the same bucket, where Redis is set."""
    draining: bool = False
    """Set on SIGTERM: readiness fails so load balancers stop sending new pulls."""
    index_problem: str | None = None
    """Why the index is a temporary one in memory, if it is."""
    shared_index: RedisIndex | None = None
    upstreams: Mapping[str, Source] = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    def coordination_problem(self) -> str | None:
        """Why this replica works without the others right now (Redis out of reach), if it does."""
        if self.cluster is None:
            return None
        return self.cluster.problem or (self.shared_index.problem if self.shared_index is not None else None)


@asynccontextmanager
async def open_services(config: Config, metrics: Metrics,
                        clock: Callable[[], float] | None = None) -> AsyncIterator[Services]:
    """The services of the cache in `config.cache_dir`, for as long as the context lasts.
    Raises CacheBusy if another process has it."""
    store = build_store(config)
    store.spool.lock()
    try:
        swept = await store.open()
    except BaseException:
        store.spool.unlock()
        raise
    if swept:
        log.info("swept %d unfinished downloads from %s", swept, config.cache_dir)
    index, index_problem = await _open_index(config, clock)
    await _reconcile(config, store, index)
    loop = asyncio.get_running_loop()
    periodic: list[asyncio.Task[None]] = []
    timeouts = config.timeouts
    # Small requests: waiting for a connection counts against the connect limit, so a
    # revalidation fails over to the cached copy instead of queueing.
    session = _upstream_session(aiohttp.ClientTimeout(
        total=None, connect=timeouts.connect, sock_read=timeouts.read))
    # Blob downloads: single-flight already bounds them to one per digest in demand, and a
    # download may take as long as it takes while bytes keep coming.
    blob_session = _upstream_session(aiohttp.ClientTimeout(
        total=None, sock_connect=timeouts.connect, sock_read=timeouts.read), aiohttp.TCPConnector(limit=0))
    background = Background()
    evictor = Evictor(config.eviction, store, index, background, metrics)
    await evictor.open()
    if max_ages := _max_ages(config):
        periodic.append(loop.create_task(_expire(evictor, max_ages, clock or time.time), name="expire"))
    upstreams: dict[str, Source] = {
        u.name: OfflineUpstream(u, index.record_miss, index.cached_tags, _platform_of(store, index), metrics)
        if u.offline
        else Upstream(u, session, blob_session, metrics, clock or time.monotonic)
        for u in config.upstreams}
    cluster = None
    if config.redis is not None:
        cluster = await _join(config, upstreams, metrics)
    if cluster is not None:
        evictor.exclusive = cluster.exclusive
    periodic.append(loop.create_task(_flush_access(index, evictor if cluster is not None else None),
                                     name="flush access times"))
    proxy = Proxy(store, index, evictor, upstreams, background, revalidate_timeout=timeouts.revalidate,
                  clock=clock, cluster=cluster)
    referrers = Referrers(proxy, index, upstreams, background, metrics, timeouts.revalidate, clock)
    signatures = (SignatureGate(config.signature_policies, proxy, referrers, index, metrics)
                  if config.signature_policies else None)
    try:
        yield Services(config, store, index, background, proxy, referrers, evictor, signatures=signatures,
                       cluster=cluster, index_problem=index_problem,
                       shared_index=index if isinstance(index, RedisIndex) else None, upstreams=upstreams,
                       clock=clock or time.time)
    finally:
        for task in periodic:
            task.cancel()
        await asyncio.gather(*periodic, return_exceptions=True)
        await background.close()
        await session.close()
        await blob_session.close()
        if cluster is not None:
            await cluster.close()
        await index.close()
        await store.close()
        store.spool.unlock()


async def _join(config: Config, upstreams: dict[str, Source], metrics: Metrics) -> Cluster:
    """The cluster of replicas on `config.redis`, sharing the upstreams' rate limits."""
    assert config.redis is not None
    cluster = Cluster(config.redis, config.advertise or default_advertise(config.host, config.port,
                                                                           config.tls is not None), metrics)
    breakers = {name: u.breaker for name, u in upstreams.items() if isinstance(u, Upstream)}
    for name, breaker in breakers.items():
        breaker.on_rate_limited = functools.partial(cluster.announce_rate_limit, name)

    def rate_limited(upstream: str, wait: float, reason: str) -> None:
        if (breaker := breakers.get(upstream)) is not None:
            breaker.hold(wait, reason)
    await cluster.open(rate_limited)
    return cluster


def build_store(config: Config) -> BlobStore:
    """The store `config` names: the cache directory's own disk unless shared storage is set."""
    if config.storage is not None:
        return S3Store(config.storage, config.s3, config.cache_dir)
    return DiskStore(config.cache_dir)


def _platform_of(store: BlobStore, index: Index) -> Callable[[Digest], Awaitable[str | None]]:
    """The platform a cached index gives the manifest `digest`, for an offline miss's message."""
    async def platform_of(digest: Digest) -> str | None:
        for parent in await index.parents(digest):
            body = await store.read(parent)
            try:
                document = json.loads(body or b"")
            except ValueError:
                continue
            for descriptor in document.get("manifests", []) if isinstance(document, dict) else []:
                if isinstance(descriptor, dict) and descriptor.get("digest") == str(digest):
                    platform = Platform.of(descriptor.get("platform"))
                    return None if platform is None else str(platform)
        return None
    return platform_of


async def _reconcile(config: Config, store: BlobStore, index: Index) -> None:
    """Make the index match what the store holds: after a crash either may be ahead. A shared
    index is rebuilt from the bucket only when it is empty (a Redis flushed or replaced): the
    replicas keep it right while they run, and one starting must not drop what another is
    recording as it lists."""
    try:
        if config.redis is not None and (await index.usage())[0] > 0:
            return
        reconciled = await index.reconcile(await store.scan())
    except CacheWriteError as exc:
        log.warning("could not reconcile the index with the cache: %s", exc.message)
        return
    if reconciled.added or reconciled.removed:
        log.info("index reconciled with the cache: %d blobs added, %d removed", reconciled.added, reconciled.removed)


async def _open_index(config: Config, clock: Callable[[], float] | None) -> tuple[Index, str | None]:
    """The cluster's index in Redis; or the cache's own index file, and where it cannot be
    written (a read-only or failing disk), the same file read-only; where it cannot even be read
    (corrupt), a temporary index in memory rebuilt from the blobs as after a crash. Either way
    the mirror still serves what it can, the file is left as it is for the operator, and the
    second value says why."""
    if config.redis is not None:
        shared = RedisIndex(config.redis, clock=clock)
        await shared.open()
        return shared, None
    path = config.cache_dir / INDEX_FILE
    index = SqliteIndex(path, clock=clock)
    try:
        await index.open()
        return index, None
    except CacheWriteError as exc:
        await index.close()
        reason = exc.message
    read_only = SqliteIndex(path, clock=clock, read_only=True)
    try:
        await read_only.open()
        problem = f"the index file {path} cannot be written ({reason}): serving from it read-only"
        log.error("%s", problem)
        return read_only, problem
    except CacheWriteError:
        await read_only.close()
    problem = (f"the index file {path} cannot be opened ({reason}): running on a temporary index in memory "
               "until it is fixed or moved aside and the mirror restarted")
    log.error("%s", problem)
    memory = SqliteIndex(Path(":memory:"), clock=clock)
    await memory.open()
    return memory, problem


def _upstream_session(timeout: aiohttp.ClientTimeout,
                      connector: aiohttp.BaseConnector | None = None) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, read_bufsize=UPSTREAM_READ_BUFFER,
        # Layers are already compressed and must arrive byte for byte as their digest says.
        headers={"User-Agent": "mirror (pull-through cache)", "Accept-Encoding": "identity"})
    # aiohttp sends an idempotent request a second time when its connection closes unanswered;
    # to a failing upstream that doubles the load the breaker is there to spare. Blob downloads
    # resume by themselves, and one unanswered manifest request does not open the breaker.
    session._retry_connection = False
    return session


async def _flush_access(index: Index, shared: Evictor | None) -> None:
    """Access times to the index; and with replicas, the usage the others added to the shared
    cache back into this one's evictor, so that some replica evicts when the bucket is full."""
    while True:
        await asyncio.sleep(ACCESS_FLUSH_INTERVAL)
        try:
            await index.flush_access()
            if shared is not None:
                await shared.refresh()
        except CacheWriteError as exc:
            # Access times only order eviction: losing one batch is no reason to stop.
            log.warning("could not record access times: %s", exc)


def _max_ages(config: Config) -> dict[str, float]:
    return {u.name: u.max_age for u in config.upstreams if u.max_age is not None}


async def _expire(evictor: Evictor, max_ages: dict[str, float], clock: Callable[[], float]) -> None:
    while True:
        await asyncio.sleep(EXPIRE_INTERVAL)
        try:
            expired = await evictor.expire(max_ages, clock())
        except (CacheWriteError, OSError) as exc:
            log.warning("could not expire old content: %s", exc)
            continue
        if expired:
            log.info("expired %d blobs (%d bytes) past their upstream's max_age", len(expired),
                     sum(e.size for e in expired))


async def evict_now(config: Config, dry_run: bool) -> tuple[int, int, list[Evicted]]:
    """Age expiry and one eviction pass: on a cache directory no mirror is serving, or on a
    cluster's shared cache while its replicas serve (taking the eviction lease from them):
    (usage before, after, what went). A dry run works on a copy of the index and deletes no
    file; a cluster's index cannot be copied, so there it is refused."""
    if config.redis is not None:
        if dry_run:
            raise ConfigError("gc --dry-run works on a cache directory; on a cluster (redis set) gc evicts for real")
        return await _evict_cluster(config)
    store = DiskStore(config.cache_dir)
    store.spool.lock()
    try:
        await store.open()
        database = config.cache_dir / INDEX_FILE
        files = store
        with tempfile.TemporaryDirectory() as scratch:
            if dry_run:
                database, files = _copy_index(database, Path(scratch)), _KeepFiles(config.cache_dir)
            index = SqliteIndex(database)
            await index.open()
            try:
                await index.reconcile(await store.scan())
                evictor = Evictor(config.eviction, files, index, Background(), Metrics())
                evictor.usage = (await index.usage())[1]
                before = evictor.usage
                evicted = await _collect(config, evictor, time.time())
                return before, evictor.usage, evicted
            finally:
                await index.close()
    finally:
        store.spool.unlock()


def evicts(config: Config) -> bool:
    """Whether anything can ever be evicted: a disk budget, or an upstream's max_age."""
    return config.eviction.max_size is not None or any(u.max_age is not None for u in config.upstreams)


async def collect_live(services: Services, dry_run: bool) -> tuple[int, int, list[Evicted]]:
    """`evict_now` on the cache a running mirror serves, through its own evictor (so its usage
    stays right). A dry run works on a copy of the index, as `evict_now`'s."""
    config = services.config
    if not evicts(config):
        raise RequestInvalid("neither max_size nor any upstream's max_age is set: nothing to evict")
    if not dry_run:
        before = services.evictor.usage
        evicted = await _collect(config, services.evictor, services.clock())
        return before, services.evictor.usage, evicted
    if not isinstance(services.index, SqliteIndex):
        raise RequestInvalid("a dry run works on a cache directory's index; on a cluster (redis set) gc evicts "
                             "for real")
    # Access times first, so the copy orders eviction as the live index would.
    await services.index.flush_access()
    with tempfile.TemporaryDirectory() as scratch:
        copy = SqliteIndex(await asyncio.to_thread(_copy_index, config.cache_dir / INDEX_FILE, Path(scratch)))
        await copy.open()
        try:
            evictor = Evictor(config.eviction, _KeepFiles(config.cache_dir), copy, Background(), Metrics())
            evictor.usage = before = services.evictor.usage
            evicted = await _collect(config, evictor, services.clock())
            return before, evictor.usage, evicted
        finally:
            await copy.close()


def _copy_index(database: Path, directory: Path) -> Path:
    """A consistent copy of the index in `directory`, for a dry run (taken on a connection of its
    own: WAL lets it read while a mirror writes)."""
    copy = directory / INDEX_FILE
    with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    return copy


async def _collect(config: Config, evictor: Evictor, now: float) -> list[Evicted]:
    """One gc: what is past its upstream's max_age, then down to the budget's low watermark."""
    evicted = await evictor.expire(_max_ages(config), now)
    if config.eviction.max_size is not None:
        evicted += await evictor.evict()
    return evicted


async def _evict_cluster(config: Config) -> tuple[int, int, list[Evicted]]:
    assert config.redis is not None
    store = build_store(config)
    await store.open()
    index = RedisIndex(config.redis)
    cluster = Cluster(config.redis, "mirror gc", Metrics())
    try:
        await index.open()
        await index.ping()
        await cluster.open(lambda *_: None)
        evictor = Evictor(config.eviction, store, index, Background(), Metrics())
        evictor.exclusive = cluster.exclusive
        before = (await index.usage())[1]
        async with cluster.exclusive("evict") as held:
            if not held:
                raise CacheBusy("a replica is evicting from the shared cache right now; try again shortly")
        evicted = await _collect(config, evictor, time.time())
        return before, (await index.usage())[1], evicted
    finally:
        await cluster.close()
        await index.close()
        await store.close()


async def cached_listing(config: Config) -> list[CachedImage]:
    """Every cached tag, for `mirror ls`: from the cluster's index, or read from the cache
    directory's index file (beside a serving mirror: WAL lets it read while the mirror writes)."""
    if config.redis is None:
        database = config.cache_dir / INDEX_FILE
        return cached_images(database) if database.exists() else []
    return await _on_shared_index(config, lambda index: index.images())


async def misses_listing(config: Config) -> list[Miss]:
    """What an offline mirror could not serve, most asked first."""
    if config.redis is None:
        database = config.cache_dir / INDEX_FILE
        return recorded_misses(database) if database.exists() else []
    return await _on_shared_index(config, lambda index: index.misses())


async def pin_image(config: Config, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
    """Pin (or unpin) a cached image by tag or digest; its manifest digest, or None if it is not cached."""
    if config.redis is None:
        database = config.cache_dir / INDEX_FILE
        return set_pinned(database, upstream, name, reference, pinned) if database.exists() else None
    return await _on_shared_index(config, lambda index: index.set_pinned(upstream, name, reference, pinned))


async def _on_shared_index(config: Config, work: Callable[[RedisIndex], Awaitable[T]]) -> T:
    """`work` on the cluster's index; CacheWriteError if Redis cannot be reached (an empty
    answer would tell an operator that nothing is cached)."""
    assert config.redis is not None
    index = RedisIndex(config.redis)
    try:
        await index.open()
        return await work(index)
    finally:
        await index.close()


class _KeepFiles(DiskStore):
    """A store whose evictions are only pretended, for dry runs."""

    async def remove(self, digest: Digest) -> None:
        pass
