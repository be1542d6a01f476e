"""Wiring: `create_app(config)` builds one self-contained mirror. All state hangs off the
application (no module globals), so tests can run several mirrors in one process."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import sqlite3
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mirror.access import ACCESS_LOG, METRICS, AccessLogger
from mirror.config import Config
from mirror.connections import GuardedSite
from mirror.errors import CacheWriteError
from mirror.eviction import Evicted, Evictor
from mirror.flight import Background
from mirror.gate import Gate
from mirror.handlers import PROXY, RegistryHandlers, errors_middleware
from mirror.index import INDEX_FILE, Index
from mirror.logs import protect as protect_logs
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.ops import OpsHandlers
from mirror.proxy import Proxy
from mirror.reload import Reloadable, reload_all, watch
from mirror.routing import Router
from mirror.storage import BlobStore
from mirror.tls import reload_certificate, server_context
from mirror.upstream import Upstream

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


SERVICES = web.AppKey("services", Services)
GATE = web.AppKey("gate", Gate)


def create_app(config: Config, clock: Callable[[], float] | None = None) -> web.Application:
    protect_logs()
    app = web.Application(middlewares=[errors_middleware])
    metrics = app[METRICS] = Metrics()
    if config.metrics_listen is None:
        OpsHandlers(metrics, lambda: _readiness(app)).add_routes(app)
    gate = Gate(config, clock or time.time) if config.auth.enabled else None
    if gate is not None:
        app[GATE] = gate
        gate.add_routes(app)

        async def close_gate(_: web.Application) -> None:
            gate.close()
        app.on_cleanup.append(close_gate)
    RegistryHandlers(Router(config), gate).add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = BlobStore(config.cache_dir)
        store.lock()
        swept = store.open()
        if swept:
            log.info("swept %d unfinished downloads from %s", swept, config.cache_dir)
        index, index_problem = await _open_index(config.cache_dir / INDEX_FILE, clock)
        reconciled = await index.reconcile(await asyncio.to_thread(store.scan))
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
        upstreams = {u.name: Upstream(u, session, blob_session, metrics, clock or time.monotonic)
                     for u in config.upstreams}
        proxy = Proxy(store, index, evictor, upstreams, background, revalidate_timeout=timeouts.revalidate,
                      clock=clock)
        app[SERVICES] = Services(config, store, index, background, proxy, evictor, index_problem=index_problem)
        app[PROXY] = proxy
        metrics.downloads_in_flight.set_function(lambda: len(proxy.fills))
        metrics.cache_size.set_function(lambda: evictor.usage)
        metrics.cache_blobs.set_function(lambda: evictor.blobs)
        if config.eviction.max_size is not None:
            metrics.cache_max_size.set(config.eviction.max_size)
        try:
            yield
        finally:
            for task in periodic:
                task.cancel()
            await asyncio.gather(*periodic, return_exceptions=True)
            await background.close()
            await session.close()
            await blob_session.close()
            await index.close()
            store.unlock()

    app.cleanup_ctx.append(lifecycle)
    return app


def create_ops_app(app: web.Application) -> web.Application:
    """The /metrics, /healthz and /readyz of `app`, for a listener of their own."""
    ops = web.Application()
    ops[METRICS] = app[METRICS]
    OpsHandlers(app[METRICS], lambda: _readiness(app)).add_routes(ops)
    return ops


async def _readiness(app: web.Application) -> dict[str, str]:
    services = app.get(SERVICES)
    if services is None:
        return {"startup": "the cache is not open yet"}
    problems = {}
    if services.draining:
        problems["shutdown"] = "shutting down"
    try:
        await asyncio.to_thread(services.store.check_writable)
    except OSError as exc:
        problems["cache"] = (f"the cache disk is full: {exc.strerror}" if exc.errno == errno.ENOSPC
                             else f"cannot write to the cache directory: {exc.strerror}")
    try:
        await services.index.ping()
    except Exception as exc:
        problems["index"] = f"the index does not answer: {type(exc).__name__}"
    if services.index_problem is not None:
        problems["index"] = services.index_problem
    return problems


def runner_options(config: Config, app: web.Application) -> dict[str, Any]:
    """How a mirror app is served: with its access log and metrics hook and its shutdown grace."""
    return {"access_log_class": AccessLogger.counting_into(app[METRICS]), "access_log": ACCESS_LOG,
            "handle_signals": False,
            "shutdown_timeout": config.shutdown_grace, "keepalive_timeout": config.connections.keepalive_timeout,
            # A client that leaves stops its own handler (downloads are shielded and go on).
            "handler_cancellation": True}


async def serve(config: Config, on_ready: Callable[[], None]) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, give responses under way
    `shutdown_grace` to finish, and close the cache. Downloads still running are abandoned:
    their temporary files are removed and nothing partial is ever published. SIGHUP re-reads
    the TLS certificate and the htpasswd file (as does a change to either)."""
    app = create_app(config)
    context = server_context(config.tls) if config.tls is not None else None
    listeners = [(web.AppRunner(app, **runner_options(config, app)), (config.host, config.port), context)]
    if config.metrics_listen is not None:
        ops = create_ops_app(app)
        listeners.append((web.AppRunner(ops, **runner_options(config, ops)), config.metrics_listen, None))
    reloadables = _reloadables(config, app, context)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_all, reloadables)
    watcher = loop.create_task(watch(reloadables), name="watch reloadable files")
    sites: list[GuardedSite] = []
    try:
        for runner, (host, port), ssl_context in listeners:
            await runner.setup()
            sites.append(GuardedSite(runner, host, port, config.connections, ssl_context))
            await sites[-1].start()
        on_ready()
        await stop.wait()
        app[SERVICES].draining = True
        log.info("shutting down: responses under way have %gs to finish", config.shutdown_grace)
    finally:
        watcher.cancel()

        # The grace is one deadline for the whole process. aiohttp's shutdown_timeout is not: it
        # waits that long for a handler, then as long again after cancelling only the request's
        # body (RequestHandler.shutdown), and each runner waits in turn.
        def abandon() -> None:
            for site in sites:
                site.abandon()
        grace_over = loop.call_later(config.shutdown_grace, abandon)
        try:
            # The API first; the ops listener last, so probes see the drain until the end.
            for runner, _, _ in listeners:
                await runner.cleanup()
        finally:
            grace_over.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _reloadables(config: Config, app: web.Application, context: ssl.SSLContext | None) -> list[Reloadable]:
    reloadables = []
    if config.tls is not None and context is not None:
        tls = config.tls
        reloadables.append(Reloadable("TLS certificate", (tls.cert, tls.key), lambda: reload_certificate(context, tls)))
    gate = app.get(GATE)
    if gate is not None and gate.htpasswd is not None:
        reloadables.append(Reloadable("htpasswd file", (gate.htpasswd.path,), gate.htpasswd.load))
    return reloadables


async def _open_index(path: Path, clock: Callable[[], float] | None) -> tuple[Index, str | None]:
    """The cache's index, or, where its file cannot be opened (corrupt, or on a failing disk), a
    temporary one in memory rebuilt from the blobs as after a crash, so that the mirror still
    serves; the file is left as it is for the operator, and the second value says why."""
    index = Index(path, clock=clock)
    try:
        await index.open()
        return index, None
    except CacheWriteError as exc:
        await index.close()
        problem = (f"the index file {path} cannot be opened ({exc.message}): running on a temporary index in memory "
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
