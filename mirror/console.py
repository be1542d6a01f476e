"""The status page (`/status`) and the JSON API behind it (`/api/v1/...`), which scripts and the
CLI's `--server` use too.

Who may see and do what: with accounts (an htpasswd), a login (HTTP Basic, or a token from
`/token`) is needed for all of it; each view shows only the repositories the viewer may pull;
changes (pin, unpin, gc, seed) need the `admin` permission of the access rules, or the admin
token (`admin.token_file`, sent as `Authorization: Bearer ...`). Without accounts the API is
read-only except to that token.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from mirror.access import ROUTE, USER
from mirror.auth import ANONYMOUS, Identity
from mirror.config import Config, read_admin_token
from mirror.errors import Denied, ManifestUnknown, RequestInvalid, Unauthorized
from mirror.gate import Gate, small_body
from mirror.routing import Router, manifest_path
from mirror.status import Status

API = "/api/v1"
_MAX_BODY = 64 * 1024
"""An admin request's body at most (a seed names its images)."""
_NO_STORE = {"Cache-Control": "no-store"}
# The page is ours alone: no script, style or frame from anywhere else, no framing by others.
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@dataclass(frozen=True, slots=True)
class Viewer:
    identity: Identity
    token: bool = False
    """Authenticated with the admin token: sees and may do everything."""


