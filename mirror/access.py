"""One record per finished request: the access log line and the request metrics.

It is aiohttp's access-logger hook, which runs once a response's last byte is out (or its client
has gone), so durations and byte counts cover the whole response, sendfile included. Handlers
leave what only they know on the request: its route, its upstream and, for streamed bodies,
the bytes sent.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirror.activity import Failure
from mirror.errors import MirrorError
from mirror.metrics import KINDS, Metrics
from mirror.oci import attachment_subject

METRICS = web.AppKey("metrics", Metrics)
ROUTE = web.RequestKey("route", str)
"""The route label: manifest, blob, tags, referrers, base, token, ops or status."""
UPSTREAM = web.RequestKey("upstream", str)
"""The name of the upstream the request went to."""
IMAGE = web.RequestKey("image", tuple[str, str])
"""The repository and reference (tag or digest) a registry request named."""
ERROR = web.RequestKey("error", MirrorError)
"""The error a request was answered with."""
USER = web.RequestKey("user", str)
"""The user the request authenticated as."""
SENT = web.RequestKey("sent", int)
"""Body bytes sent, where aiohttp cannot count them (sendfile, streams)."""
CACHE_HEADER = "X-Mirror-Cache"

ACCESS_LOG = logging.getLogger("mirror.access")
# The method label's values; any other method a client invents counts as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class AccessLogger(AbstractAccessLogger):
    metrics: Metrics | None = None

    @classmethod
    def counting_into(cls, metrics: Metrics) -> type[AccessLogger]:
        """This logger, counting into one app's metrics (aiohttp builds it from its class; a
        request that never reached an app, such as a malformed one, still counts)."""
        return type("CountingAccessLogger", (cls,), {"metrics": metrics})

    @property
    def enabled(self) -> bool:
        # Metrics count every request, whatever the log level.
        return True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get(ROUTE, "other")
        sent = _body_bytes(request, response)
        cache = response.headers.get(CACHE_HEADER)
        if self.metrics is not None:
            _count(self.metrics, request.method, route, response.status, sent, cache, time)
            if UPSTREAM in request:
                _record(self.metrics, request, route, response.status, sent, cache)
        if self.logger.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "remote": request.remote or "-", "user": request.get(USER), "method": request.method,
                "path": request.path_qs,
                "protocol": f"HTTP/{request.version.major}.{request.version.minor}", "status": response.status,
                "bytes": sent, "duration_seconds": round(time, 6), "cache": cache,
                "upstream": request.get(UPSTREAM), "user_agent": request.headers.get("User-Agent"),
            }
            self.logger.info(_common_log_line(fields), extra={"access": fields})


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    if SENT in request:
        return request[SENT]
    if request.method == "HEAD" or not isinstance(response, web.Response):
        return 0
    body = response.body
    return len(body) if isinstance(body, bytes | bytearray) else 0


def _count(metrics: Metrics, method: str, route: str, status: int, sent: int, cache: str | None,
           time: float) -> None:
    metrics.requests.labels(route, method if method in _METHODS else "other", str(status)).inc()
    metrics.request_seconds.labels(route).observe(time)
    if cache is not None and route in KINDS:
        result = cache.lower()
        metrics.cache_requests.labels(route, result).inc()
        if result == "joined":
            metrics.coalesced.labels(route).inc()
    if status < 400 and route in ("manifest", "blob", "tags"):
        metrics.served_bytes.labels("upstream" if cache in (None, "MISS") else "cache").inc(sent)


def _record(metrics: Metrics, request: web.BaseRequest, route: str, status: int, sent: int,
            cache: str | None) -> None:
    """The request in the status page's activity, under the conditions `_count` counts it."""
    upstream = request[UPSTREAM]
    name, reference = request.get(IMAGE, ("", ""))
    from_cache = cache not in (None, "MISS")
    body = sent if status < 400 and route in ("manifest", "blob", "tags") else 0
    metrics.activity.served(upstream, cache is not None and route in KINDS, from_cache,
                            body if from_cache else 0, 0 if from_cache else body)
    if route == "manifest" and status == 200 and request.method == "GET":
        metrics.activity.pulled(upstream, name, reference)
    if (route in ("manifest", "blob", "tags", "referrers") and status != 401
            and (error := request.get(ERROR)) is not None
            and not (status == 404 and attachment_subject(reference) is not None)):
        # 401s are the login handshake, and 404s for signature and referrer tags the probes of
        # every verifier, not failures. A body cut short (a download that failed after its
        # headers went out) is shown with the status its error would have had.
        metrics.activity.failed(Failure(metrics.activity.now(), upstream, name, reference, route,
                                        status if status >= 400 else error.status, error.code, error.message))


def _common_log_line(fields: dict[str, Any]) -> str:
    """Common Log Format, then the fields it has no place for."""
    when = datetime.now(UTC).strftime("%d/%b/%Y:%H:%M:%S +0000")
    return (f'{fields["remote"]} - {fields["user"] or "-"} [{when}] '
            f'"{fields["method"]} {fields["path"]} {fields["protocol"]}" {fields["status"]} {fields["bytes"]} '
            f'{fields["duration_seconds"]:.3f}s '
            f'cache={fields["cache"] or "-"} upstream={fields["upstream"] or "-"}')
