"""Connection-level limits that aiohttp's server does not have: a deadline for each request head,
and a cap on open connections. Together with aiohttp's keep-alive timeout and its limits on
header sizes, they keep slow or hostile clients (slowloris) from holding the mirror's sockets.

A `_Guard` sits between the socket and aiohttp's protocol, forwarding everything. It watches only
for the blank line that ends a request head: from a connection's first moment, and from the first
byte of each further request, the head must be complete within `header_timeout`, or the
connection is closed. Past `max_connections`, a new connection is closed at once. Once the
shutdown grace is over, `abandon` drops every connection still open.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from aiohttp import web

from mirror.config import ConnectionLimits

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"
# A flood of refused connections is one warning per this many seconds, not one per connection.
_REFUSAL_LOG_INTERVAL = 10.0


class GuardedSite(web.TCPSite):
    """aiohttp's TCP site, with every connection behind a `_Guard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self.limits = limits
        self.connections: set[_Guard] = set()
        self.abandoned = False
        self.refused = 0
        self.refusal_logged = -_REFUSAL_LOG_INTERVAL

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guard(server(), self), self._host, self._port, ssl=self._ssl_context,
            backlog=self._backlog, reuse_address=True,
            # The handshake comes before any request head: it gets the same deadline.
            ssl_handshake_timeout=self.limits.header_timeout if self._ssl_context else None)

    @property
    def open(self) -> int:
        return len(self.connections)

    def abandon(self) -> None:
        """The shutdown grace is over: drop every connection, those still open and any that
        arrives later. aiohttp's own shutdown timeout cannot be the bound (see `mirror.app.serve`);
        a dropped connection ends its handler at once (handler_cancellation)."""
        self.abandoned = True
        for guard in list(self.connections):
            guard.abort()


class _Guard(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, site: GuardedSite) -> None:
        self._inner = inner
        self._site = site
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._site.abandoned:
            transport.abort()
            return
        if self._site.open >= self._site.limits.max_connections:
            self._site.refused += 1
            now = time.monotonic()
            if now - self._site.refusal_logged >= _REFUSAL_LOG_INTERVAL:
                log.warning("refusing connections: %d are open (connections.max); %d refused since the last "
                            "warning", self._site.open, self._site.refused)
                self._site.refusal_logged, self._site.refused = now, 0
            transport.abort()
            return
        self._site.connections.add(self)
        self._transport = transport
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        if self._deadline is None:
            self._arm()  # the first byte of a new request head
        seen = self._tail + data
        end = seen.rfind(_HEAD_END)
        if end >= 0:
            self._disarm()
            if end + len(_HEAD_END) < len(seen):
                self._arm()  # pipelined: the next head has begun
        self._tail = seen[-(len(_HEAD_END) - 1):]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self in self._site.connections:
            self._site.connections.discard(self)
            self._inner.connection_lost(exc)
        self._transport = None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._site.limits.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._transport is not None and not self._transport.is_closing():
            log.info("closing a connection whose request head took over %gs", self._site.limits.header_timeout)
            self._transport.abort()