class Console:
    def __init__(self, config: Config, gate: Gate | None, status: Callable[[], Status], actions: bool = True) -> None:
        """`status` gives the running mirror's figures (its services open after the routes are made);
        without `actions`, the page and the API only read (a plain-HTTP listener beside a TLS one
        must not carry an administrator's credentials for changes)."""
        self._actions = actions
        self._gate = gate
        self._router = Router(config)
        self._status = status
        self._token = read_admin_token(config.admin_token_file) if config.admin_token_file is not None else None
        self._page = resources.files("mirror").joinpath("static/status.html").read_bytes()

    def add_routes(self, app: web.Application, prefix: str = "") -> None:
        for base in ("", prefix) if prefix else ("",):
            app.router.add_get(f"{base}/status", self.page)
            for view in ("status", "effectiveness", "downloads", "upstreams", "storage", "images", "failures"):
                app.router.add_get(f"{base}{API}/{view}", self.view)
            if self._actions:
                for action in ("pin", "unpin", "gc", "seed"):
                    app.router.add_post(f"{base}{API}/{action}", self.act)

    async def page(self, request: web.Request) -> web.Response:
        request[ROUTE] = "status"
        await self._viewer(request)
        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)

    async def view(self, request: web.Request) -> web.Response:
        request[ROUTE] = "status"
        viewer = await self._viewer(request)
        name = request.path.rsplit("/", 1)[1]

        def visible(upstream: str, repository: str) -> bool:
            return self._may(viewer, upstream, repository, "pull")

        def administrable(upstream: str, repository: str) -> bool:
            return self._actions and self._may(viewer, upstream, repository, "admin")
        status = self._status()
        # Where the mirror's credentials come from (user names, key files) is for administrators.
        secrets = self._may_everywhere(viewer)
        body: Any
        if name == "effectiveness":
            body = status.effectiveness()
        elif name == "downloads":
            body = status.downloads(visible)
        elif name == "upstreams":
            body = status.upstreams(secrets)
        elif name == "storage":
            body = await status.storage(visible)
        elif name == "images":
            body = await status.images(visible, administrable)
        elif name == "failures":
            body = status.failures(visible)
        else:
            body = {"viewer": {"user": viewer.identity.user, "admin": self._actions and self._may_everywhere(viewer)},
                    "effectiveness": status.effectiveness(), "downloads": status.downloads(visible),
                    "upstreams": status.upstreams(secrets), "storage": await status.storage(visible),
                    "failures": status.failures(visible)}
        return web.json_response(body, headers=_NO_STORE)

    async def act(self, request: web.Request) -> web.Response:
        request[ROUTE] = "status"
        viewer = await self._viewer(request)
        action = request.path.rsplit("/", 1)[1]
        if action == "gc" and not self._may_everywhere(viewer):
            self._refuse(viewer, "gc needs the admin permission on every repository (*), with no exception")
        if not viewer.token and self._gate is None:
            self._refuse(viewer, f"{action} needs the admin token")
        body = await _json_body(request)
        if action in ("pin", "unpin"):
            image = body.get("image")
            if not isinstance(image, str) or not image:
                raise RequestInvalid('expected {"image": "REPOSITORY:TAG"} (or REPOSITORY@DIGEST)')
            route = self._router.resolve(manifest_path(image))
            upstream, name = route.upstream.name, route.name
            self._check_admin(viewer, action, upstream, name)
            digest = await self._status().pin(upstream, name, str(route.reference), action == "pin")
            if digest is None:
                raise ManifestUnknown(f"{upstream}/{name}:{route.reference} is not cached in that repository; "
                                      "pull it through the mirror first")
            return web.json_response({"upstream": upstream, "name": name, "digest": digest,
                                      "pinned": action == "pin"}, headers=_NO_STORE)
        if action == "gc":
            dry_run = body.get("dry_run", False)
            if not isinstance(dry_run, bool):
                raise RequestInvalid("dry_run: expected true or false")
            return web.json_response(asdict(await self._status().gc(dry_run)), headers=_NO_STORE)
        images = body.get("images")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
            raise RequestInvalid('expected {"images": ["REPOSITORY:TAG", ...]}')
        specs = self._status().image_specs(images)
        for spec in specs:
            self._check_admin(viewer, action, spec.upstream.name, spec.name)
        return web.json_response(await self._status().seed(specs), headers=_NO_STORE)

    def _check_admin(self, viewer: Viewer, action: str, upstream: str, name: str) -> None:
        """Changing what is cached for a repository takes the admin permission there, and the
        pull permission (an answer names digests)."""
        if not (self._may(viewer, upstream, name, "admin") and self._may(viewer, upstream, name, "pull")):
            self._refuse(viewer, f"{action} needs the admin permission on {upstream}/{name}")

    async def _viewer(self, request: web.Request) -> Viewer:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if self._token is not None and scheme.lower() == "bearer" and \
                hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), self._token.encode()):
            request[USER] = "admin-token"
            return Viewer(ANONYMOUS, token=True)
        if self._gate is None:
            return Viewer(ANONYMOUS)
        identity = await self._gate.identify(request)
        if identity is None or (self._gate.policy.required and identity.user is None):
            # Basic, so that a browser asks for the login itself.
            raise Unauthorized("log in to see the mirror's status" if identity is not None else "invalid credentials",
                               challenge='Basic realm="mirror status", charset="UTF-8"')
        return Viewer(identity)

    def _may(self, viewer: Viewer, upstream: str, name: str, permission: str) -> bool:
        if viewer.token:
            return True
        if self._gate is None:
            return permission == "pull"
        return self._gate.policy.allows(viewer.identity, upstream, name, permission)

    def _may_everywhere(self, viewer: Viewer) -> bool:
        if viewer.token:
            return True
        return self._gate is not None and self._gate.policy.allows_everywhere(viewer.identity, "admin")

    def _refuse(self, viewer: Viewer, why: str) -> None:
        if viewer.identity.user is None and not viewer.token:
            raise Denied(f"{why}: authenticate as an administrator (or with the admin token)")
        raise Denied(why)


async def _json_body(request: web.Request) -> dict[str, Any]:
    """A small JSON object. Requiring the JSON type keeps other sites' forms out: a cross-origin
    JSON POST needs a CORS preflight, which this API never grants."""
    raw = await small_body(request, "application/json", "admin API request", _MAX_BODY)
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise RequestInvalid(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestInvalid("the body must be a JSON object")
    return body
