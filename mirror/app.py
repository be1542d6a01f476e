"""The HTTP application: `create_app(config)` builds one self-contained mirror on the services
`open_services` opens, and `serve` runs it with its listeners, signals and shutdown grace. All
state hangs off the application (no module globals), so tests can run several mirrors in one
process."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from mirror.access import ACCESS_LOG, METRICS, AccessLogger
from mirror.cluster import Cluster
from mirror.config import Config
from mirror.connections import GuardedSite
from mirror.console import Console
from mirror.errors import MirrorError
from mirror.gate import Gate
from mirror.handlers import PROXY, REFERRERS, SIGNATURES, ClusterHandlers, RegistryHandlers, errors_middleware
from mirror.logs import protect as protect_logs
from mirror.metrics import Metrics
from mirror.ops import OpsHandlers
from mirror.reload import Reloadable, reload_all, watch
from mirror.routing import Router
from mirror.services import Services, open_services
from mirror.status import Status
from mirror.tls import reload_certificate, server_context

log = logging.getLogger(__name__)

# How often access times are written to the index, in one transaction.
ACCESS_FLUSH_INTERVAL = 10.0
# How often content past its upstream's max_age is looked for.
EXPIRE_INTERVAL = 60.0
# Big enough that the download loop hands the hasher and disk megabyte-sized writes.
UPSTREAM_READ_BUFFER = 4 << 20


SERVICES = web.AppKey("services", Services)
GATE = web.AppKey("gate", Gate)
STATUS = web.AppKey("status", Status)


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
    if config.redis is not None:
        ClusterHandlers(lambda: _cluster(app)).add_routes(app)
    Console(config, gate, lambda: app[STATUS]).add_routes(app, config.path_prefix)
    RegistryHandlers(Router(config), gate).add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with open_services(config, metrics, clock) as services:
            app[SERVICES] = services
            app[PROXY] = services.proxy
            app[REFERRERS] = services.referrers
            app[STATUS] = Status(services, metrics)
            if services.signatures is not None:
                app[SIGNATURES] = services.signatures
            metrics.downloads_in_flight.set_function(lambda: len(services.proxy.fills))
            metrics.cache_size.set_function(lambda: services.evictor.usage)
            metrics.cache_blobs.set_function(lambda: services.evictor.blobs)
            if services.cluster is not None:
                metrics.cluster_coordination.set_function(lambda: float(services.coordination_problem() is None))
            if config.eviction.max_size is not None:
                metrics.cache_max_size.set(config.eviction.max_size)
            yield

    app.cleanup_ctx.append(lifecycle)
    return app


def _cluster(app: web.Application) -> Cluster:
    cluster = app[SERVICES].cluster
    assert cluster is not None, "cluster routes are only added with redis set"
    return cluster


def create_ops_app(app: web.Application, config: Config) -> web.Application:
    """The /metrics, /healthz, /readyz and the status page of `app`, for a listener of their own.
    That listener is plain HTTP: beside a TLS API it only shows, so that no administrator's
    credentials for a change travel in the clear."""
    ops = web.Application(middlewares=[errors_middleware])
    ops[METRICS] = app[METRICS]
    OpsHandlers(app[METRICS], lambda: _readiness(app)).add_routes(ops)
    Console(config, app.get(GATE), lambda: app[STATUS], actions=config.tls is None).add_routes(ops)
    return ops


async def _readiness(app: web.Application) -> tuple[dict[str, str], dict[str, str]]:
    """What keeps this replica from serving, and what it serves without (Redis: it then
    downloads without the other replicas)."""
    services = app.get(SERVICES)
    if services is None:
        return {"startup": "the cache is not open yet"}, {}
    problems: dict[str, str] = {}
    degraded: dict[str, str] = {}
    if services.draining:
        problems["shutdown"] = "shutting down"
    try:
        await services.store.check_writable()
    except OSError as exc:
        problems["cache"] = (f"the cache disk is full: {exc.strerror}" if exc.errno == errno.ENOSPC
                             else f"cannot write to the cache directory: {exc.strerror}")
    except MirrorError as exc:
        problems["storage"] = exc.message
    try:
        await services.index.ping()
    except MirrorError as exc:
        # A cluster's index is Redis: without it a replica serves all the same, alone.
        (degraded if services.cluster is not None else problems)["index"] = \
            f"the index does not answer: {exc.message}"
    if services.index_problem is not None:
        problems["index"] = services.index_problem
    if (alone := services.coordination_problem()) is not None:
        degraded["cluster"] = alone
    return problems, degraded


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
        ops = create_ops_app(app, config)
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


