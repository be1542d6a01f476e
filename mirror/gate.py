"""The HTTP side of client authentication: who a request comes from, the challenge that sends a
client to log in, and the token service `docker login`, containerd and skopeo use.

The challenge is the registry token flow's (`Bearer realm=".../token",service="mirror"`): the
client fetches a token from the realm with its htpasswd credentials (HTTP Basic, or an OAuth2
password grant), then presents it. Basic on every request and TLS client certificates work too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from aiohttp import web

from mirror.access import ROUTE, USER
from mirror.auth import ANONYMOUS, Htpasswd, Identity, Policy, Tokens, parse_basic
from mirror.config import AuthConfig, Config
from mirror.errors import Denied, RequestInvalid, Unauthorized
from mirror.routing import Route

log = logging.getLogger(__name__)

SERVICE = "mirror"
"""The token audience, and the `service` of every challenge."""
_HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::\d+)?|\[[0-9A-Fa-f:.]+\](?::\d+)?")
_MAX_FORM = 8192
_FORM_TIMEOUT = 10.0


class Gate:
    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        auth: AuthConfig = config.auth
        self._prefix = config.path_prefix
        self._realm = auth.realm
        self.policy = Policy(auth)
        self.htpasswd = Htpasswd(auth.htpasswd) if auth.htpasswd is not None else None
        self.tokens = Tokens(auth.token_lifetime, auth.token_key_file, clock)

    def add_routes(self, app: web.Application) -> None:
        for base in {"", self._prefix}:
            app.router.add_route("GET", f"{base}/token", self.token)
            app.router.add_route("POST", f"{base}/token", self.token)

    async def check_base(self, request: web.Request) -> None:
        """`/v2/`: the door `docker login` knocks on. With accounts configured, only a client that
        has authenticated gets through; the rest learn where to log in."""
        identity = await self.identify(request)
        if identity is None or (self.policy.required and identity.user is None):
            raise Unauthorized("authentication required", challenge=self._challenge(request, None))

    async def check(self, request: web.Request, route: Route) -> None:
        """Before the cache is consulted: refusals are the same whether or not the content is cached."""
        identity = await self.identify(request)
        if identity is None:
            raise Unauthorized("invalid credentials", challenge=self._challenge(request, route))
        if not self.policy.allows(identity, route.upstream.name, route.name):
            if identity.user is None and self.policy.required:
                raise Unauthorized("authentication required", challenge=self._challenge(request, route))
            raise Denied("access to this repository is denied")

    async def identify(self, request: web.Request) -> Identity | None:
        """The identity a request proves; None when it presents credentials that do not hold."""
        header = request.headers.get("Authorization")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                user = self.tokens.user(value.strip(), SERVICE)
                return None if user is None else self._as(request, user)
            basic = parse_basic(header)
            return await self._verified(request, *basic) if basic else None
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if peer and (user := _common_name(peer)):
            return self._as(request, user)
        return ANONYMOUS

    async def _verified(self, request: web.Request, user: str, password: str) -> Identity | None:
        """The account `user`, if `password` is its password."""
        if self.htpasswd is None or not await self.htpasswd.verify(user, password, _client(request)):
            return None
        return self._as(request, user)

    def _as(self, request: web.Request, user: str) -> Identity:
        identity = self.policy.identity(user)
        if identity.user:
            request[USER] = identity.user
        return identity

    async def token(self, request: web.Request) -> web.Response:
        """GET with Basic credentials (or none, for an anonymous token), or an OAuth2 password grant."""
        request[ROUTE] = "token"
        identity: Identity | None = ANONYMOUS
        if request.method == "POST":
            form = await _form(request)
            grant = form.get("grant_type")
            if grant != "password":
                raise RequestInvalid(f"grant_type {str(grant)[:40]!r} is not supported; use password")
            identity = await self._verified(request, form.get("username", ""), form.get("password", ""))
        elif "Authorization" in request.headers:
            basic = parse_basic(request.headers["Authorization"])
            identity = await self._verified(request, *basic) if basic else None
        if identity is None:
            log.info("token refused: bad credentials")
            raise Unauthorized("invalid username or password", challenge=f'Basic realm="{SERVICE}"')
        issued = datetime.now(UTC)
        token = self.tokens.issue(identity, SERVICE)
        return web.json_response({"token": token, "access_token": token, "expires_in": int(self.tokens.lifetime),
                                  "issued_at": issued.isoformat(timespec="seconds").replace("+00:00", "Z")},
                                 headers={"Cache-Control": "no-store"})

    def close(self) -> None:
        if self.htpasswd is not None:
            self.htpasswd.close()

    def _challenge(self, request: web.Request, route: Route | None) -> str:
        host = request.host if _HOST_RE.fullmatch(request.host) else "localhost"  # never quote-breaking text
        realm = self._realm or f"{request.scheme}://{host}{self._prefix}/token"
        challenge = f'Bearer realm="{realm}",service="{SERVICE}"'
        if route is not None:
            challenge += f',scope="repository:{route.name}:pull"'
        return challenge


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


async def _form(request: web.Request) -> dict[str, str]:
    """An OAuth2 form: small, URL-encoded, prompt; anything else is the client's error."""
    body = await small_body(request, "application/x-www-form-urlencoded", "token request")
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestInvalid(f"unreadable token request: {type(exc).__name__}") from exc


async def small_body(request: web.Request, media_type: str, what: str, limit: int = _MAX_FORM) -> bytes:
    """The body of a request that must be small, of `media_type`, and prompt (a slow or endless
    body would hold a handler); anything else is the client's error."""
    if request.content_type != media_type:
        raise RequestInvalid(f"a {what}'s body must be {media_type}")
    if (request.content_length or 0) > limit:
        raise RequestInvalid(f"a {what}'s body may be {limit} bytes at most")
    try:
        async with asyncio.timeout(_FORM_TIMEOUT):
            body = await request.content.read(limit + 1)
    except TimeoutError as exc:
        raise RequestInvalid(f"unreadable {what}: {type(exc).__name__}") from exc
    if len(body) > limit:
        raise RequestInvalid(f"a {what}'s body may be {limit} bytes at most")
    return body


def _common_name(peercert: object) -> str | None:
    """The subject CN of a verified client certificate (`ssl.SSLSocket.getpeercert()` form)."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                return value
    return None

