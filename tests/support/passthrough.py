"""A streaming pass-through in front of a real registry, for tests that need to know exactly how
far a download has got: it counts every request the mirror makes, and can hold a blob at a byte
offset until the test releases it (so a test can kill the mirror while a fill is known to be
half-way, without sleeping).

Unlike the `counting` fixture it never buffers a body: bytes reach the mirror as the registry
sends them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

CHUNK = 256 * 1024
# Hop-by-hop and framing headers that aiohttp sets itself on the way out.
_DROP = {"transfer-encoding", "connection", "keep-alive", "date", "server"}


@dataclass
class Passthrough:
    target: str
    url: str = ""
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    holds: dict[str, tuple[int, asyncio.Event]] = field(default_factory=dict)
    """digest -> (offset, release): a blob GET sends `offset` bytes of its body, then waits."""

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        """Requests by method and by path kind ('manifests', 'blobs', 'tags')."""
        return sum(n for (m, path), n in self.requests.items()
                   if (method is None or m == method) and (kind is None or f"/{kind}/" in path))

    def reset(self) -> None:
        self.requests.clear()

    def hold(self, digest: str, offset: int) -> None:
        self.holds[digest] = (offset, asyncio.Event())

    def release_all(self) -> None:
        for _, release in self.holds.values():
            release.set()
        self.holds.clear()

    async def _forward(self, session: aiohttp.ClientSession, request: web.Request) -> web.StreamResponse:
        self.requests[(request.method, request.path)] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        hold = None
        if request.method == "GET" and "/blobs/" in request.path:
            hold = self.holds.get(request.path.rsplit("/", 1)[1])
        async with session.request(request.method, f"{self.target}{request.rel_url}", headers=headers,
                                   allow_redirects=False) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _DROP})
            try:
                await response.prepare(request)
                if request.method == "HEAD":
                    return response
                sent = 0
                async for piece in upstream.content.iter_chunked(CHUNK):
                    chunk = piece
                    if hold is not None and sent <= hold[0] < sent + len(chunk):
                        before = hold[0] - sent
                        if before:
                            await response.write(chunk[:before])
                        sent, chunk = hold[0], chunk[before:]
                        await hold[1].wait()
                        hold = None
                    await response.write(chunk)
                    sent += len(chunk)
                await response.write_eof()
            except (ConnectionError, aiohttp.ClientError):
                pass  # the mirror went away (it was killed): nothing left to send it
            return response


@asynccontextmanager
async def passthrough(target: str) -> AsyncIterator[Passthrough]:
    state = Passthrough(target)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def forward(request: web.Request) -> web.StreamResponse:
            return await state._forward(session, request)

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", forward)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        state.url = str(server.make_url("")).rstrip("/")
        try:
            yield state
        finally:
            state.release_all()
            await server.close()
