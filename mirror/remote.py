"""A running mirror, from the outside: its /v2 API as the source of `mirror seed --server URL`
(pulling every listed image through it pre-warms its cache before a rollout, with its
single-flight downloads and verified writes; every body is checked against its digest here too),
and its admin API for `mirror ls/pin/unpin/gc --server URL`.

Repositories are named with their registry as the first path segment
(`/v2/docker.io/library/alpine/...`), which the mirror routes to that upstream. What `seed
--server` caches is not pinned; `pin --server` pins it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import aiohttp

from mirror.access import CACHE_HEADER
from mirror.errors import (
    BlobUnknown,
    Denied,
    IntegrityError,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    RequestInvalid,
    TooManyRequests,
    Unavailable,
)
from mirror.imagelist import ImageSpec
from mirror.oci import Digest, Reference, manifest_media_type, referrer_descriptors
from mirror.proxy import ACCEPT_ALL, CacheResult, ManifestResult

_CHUNK = 4 << 20
_BY_CODE: Mapping[str, type[MirrorError]] = {
    "MANIFEST_UNKNOWN": ManifestUnknown, "BLOB_UNKNOWN": BlobUnknown, "NAME_UNKNOWN": NameUnknown,
    "DENIED": Denied, "UNAUTHORIZED": Denied, "TOOMANYREQUESTS": TooManyRequests,
}
_ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


class ServerFetcher:
    def __init__(self, session: aiohttp.ClientSession, server: str) -> None:
        self._session = session
        self._server = server.rstrip("/")

    def _url(self, spec: ImageSpec, path: str) -> str:
        return f"{self._server}/v2/{spec.upstream.name}/{spec.name}/{path}"

    async def manifest(self, spec: ImageSpec, reference: Reference) -> ManifestResult:
        async with self._get(self._url(spec, f"manifests/{reference}"), {"Accept": ACCEPT_ALL}) as response:
            await _check(response, ManifestUnknown)
            body = await response.read()
            digest = Digest.of(body)
            if reference.digest is not None and reference.digest != digest:
                raise IntegrityError(f"{self._server} sent a manifest for {reference.digest} whose digest is {digest}")
            media_type = manifest_media_type(body, response.headers.get("Content-Type"))
            cache = response.headers.get(CACHE_HEADER, "MISS")
            return ManifestResult(body, media_type, digest,
                                  CacheResult(cache) if cache in CacheResult.__members__ else CacheResult.MISS)

    async def blob(self, spec: ImageSpec, digest: Digest) -> tuple[int, bool]:
        async with self._get(self._url(spec, f"blobs/{digest}")) as response:
            await _check(response, BlobUnknown)
            hashed = hashlib.sha256()
            size = 0
            async for chunk in response.content.iter_chunked(_CHUNK):
                hashed.update(chunk)
                size += len(chunk)
            if hashed.hexdigest() != digest.hex:
                raise IntegrityError(f"{self._server} sent {digest} with digest sha256:{hashed.hexdigest()}")
            return size, response.headers.get(CACHE_HEADER) != CacheResult.HIT.value

    async def tags(self, spec: ImageSpec, query: Mapping[str, str]) -> tuple[bytes, str | None]:
        async with self._get(self._url(spec, f"tags/list?{urlencode(query)}")) as response:
            await _check(response, NameUnknown)
            return await response.read(), response.headers.get("Link")

    async def referrers(self, spec: ImageSpec, subject: Digest) -> list[dict[str, object]]:
        async with self._get(self._url(spec, f"referrers/{subject}")) as response:
            await _check(response, ManifestUnknown)
            return referrer_descriptors(await response.read())

    async def pin(self, digest: Digest) -> bool:
        return False

    @asynccontextmanager
    async def _get(self, url: str, headers: Mapping[str, str] | None = None
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET to the mirror; a mirror that cannot be reached is an Unavailable, like an upstream."""
        try:
            async with self._session.get(url, headers=headers) as response:
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"{self._server}: {type(exc).__name__}: {exc}") from None


class AdminClient:
    """A running mirror's admin API (`/api/v1`), authenticated with the admin token or an
    account (HTTP Basic)."""

    def __init__(self, server: str, token: str | None = None, user: tuple[str, str] | None = None) -> None:
        self._server = server.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        if user is not None:
            self._headers = {"Authorization": aiohttp.encode_basic_auth(*user)}

    async def images(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._call("GET", "images")
        return found

    async def pin(self, image: str, pinned: bool) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "pin" if pinned else "unpin", {"image": image})
        return result

    async def gc(self, dry_run: bool) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "gc", {"dry_run": dry_run})
        return result

    async def _call(self, method: str, view: str, body: dict[str, object] | None = None) -> Any:
        url = f"{self._server}/api/v1/{view}"
        try:
            async with aiohttp.ClientSession(timeout=_ADMIN_TIMEOUT, trust_env=False) as session, \
                    session.request(method, url, json=body, headers=self._headers) as response:
                if response.status == 401:
                    raise Denied(f"{self._server} wants a login: give --user (and $MIRROR_PASSWORD) or --token-file")
                if response.status == 400:
                    raise RequestInvalid(f"{self._server}: {await _message(response)}")
                await _check(response, ManifestUnknown)
                return await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Unavailable(f"{self._server}: {type(exc).__name__}: {exc}") from None


async def _check(response: aiohttp.ClientResponse, unknown: type[MirrorError]) -> None:
    """The mirror's OCI error, as the error it names; a bare 404 is `unknown`."""
    if response.status < 300:
        return
    code, message = await _error(response)
    fallback = unknown if response.status == 404 else Unavailable
    raise _BY_CODE.get(code, fallback)(f"{response.url.host}:{response.url.port}: {message}")


async def _error(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """The code and message of the OCI error JSON a response carries."""
    try:
        error = (await response.json(content_type=None))["errors"][0]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, IndexError, TypeError, aiohttp.ClientError):
        return "", f"answered {response.status}"


async def _message(response: aiohttp.ClientResponse) -> str:
    return (await _error(response))[1]
