"""The mirror's services, opened in one place: `open_services(config)` is what `serve` runs on,
and what every command that works on a cache (seed, import, export, gc) opens too, so they all
share the same store, index, single-flight downloads and upstream clients.

Opening takes the cache for this process alone, sweeps abandoned writes, reconciles the index
with the blobs, and starts the periodic work (access times, age expiry); closing cancels what is
in flight, publishes nothing partial, and lets the cache go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from mirror.config import Config
from mirror.errors import CacheWriteError
from mirror.eviction import Evicted, Evictor
from mirror.flight import Background
from mirror.imagelist import Platform
from mirror.index import INDEX_FILE, Index
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.offline import OfflineUpstream
from mirror.proxy import Proxy
from mirror.storage import BlobStore
from mirror.upstream import Source, Upstream

log = logging.getLogger(__name__)

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
    evictor: Evictor
    draining: bool = False
    """Set on SIGTERM: readiness fails so load balancers stop sending new pulls."""
    index_problem: str | None = None
    """Why the index is a temporary one in memory, if it is."""


@asynccontextmanager
async def open_services(config: Config, metrics: Metrics,
                        clock: Callable[[], float] | None = None) -> AsyncIterator[Services]:
    """The services of the cache in `config.cache_dir`, for as long as the context lasts.
    Raises CacheBusy if another process has it."""
    store = BlobStore(config.cache_dir)
    store.lock()
    swept = store.open()
    if swept:
        log.info("swept %d unfinished downloads from %s", swept, config.cache_dir)
    index, index_problem = await _open_index(config.cache_dir / INDEX_FILE, clock)
    try:
        reconciled = await index.reconcile(await asyncio.to_thread(store.scan))
    except CacheWriteError as exc:
        log.warning("could not reconcile the index with the cache: %s", exc.message)
    else:
        if reconciled.added or reconciled.removed:
            log.info("index reconciled with the cache: %d blobs added, %d removed",
                     reconciled.added, reconciled.removed)
    loop = asyncio.get_running_loop()
    periodic = [loop.create_task(_flush_access(index), name="flush access times")]
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
    proxy = Proxy(store, index, evictor, upstreams, background, revalidate_timeout=timeouts.revalidate,
                  clock=clock)
    try:
        yield Services(config, store, index, background, proxy, evictor, index_problem=index_problem)
    finally:
        for task in periodic:
            task.cancel()
        await asyncio.gather(*periodic, return_exceptions=True)
        await background.close()
        await session.close()
        await blob_session.close()
        await index.close()
        store.unlock()


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


async def _open_index(path: Path, clock: Callable[[], float] | None) -> tuple[Index, str | None]:
    """The cache's index; where its file cannot be written (a read-only or failing disk), the
    same file read-only; where it cannot even be read (corrupt), a temporary index in memory
    rebuilt from the blobs as after a crash. Either way the mirror still serves what it can, the
    file is left as it is for the operator, and the second value says why."""
    index = Index(path, clock=clock)
    try:
        await index.open()
        return index, None
    except CacheWriteError as exc:
        await index.close()
        reason = exc.message
    read_only = Index(path, clock=clock, read_only=True)
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
    memory = Index(Path(":memory:"), clock=clock)
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


async def _flush_access(index: Index) -> None:
    while True:
        await asyncio.sleep(ACCESS_FLUSH_INTERVAL)
        try:
            await index.flush_access()
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
    """Age expiry and one eviction pass on a cache no mirror is serving: (usage before, after,
    what went). A dry run works on a copy of the index and deletes no file."""
    store = BlobStore(config.cache_dir)
    store.lock()
    try:
        store.open()
        database = config.cache_dir / INDEX_FILE
        files = store
        with tempfile.TemporaryDirectory() as scratch:
            if dry_run:
                copy = Path(scratch) / INDEX_FILE
                with sqlite3.connect(database) as source, sqlite3.connect(copy) as target:
                    source.backup(target)
                database, files = copy, _KeepFiles(config.cache_dir)
            index = Index(database)
            await index.open()
            try:
                await index.reconcile(await asyncio.to_thread(store.scan))
                evictor = Evictor(config.eviction, files, index, Background(), Metrics())
                evictor.usage = (await index.usage())[1]
                before = evictor.usage
                evicted = await evictor.expire(_max_ages(config), time.time())
                if config.eviction.max_size is not None:
                    evicted += await evictor.evict()
                return before, evictor.usage, evicted
            finally:
                await index.close()
    finally:
        store.unlock()


class _KeepFiles(BlobStore):
    """A store whose evictions are only pretended, for dry runs."""

    def remove(self, digest: Digest) -> None:
        pass
