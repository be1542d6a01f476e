"""A scriptable in-process registry for faults a real one cannot produce on demand: the token
flow with a counting token endpoint, a CDN on another origin that rejects Authorization, a
wrong digest, a connection dropped mid-blob, a pause until the test says go, a 429; and the
referrers API, which the real one (distribution 2.8) lacks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import encode_basic_auth, web
from aiohttp.test_utils import TestServer

from tests.support.artifacts import referrer_descriptor
from tests.support.images import OCI_INDEX

CHUNK = 256 * 1024
DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


@dataclass
class Forced:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1_000_000
    body: bytes | None = None
    """Sent as it is, in place of an OCI error JSON."""
    gate: asyncio.Event | None = None
    """Answer only once this is set: an upstream that is slow to respond."""
    drop: bool = False
    """Close the connection without answering."""


@dataclass
class FakeUpstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    authorizations: list[str | None] = field(default_factory=list)
    """The Authorization header of every registry request, in order."""
    auth: Literal["none", "bearer", "basic"] = "none"
    credentials: tuple[str, str] | None = None
    token_lifetime: int = 300
    token_requests: list[tuple[str | None, dict[str, str]]] = field(default_factory=list)
    """(Authorization header, query) of every token request."""
    cdn_requests: list[str | None] = field(default_factory=list)
    """The Authorization header of every CDN request (should all be None)."""
    redirect_blobs: bool = False
    forced: dict[str, Forced] = field(default_factory=dict)
    """Path (e.g. /v2/x/manifests/latest) -> a response forced in place of the real one."""
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    """Path -> answer requests for it (as usual) only once the event is set."""
    failing: Forced | None = None
    """Forced in place of every registry answer (an upstream that is down, in one way or another)."""
    corrupt: set[str] = field(default_factory=set)
    """Blob digests served with their last byte flipped."""
    corrupt_manifests: set[str] = field(default_factory=set)
    """Manifest digests served with a byte appended (still valid JSON) under the original
    Docker-Content-Digest, so the body no longer matches the digest the upstream claims."""
    headers_for_manifests: dict[str, str] = field(default_factory=dict)
    """Sent with every manifest answer (Docker Hub's ratelimit-remaining, say)."""
    chunked_manifests: bool = False
    """Send manifest bodies with chunked encoding (no Content-Length)."""
    chunked_blobs: bool = False
    """Send blob bodies with chunked encoding (no Content-Length)."""
    blob_ranges: list[str | None] = field(default_factory=list)
    """The Range header of every blob GET (registry or CDN), in order."""
    drop_after: dict[str, int] = field(default_factory=dict)
    """digest -> cut the connection after this many bytes, on the first GET only."""
    gates: dict[str, tuple[int, asyncio.Event]] = field(default_factory=dict)
    """digest -> (offset, event): stop sending at offset until the event is set."""
    stages: dict[str, list[tuple[int, asyncio.Event]]] = field(default_factory=dict)
    """digest -> several such stops, in order: a download seen to move step by step."""
    ignore_range: bool = False
    realm: str | None = None
    """The token realm to advertise instead of this registry's own /token."""
    cdn_challenge: str | None = None
    """A WWW-Authenticate the CDN answers every request with (a 401)."""
    referrers: dict[tuple[str, str], list[dict[str, object]]] = field(default_factory=dict)
    """(name, subject digest) -> the descriptors the referrers API lists, in order."""
    referrers_api: bool = False
    """Serve GET /v2/<name>/referrers/<digest>; off, it is a 404 as on distribution 2.8."""
    referrers_filter: bool = True
    """Apply ?artifactType= (and say so in OCI-Filters-Applied); off, a registry that ignores it."""
    referrers_page_size: int | None = None
    """At most this many descriptors per referrers page, the rest behind a Link rel="next"."""
    url: str = ""
    cdn_url: str = ""
    _tokens: set[str] = field(default_factory=set)

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def add_manifest(self, name: str, tag: str, body: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[(name, tag)] = (body, media_type)
        self.manifests[(name, digest)] = (body, media_type)
        return digest

    def add_referrer(self, name: str, subject: str, manifest_body: bytes,
                     artifact_type: str | None = None) -> dict[str, object]:
        """Serve the referrer manifest by digest and list it under ``subject``; ``artifact_type``
        overrides the one the spec derives from the manifest (a registry's summary may differ)."""
        descriptor = referrer_descriptor(manifest_body)
        if artifact_type is not None:
            descriptor["artifactType"] = artifact_type
        self.add_manifest(name, str(descriptor["digest"]), manifest_body, str(descriptor["mediaType"]))
        self.referrers.setdefault((name, subject), []).append(descriptor)
        return descriptor

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        return sum(n for (m, path), n in self.requests.items()
                   if (method is None or m == method) and (kind is None or f"/{kind}/" in path))

    # The registry

    def registry_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{path:.*}", self._registry)
        return app

    def cdn_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cdn/{digest}", self._cdn)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        self.token_requests.append((header, dict(request.query)))
        if self.credentials is not None and header != encode_basic_auth(*self.credentials):
            return web.json_response({"details": "bad credentials"}, status=401)
        token = secrets.token_hex(8)
        self._tokens.add(token)
        return web.json_response({"token": token, "expires_in": self.token_lifetime})

    def _challenge(self, name: str) -> web.Response:
        if self.auth == "bearer":
            value = f'Bearer realm="{self.realm or self.url + "/token"}",service="fake",scope="repository:{name}:pull"'
        else:
            value = 'Basic realm="fake"'
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                                 status=401, headers={"WWW-Authenticate": value})

    def _authorized(self, header: str | None) -> bool:
        if self.auth == "none":
            return True
        if header is None:
            return False
        if self.auth == "bearer":
            scheme, _, token = header.partition(" ")
            return scheme == "Bearer" and token in self._tokens
        return self.credentials is not None and header == encode_basic_auth(*self.credentials)

    async def _registry(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests[(request.method, path)] += 1
        self.authorizations.append(request.headers.get("Authorization"))
        if path == "/v2/":
            return web.json_response({})
        name, _, rest = path[len("/v2/"):].rpartition("/")
        name, _, kind = name.rpartition("/")
        if not self._authorized(request.headers.get("Authorization")):
            return self._challenge(name)
        if (held := self.held.get(path)) is not None:
            await held.wait()
        if (forced := self.failing or self.forced.get(path)) and forced.times > 0:
            forced.times -= 1
            if forced.gate is not None:
                await forced.gate.wait()
            if forced.drop:
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if forced.body is not None:
                return web.Response(body=forced.body, status=forced.status, headers=forced.headers)
            return web.json_response({"errors": [{"code": "FORCED", "message": "forced"}]},
                                     status=forced.status, headers=forced.headers)
        if kind == "manifests":
            found = self.manifests.get((name, rest))
            if found is None:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, status=404)
            body, media_type = found
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            headers = {"Content-Type": media_type, "Docker-Content-Digest": digest, **self.headers_for_manifests}
            if request.method == "HEAD":
                return web.Response(headers={**headers, "Content-Length": str(len(body))})
            if digest in self.corrupt_manifests:
                body += b"\n"
            if self.chunked_manifests:
                response = web.StreamResponse(headers=headers)
                response.enable_chunked_encoding()
                await response.prepare(request)
                for offset in range(0, len(body), CHUNK):
                    await response.write(body[offset:offset + CHUNK])
                await response.write_eof()
                return response
            return web.Response(body=body, headers=headers)
        if kind == "referrers" and self.referrers_api:
            return self._referrers(request, name, rest)
        if kind == "blobs":
            if rest not in self.blobs:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}, status=404)
            if request.method == "HEAD":
                return web.Response(headers={"Content-Length": str(len(self.blobs[rest])),
                                             "Docker-Content-Digest": rest})
            if self.redirect_blobs:
                raise web.HTTPTemporaryRedirect(f"{self.cdn_url}/cdn/{rest}?sig=abc")
            return await self._send_blob(request, rest)
        return web.json_response({"errors": [{"code": "NOT_FOUND", "message": "no"}]}, status=404)

    def _referrers(self, request: web.Request, name: str, digest: str) -> web.Response:
        """The referrers API: never a 404 (an unknown subject has none), a 400 for a bad digest, the
        artifactType filter, and pages resumed after the digest in ``last``."""
        if not DIGEST.fullmatch(digest):
            return web.json_response({"errors": [{"code": "DIGEST_INVALID", "message": "invalid digest"}]},
                                     status=400)
        listed = self.referrers.get((name, digest), [])
        headers = {"Content-Type": OCI_INDEX}
        wanted = request.query.get("artifactType")
        if wanted is not None and self.referrers_filter:
            listed = [entry for entry in listed if entry.get("artifactType") == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        if "last" in request.query:
            digests = [entry["digest"] for entry in listed]
            if request.query["last"] not in digests:
                return web.json_response({"errors": [{"code": "UNSUPPORTED", "message": "unknown last"}]},
                                         status=400)
            listed = listed[digests.index(request.query["last"]) + 1:]
        size = self.referrers_page_size
        if size is not None and len(listed) > size:
            listed = listed[:size]
            query = {"n": str(size), "last": str(listed[-1]["digest"])}
            if wanted is not None:
                query["artifactType"] = wanted
            next_url = request.rel_url.with_query(query)
            headers["Link"] = f'<{next_url}>; rel="next"'
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed})
        return web.Response(body=body.encode(), headers=headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.cdn_requests.append(request.headers.get("Authorization"))
        if "Authorization" in request.headers:
            return web.Response(status=400, text="Only one auth mechanism allowed")
        if self.cdn_challenge is not None:
            return web.Response(status=401, headers={"WWW-Authenticate": self.cdn_challenge})
        return await self._send_blob(request, request.match_info["digest"])

    async def _send_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        self.blob_ranges.append(request.headers.get("Range"))
        data = self.blobs[digest]
        if digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        response = web.StreamResponse(headers={"Docker-Content-Digest": digest})
        if request.http_range.start is not None and not self.ignore_range:
            start = request.http_range.start
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if self.chunked_blobs:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(data) - start
        await response.prepare(request)
        drop_at = self.drop_after.pop(digest, None)
        stops = sorted([*self.stages.get(digest, []), *([self.gates[digest]] if digest in self.gates else [])],
                       key=lambda stop: stop[0])
        position = start
        while position < len(data):
            for offset, event in stops:
                if position <= offset < position + CHUNK and not event.is_set():
                    await response.write(data[position:offset])
                    position = offset
                    await event.wait()
            end = min(position + CHUNK, len(data))
            if drop_at is not None and position <= drop_at < end:
                await response.write(data[position:drop_at])
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(data[position:end])
            position = end
        await response.write_eof()
        return response


async def start_fake() -> tuple[FakeUpstream, list[TestServer]]:
    fake = FakeUpstream()
    registry = TestServer(fake.registry_app(), host="127.0.0.1")
    cdn = TestServer(fake.cdn_app(), host="127.0.0.1")
    for server in (registry, cdn):
        await server.start_server()
    fake.url = str(registry.make_url("")).rstrip("/")
    fake.cdn_url = str(cdn.make_url("")).rstrip("/")
    return fake, [registry, cdn]
