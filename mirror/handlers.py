"""The `/v2/` HTTP surface: parse the request, ask the proxy, write the response.

Errors are rendered here and nowhere else: the middleware turns every `MirrorError` (and
aiohttp's own HTTP errors) into OCI error JSON before the first byte. Once a blob response has
started, a failure can only cut the connection, which is exactly what keeps a client from
accepting a short or unverified blob.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from mirror.access import CACHE_HEADER, ERROR, IMAGE, ROUTE, SENT, UPSTREAM
from mirror.cluster import FILL_PATH, SIZE_HEADER, TOKEN_HEADER, Cluster, check_token
from mirror.errors import (
    BlobUnknown,
    Internal,
    MirrorError,
    NotFound,
    PaginationInvalid,
    RangeInvalid,
    Unsupported,
)
from mirror.flight import Fill
from mirror.gate import Gate
from mirror.oci import OCI_INDEX, Digest, parse_tag
from mirror.policy import SignatureGate
from mirror.proxy import CachedBlob, CacheResult, Proxy, StreamingBlob
from mirror.referrers import Referrers
from mirror.routing import Endpoint, Route, Router

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
# The largest tag-list page asked of an upstream.
MAX_PAGE = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROXY = web.AppKey("proxy", Proxy)
REFERRERS = web.AppKey("referrers", Referrers)
SIGNATURES = web.AppKey("signatures", SignatureGate)


def error_response(error: MirrorError) -> web.Response:
    return web.json_response(error.to_json(), status=error.status, headers={**API_VERSION, **error.headers()})


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MirrorError as error:
        request[ERROR] = error
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(NotFound(exc.reason) if exc.status == 404 else Unsupported(exc.reason))
        response.set_status(exc.status)
        return response
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # A bug: the client still gets OCI JSON, the log gets the traceback.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(Internal("internal error"))


class RegistryHandlers:
    """The proxy is looked up per request under `PROXY`: it is built at start-up, after the
    routes are frozen."""

    def __init__(self, router: Router, gate: Gate | None) -> None:
        self._router = router
        self._gate = gate

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{path:.*}", self.dispatch)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        # The raw path, decoded once: `%2e%2e` becomes `..` and then fails the name grammar.
        raw = unquote(request.raw_path.split("?", 1)[0])
        named, path = self._router.locate(raw)
        if not path:
            request[ROUTE] = "base"
            if request.method not in ("GET", "HEAD"):
                raise Unsupported(f"{request.method} is not supported on the API base")
            if self._gate is not None:
                await self._gate.check_base(request)
            return web.json_response({}, headers=API_VERSION)
        route = self._router.resolve(path, request.query.get("ns"), named)
        request[ROUTE] = route.endpoint.value if route.endpoint is not Endpoint.UPLOAD else "other"
        request[UPSTREAM] = route.upstream.name
        request[IMAGE] = (route.name, str(route.reference) if route.reference is not None else "")
        if request.method not in ("GET", "HEAD") or route.endpoint is Endpoint.UPLOAD:
            raise Unsupported(f"{request.method} is not supported: this is a read-only pull-through mirror")
        if self._gate is not None:
            await self._gate.check(request, route)
        if route.endpoint is Endpoint.MANIFEST:
            return await self.manifest(request, route)
        if route.endpoint is Endpoint.BLOB:
            return await self.blob(request, route)
        if route.endpoint is Endpoint.REFERRERS:
            return await self.referrers(request, route)
        return await self.tags(request, route)

    async def manifest(self, request: web.Request, route: Route) -> web.Response:
        # Go clients (skopeo, containerd, Docker) send one Accept header line per media type.
        accept = ", ".join(request.headers.getall("Accept", [])) or None
        result = await request.app[PROXY].manifest(route, accept)
        if (signatures := request.app.get(SIGNATURES)) is not None:
            await signatures.check(route, result)
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": str(result.digest),
            "Content-Type": result.media_type,
            "Etag": f'"{result.digest}"',
            CACHE_HEADER: result.cache.value,
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(result.body))
            return web.Response(headers=headers)
        return web.Response(body=result.body, headers=headers)

    async def blob(self, request: web.Request, route: Route) -> web.StreamResponse:
        assert route.reference is not None and route.reference.digest is not None
        headers = {**API_VERSION, "Docker-Content-Digest": str(route.reference.digest),
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            head = await request.app[PROXY].blob_head(route)
            if head.size is not None:
                headers["Content-Length"] = str(head.size)
            return web.Response(headers={**headers, CACHE_HEADER: head.cache.value})

        blob = await request.app[PROXY].blob(route)
        if isinstance(blob, CachedBlob):
            return await self._cached_blob(request, blob, headers)
        with blob.file:
            return await self._streaming_blob(request, blob, headers)

    async def _cached_blob(self, request: web.Request, blob: CachedBlob, headers: dict[str, str]
                           ) -> web.StreamResponse:
        proxy = request.app[PROXY]
        headers = {**headers, CACHE_HEADER: CacheResult.HIT.value}
        if blob.body is not None:
            start, end = self._range(request, blob.size) or (0, blob.size)
            if end - start == blob.size:
                return web.Response(body=blob.body, headers=headers)
            return web.Response(body=blob.body[start:end], status=206, headers={
                **headers, "Content-Range": f"bytes {start}-{end - 1}/{blob.size}"})
        if blob.redirect is not None:
            # The client fetches it from the bucket itself (a Range goes with it there).
            proxy.done_reading(blob)
            return web.Response(status=307, headers={**headers, "Location": blob.redirect})
        try:
            window = self._range(request, blob.size)
        except RangeInvalid:
            proxy.done_reading(blob)
            raise
        if blob.path is not None:
            # sendfile, with the 206 itself left to aiohttp once the range is known to be good.
            return CachedBlobResponse(blob.path, lambda: proxy.done_reading(blob),
                                      "Range" in request.headers and window is None, headers=headers)
        try:
            start, end = window or (0, blob.size)
            response = web.StreamResponse(headers=headers)
            if window is not None:
                response.set_status(206)
                response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
            response.content_length = end - start
            return await _send(request, response, proxy.chunks(blob, start, end))
        finally:
            proxy.done_reading(blob)

    async def _streaming_blob(self, request: web.Request, blob: StreamingBlob, headers: dict[str, str]
                              ) -> web.StreamResponse:
        size = await blob.fill.started()
        window = self._range(request, size) if size is not None else None
        start, end = window or (0, size)
        response = web.StreamResponse(headers={**headers, CACHE_HEADER: blob.cache.value})
        if window is not None:
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{window[1] - 1}/{size}"
        if end is not None:
            response.content_length = end - start
        else:
            response.enable_chunked_encoding()
        return await _tail(request, response, blob.fill, blob.file, start, end)

    @staticmethod
    def _range(request: web.Request, size: int) -> tuple[int, int] | None:
        """The one byte range asked for, as [start, stop); None where there is no Range or it
        cannot be parsed (RFC 9110: ignore it and send the whole blob)."""
        if "Range" not in request.headers:
            return None
        try:
            window = request.http_range
        except ValueError:
            return None
        start, stop = window.start, window.stop
        if start is None and stop is None:
            return None
        if start is not None and start < 0:
            start, stop = max(size + start, 0), size
        start = start or 0
        stop = size if stop is None else min(stop, size)
        if start >= size or start >= stop:
            raise RangeInvalid(f"range {request.headers['Range']!r} is outside a blob of {size} bytes", size)
        return start, stop

    async def referrers(self, request: web.Request, route: Route) -> web.Response:
        result = await request.app[REFERRERS].answer(route)
        body, filtered = result.response(request.query.get("artifactType"))
        headers = {**API_VERSION, "Content-Type": OCI_INDEX, CACHE_HEADER: result.cache.value}
        if filtered:
            headers["OCI-Filters-Applied"] = "artifactType"
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return web.Response(headers=headers)
        return web.Response(body=body, headers=headers)

    async def tags(self, request: web.Request, route: Route) -> web.Response:
        query = {k: v for k, v in request.query.items() if k in ("n", "last")}
        if "n" in query and not (query["n"].isascii() and query["n"].isdigit() and int(query["n"]) <= MAX_PAGE):
            raise PaginationInvalid(f"n must be a count from 0 to {MAX_PAGE}", {"n": query["n"][:20]})
        if "last" in query:
            # A tag the client saw on the last page; anything else is refused before the upstream.
            parse_tag(query["last"])
        body, link = await request.app[PROXY].tags(route, query)
        headers = {**API_VERSION}
        if link:
            headers["Link"] = _rewrite_link(link, request)
        return web.Response(body=body, content_type="application/json", headers=headers)


class CachedBlobResponse(web.FileResponse):
    """A cached blob, sent with sendfile (Range, 206 and 416 handled by aiohttp). It tells the
    proxy when it is done with the file, so eviction never removes it from under the send."""

    def __init__(self, path: Path, done: Callable[[], None], ignore_range: bool, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._done = done
        self._ignore_range = ignore_range

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        original = request
        try:
            if self._ignore_range:
                # A Range that cannot be parsed is ignored (RFC 9110): the whole blob goes.
                headers = CIMultiDict(request.headers)
                headers.popall("Range")
                request = request.clone(headers=headers)
            writer = await super().prepare(request)
            if request.method != "HEAD" and self.status in (200, 206):
                original[SENT] = self.content_length or 0
            return writer
        finally:
            self._done()


async def _tail(request: web.Request, response: web.StreamResponse, fill: Fill, file: BinaryIO, start: int,
                end: int | None) -> web.StreamResponse:
    """Send bytes [start, end) of a fill as they land (the last only once verified)."""
    if end == start:
        # An empty body is complete with the headers: they must wait for verification.
        await fill.verified()

    async def pieces() -> AsyncGenerator[bytes | tuple[BinaryIO, int, int], None]:
        async with aclosing(fill.windows(file, start, end)) as windows:
            async for source, offset, count in windows:
                if end is None:
                    # Size unknown: the bytes must go through aiohttp's chunk framing.
                    yield await asyncio.to_thread(os.pread, source.fileno(), count, offset)
                else:
                    yield source, offset, count
    return await _send(request, response, pieces())


async def _send(request: web.Request, response: web.StreamResponse,
                body: AsyncGenerator[bytes | tuple[BinaryIO, int, int], None]) -> web.StreamResponse:
    """Send a body as it comes: bytes, or (file, offset, count) windows sent with sendfile. A
    failure once the headers are out can only be said by cutting the connection."""
    try:
        await response.prepare(request)
    except ConnectionError:
        return response
    loop = asyncio.get_running_loop()
    request[SENT] = 0
    try:
        async with aclosing(body) as pieces:
            async for piece in pieces:
                if request.transport is None:
                    return response
                if isinstance(piece, bytes):
                    await response.write(piece)
                    request[SENT] += len(piece)
                else:
                    # Zero-copy from the cache file (asyncio falls back to copying where the
                    # transport cannot sendfile, e.g. TLS).
                    await loop.sendfile(request.transport, *piece)
                    request[SENT] += piece[2]
    except ConnectionError:
        return response
    except (OSError, MirrorError) as error:
        log.warning("aborting %s: %s", request.path, error.message if isinstance(error, MirrorError) else error)
        if isinstance(error, MirrorError):
            request[ERROR] = error
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


class ClusterHandlers:
    """The internal endpoint from which the other replicas stream a download this one leads."""

    def __init__(self, cluster: Callable[[], Cluster]) -> None:
        self._cluster = cluster

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(FILL_PATH + "{digest}", self.fill)

    async def fill(self, request: web.Request) -> web.StreamResponse:
        request[ROUTE] = "cluster"
        check_token(self._cluster().token, request.headers.get(TOKEN_HEADER))
        digest = Digest.parse(request.match_info["digest"])
        start = request.query.get("from", "0")
        if not (start.isascii() and start.isdigit()):
            raise RangeInvalid(f"from={start[:20]!r} is not a byte offset", 0)
        fill = request.app[PROXY].fills.active(digest)
        size = await fill.started() if fill is not None else None
        file = fill.reader() if fill is not None else None
        if fill is None or file is None:
            raise BlobUnknown(f"{digest} is not downloading on this replica")
        with file:
            response = web.StreamResponse(headers={SIZE_HEADER: str(size)} if size is not None else {})
            if size is not None:
                response.content_length = max(size - int(start), 0)
            else:
                response.enable_chunked_encoding()
            return await _tail(request, response, fill, file, min(int(start), size or int(start)), size)


def _rewrite_link(link: str, request: web.Request) -> str:
    """Point the upstream's next-page link at this mirror's own path for the same listing."""
    target = link.split(";", 1)[0].strip().strip("<>")
    query = dict(parse_qsl(urlsplit(target).query))
    page = {k: v for k, v in query.items() if k in ("n", "last")}
    if "ns" in request.query:
        page["ns"] = request.query["ns"]
    return f'<{request.path}?{urlencode(page)}>; rel="next"'
