"""`/metrics`, `/healthz` and `/readyz`, beside the API or on a listener of their own. None of
them touches an upstream: a mirror whose upstream is down is still alive and ready, since it
serves what it has."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirror.access import ROUTE
from mirror.metrics import Metrics

Readiness = Callable[[], Awaitable[tuple[dict[str, str], dict[str, str]]]]
"""(What is not ready, what works in a degraded way), by check name; both empty when all is well."""


class OpsHandlers:
    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self._metrics = metrics
        self._readiness = readiness

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    async def metrics(self, request: web.Request) -> web.Response:
        request[ROUTE] = "ops"
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        request[ROUTE] = "ops"
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        request[ROUTE] = "ops"
        problems, degraded = await self._readiness()
        if problems:
            return web.json_response({"status": "unready", "problems": problems, **_shown(degraded)}, status=503)
        return web.json_response({"status": "ready", **_shown(degraded)})


def _shown(degraded: dict[str, str]) -> dict[str, dict[str, str]]:
    return {"degraded": degraded} if degraded else {}
