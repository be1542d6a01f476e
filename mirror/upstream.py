"""Client for one upstream registry: authentication, requests, and upstream errors mapped to
domain errors. It knows nothing of the cache.

Authentication follows the registry token protocol: a request goes out with whatever
credential is cached for its scope; a 401 names the scheme. For `Bearer`, a token is fetched
from the advertised realm (with the upstream's credentials, or anonymously), cached per scope
until it expires, and the request is retried once. For `Basic`, the configured credentials are
sent from then on. Credentials come from a `CredentialSource`, asked each time they are sent; when
the upstream or its token service refuses them, the source may renew them once and the request
is tried again. Credentials go only to the upstream and to a token realm its `TokenRealms`
allow; blob redirects to a CDN carry no Authorization (aiohttp strips it on cross-origin
redirects).

Every request asks the upstream's circuit breaker first and tells it how it went, and a
repository the upstream refused is not asked again until its backoff ends (`mirror.breaker`):
while either holds, the request fails at once without traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from mirror.breaker import Breaker, Refusals, State
from mirror.config import UpstreamConfig
from mirror.credentials import Credential, TokenRealms, credential_source
from mirror.errors import (
    BlobUnknown,
    IntegrityError,
    ManifestInvalid,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    TooManyRequests,
    Unavailable,
    UpstreamRefused,
)
from mirror.metrics import Metrics
from mirror.oci import MANIFEST_MAX_BYTES, OCI_INDEX, Digest, referrer_descriptors

log = logging.getLogger(__name__)

_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
# Resume attempts in a row that bring no new bytes before a download is given up.
# The `rel="next"` target of a Link header (RFC 8288), as registries page tag and referrer lists.
_NEXT_RE = re.compile(r'<(?P<url>[^>]*)>\s*;\s*rel="?next"?')
MAX_RESUME_ATTEMPTS = 5
RESUME_BACKOFF = 0.5
# An upstream's error body is read this far, for its error codes.
_ERROR_BODY_LIMIT = 64 * 1024
# A token is refreshed this long before the upstream says it expires.
_TOKEN_MARGIN = 10.0
_UNKNOWN_BY_KIND: Mapping[str, type[MirrorError]] = {
    "manifest": ManifestUnknown, "blob": BlobUnknown, "tags": NameUnknown, "referrers": ManifestUnknown,
}
# Pages of one referrers list followed at most (a registry pages by 100s or more).
MAX_REFERRER_PAGES = 100


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: Mapping[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _CHALLENGE_PARAM_RE.finditer(rest)}
        return cls(scheme.lower(), params)


class BlobSink(Protocol):
    """Where a blob download goes: the upstream client only announces and appends."""

    @property
    def begun(self) -> bool: ...
    @property
    def written(self) -> int: ...
    @property
    def size(self) -> int | None: ...
    def begin(self, size: int | None) -> None: ...
    async def write(self, data: bytes) -> None: ...

    async def receive(self, sock: int, count: int, timeout: float | None) -> None:
        """Append the next `count` bytes of the socket `sock` (a plain-HTTP body): raises
        Unavailable if it ends or fails first, TimeoutError after `timeout` s of silence."""


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str | None
    digest: Digest | None
    """What the upstream says in Docker-Content-Digest, if it says it."""


@dataclass(frozen=True, slots=True)
class Head:
    digest: Digest | None
    size: int | None


@dataclass(frozen=True, slots=True)
class Condition:
    """How an upstream is doing, for operators."""

    state: str
    """`ok`, `degraded` (failing: cached content is served stale), `rate-limited` or `offline`."""
    reason: str | None = None
    credentials: str | None = None
    """Where the mirror's credentials for it come from (never the secret)."""
    credentials_expire: float | None = None


class Source(Protocol):
    """Where the proxy gets what it has not cached: an online upstream, or the offline one that
    answers "not cached" without any traffic."""

    @property
    def config(self) -> UpstreamConfig: ...
    @property
    def name(self) -> str: ...
    async def head(self, kind: str, name: str, reference: str, accept: str | None = None) -> Head: ...
    async def get_manifest(self, name: str, reference: str, accept: str) -> Manifest: ...
    async def fetch_blob(self, name: str, digest: Digest, sink: BlobSink) -> None: ...
    async def get_tags(self, name: str, query: Mapping[str, str]) -> tuple[bytes, str | None]: ...

    async def get_referrers(self, name: str, subject: Digest) -> list[dict[str, object]] | None:
        """Every referrer of `subject` the upstream's referrers API lists (all pages, unfiltered);
        None where the upstream has no referrers API (it answers 404, as the spec says)."""

    def condition(self) -> Condition: ...


def scope_for(name: str) -> str:
    return f"repository:{name}:pull"


class Upstream:
    """One upstream registry, over an aiohttp session the app owns."""

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession,
                 blob_session: aiohttp.ClientSession, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`blob_session` carries blob downloads, which hold a connection for as long as they
        take; `session` everything else, so a manifest never queues behind layers. `clock`
        times the breaker's and the refusals' backoffs."""
        self.config = config
        self.name = config.name
        self._session = session
        self._blob_session = blob_session
        self._metrics = metrics
        self._received = metrics.upstream_bytes.labels(config.name)
        self._tokens: dict[str, tuple[str, float]] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        self._basic = False
        self._origin = URL(config.url).origin()
        self._credentials = credential_source(config)
        # Where credentials may go; an anonymous upstream has none to send.
        self._realms = TokenRealms(config.url, config.token_realms) if self._credentials is not None else None
        if self._credentials is not None:
            log.info("upstream %s: credentials from %s", config.name, self._credentials.describe())
        state = metrics.upstream_state.labels(config.name)
        state.set(State.CLOSED.value)
        self.breaker = Breaker(config.name, config.breaker, clock, on_change=lambda s: state.set(s.value))
        self._refusals = Refusals(config.breaker, clock)

    async def _credential(self) -> Credential | None:
        return None if self._credentials is None else await self._credentials.get()

    def condition(self) -> Condition:
        state, reason = self.breaker.condition()
        if self._credentials is None:
            return Condition(state, reason)
        return Condition(state, reason, self._credentials.describe(), self._credentials.expires)

    def _refused(self, credential: Credential) -> bool:
        """Tell the source the upstream refused `credential`; True if it may have another to try."""
        return self._credentials is not None and self._credentials.rejected(credential)

    async def _auth_header(self, scope: str) -> dict[str, str]:
        token = self._tokens.get(scope)
        if token and token[1] > time.monotonic():
            return {"Authorization": f"Bearer {token[0]}"}
        if self._basic and (credential := await self._credential()) is not None:
            return {"Authorization": aiohttp.encode_basic_auth(*credential)}
        return {}

    @asynccontextmanager
    async def request(self, method: str, path: str, *, scope: str, kind: str,
                      headers: Mapping[str, str] | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status; every other outcome is raised as a domain error. A
        refusal is remembered for the repository's scope, and not asked again until it backs off."""
        self._refusals.check(scope)
        try:
            response = await self._answered(method, path, scope, kind, headers)
        except UpstreamRefused as exc:
            self._refusals.refused(scope, exc)
            raise
        self._refusals.allowed(scope)
        try:
            yield response
        finally:
            response.release()

    async def _answered(self, method: str, path: str, scope: str, kind: str,
                        headers: Mapping[str, str] | None) -> aiohttp.ClientResponse:
        url = f"{self.config.url}{path}"
        session = self._blob_session if kind == "blob" and method == "GET" else self._session
        renewed = False
        # At most: anonymous, then with credentials, then with renewed ones (or, for a token,
        # anonymous then with a token).
        for attempt in (1, 2, 3):
            credential = await self._auth_header(scope)
            response = await self._send(session, method, url, {**(headers or {}), **credential})
            if response.status < 300:
                return response
            try:
                # Only the upstream's own challenges are answered: a 401 from a host it
                # redirected to (a CDN) never gets the mirror's credentials.
                if response.status == 401 and attempt < 3 and response.url.origin() == self._origin:
                    answer = await self._authenticate(response, scope, credential.get("Authorization"),
                                                      first=attempt == 1, may_renew=not renewed)
                    if answer is not None:
                        renewed = renewed or answer == "renewed"
                        continue
                raise await self._error(response, kind)
            finally:
                response.release()
        raise AssertionError("unreachable: the third attempt always answers or raises")

    async def _send(self, session: aiohttp.ClientSession, method: str, url: URL | str,
                    headers: Mapping[str, str] | None, params: Mapping[str, str] | None = None
                    ) -> aiohttp.ClientResponse:
        """One request, past the breaker, which learns how it went."""
        ticket = self.breaker.admit()
        started = time.monotonic()
        try:
            response = await session.request(method, url, headers=headers, params=params)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._observe(method, None, started, f"no answer: {type(exc).__name__}")
            self.breaker.failed(ticket, f"no answer: {type(exc).__name__}")
            raise Unavailable(f"upstream {self.name} is unreachable: {type(exc).__name__}") from exc
        finally:
            self.breaker.release(ticket)
        self._observe(method, response, started)
        self.breaker.answered(ticket, response.status, response.headers)
        return response

    def _observe(self, method: str, response: aiohttp.ClientResponse | None, started: float,
                 reason: str | None = None) -> None:
        status = "error" if response is None else str(response.status)
        seconds = time.monotonic() - started
        self._metrics.upstream_requests.labels(self.name, method, status).inc()
        self._metrics.upstream_seconds.labels(self.name, method).observe(seconds)
        self._metrics.activity.asked(self.name, None if response is None else response.status, seconds, reason)
        if response is not None:
            if response.status == 429:
                self._metrics.rate_limited.labels(self.name).inc()
            self._metrics.observe_rate_limit(self.name, response.headers)

    async def _authenticate(self, response: aiohttp.ClientResponse, scope: str, rejected: str | None, *,
                            first: bool, may_renew: bool) -> Literal["retry", "renewed"] | None:
        """Answer a 401 challenge to a request sent with the `rejected` Authorization (or none):
        "retry" or "renewed" (the credentials were renewed) if the request is worth retrying. A
        token is fetched only for a `first` attempt; credentials are renewed only if `may_renew`."""
        challenge = Challenge.parse(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            credential = await self._credential()
            if credential is None:
                return None
            # Refused without them (maybe while a concurrent request was switching to Basic),
            # or with older ones: send these.
            if rejected != aiohttp.encode_basic_auth(*credential):
                self._basic = True
                return "retry"
            # Refused with the current ones: only renewed ones can help.
            return "renewed" if may_renew and self._refused(credential) else None
        if challenge.scheme == "bearer" and "realm" in challenge.params and first:
            await self._fetch_token(challenge, scope, rejected)
            return "retry"
        return None

    async def _fetch_token(self, challenge: Challenge, scope: str, rejected: str | None) -> None:
        """A token for `scope`, unless a valid one other than the `rejected` one is cached (a
        concurrent request fetched it). A rejected token is replaced even if it has not expired
        by our clock: the upstream may have revoked it or expired it early."""
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            if cached and cached[1] > time.monotonic() and f"Bearer {cached[0]}" != rejected:
                return
            self._tokens.pop(scope, None)
            params = {"scope": challenge.params.get("scope", scope)}
            if "service" in challenge.params:
                params["service"] = challenge.params["service"]
            realm = URL(challenge.params["realm"])
            if self._realms is not None and not self._realms.allows(realm):
                raise UpstreamRefused(f"upstream {self.name} sent the mirror to an untrusted token service "
                                   f"{realm.scheme}://{realm.host}")
            credential = await self._credential()
            try:
                body = await self._ask_token_service(realm, params, credential)
            except UpstreamRefused:
                # The token service refused the credentials: renewed ones may do, once.
                if credential is None or not self._refused(credential):
                    raise
                body = await self._ask_token_service(realm, params, await self._credential())
            token = body.get("token") or body.get("access_token")
            if not isinstance(token, str):
                raise Unavailable(f"upstream {self.name} token service sent no token")
            expires_in = body.get("expires_in", 60)
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
            self._tokens[scope] = (token, time.monotonic() + max(lifetime - _TOKEN_MARGIN, 1.0))

    async def _ask_token_service(self, realm: URL, params: Mapping[str, str],
                                 credential: Credential | None) -> dict[str, Any]:
        """The token service's JSON answer, asked with `credential` as Basic (or anonymously)."""
        sent = {"Authorization": aiohttp.encode_basic_auth(*credential)} if credential is not None else None
        response = await self._send(self._session, "GET", realm, sent, params)
        try:
            async with response:
                if response.status in (401, 403):
                    raise UpstreamRefused(f"upstream {self.name} refused the mirror's credentials")
                if response.status == 429:
                    raise TooManyRequests(f"upstream {self.name} token service is rate-limiting",
                                          response.headers.get("Retry-After"))
                if response.status != 200:
                    raise Unavailable(f"upstream {self.name} token service answered {response.status}")
                body = await response.json(content_type=None)
                if not isinstance(body, dict):
                    raise Unavailable(f"upstream {self.name} token service sent no token")
                return body
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise Unavailable(f"upstream {self.name} token service failed: {type(exc).__name__}") from exc

    async def _error(self, response: aiohttp.ClientResponse, kind: str) -> MirrorError:
        status = response.status
        what = f"upstream {self.name} answered {status} for {response.url.path}"
        if status == 401:
            return UpstreamRefused(f"upstream {self.name} refused the mirror's credentials for {response.url.path}",
                                   {"upstream_status": 401})
        if status == 403:
            return UpstreamRefused(f"upstream {self.name} denied the mirror access to {response.url.path}",
                                   {"upstream_status": 403})
        if status == 404:
            codes = await _error_codes(response)
            cls = NameUnknown if "NAME_UNKNOWN" in codes else _UNKNOWN_BY_KIND[kind]
            return cls(what)
        if status == 429:
            return TooManyRequests(f"upstream {self.name} is rate-limiting the mirror",
                                   response.headers.get("Retry-After"))
        return Unavailable(what, response.headers.get("Retry-After"))

    async def get_manifest(self, name: str, reference: str, accept: str) -> Manifest:
        async with self.request("GET", f"/v2/{name}/manifests/{reference}", scope=scope_for(name),
                                kind="manifest", headers={"Accept": accept}) as response:
            body = await self._read_limited(response, "manifest")
            return Manifest(body, response.headers.get("Content-Type"), _digest_header(response))

    async def head(self, kind: str, name: str, reference: str, accept: str | None = None) -> Head:
        path = f"/v2/{name}/{'manifests' if kind == 'manifest' else 'blobs'}/{reference}"
        async with self.request("HEAD", path, scope=scope_for(name), kind=kind,
                                headers={"Accept": accept} if accept else None) as response:
            return Head(_digest_header(response), response.content_length)

    async def fetch_blob(self, name: str, digest: Digest, sink: BlobSink) -> None:
        """Stream a blob into `sink`, resuming with a Range request from what it holds when the
        connection drops after the first byte."""
        failures = 0
        while True:
            before = sink.written
            headers = {"Range": f"bytes={sink.written}-"} if sink.written else None
            try:
                async with self.request("GET", f"/v2/{name}/blobs/{digest}", scope=scope_for(name), kind="blob",
                                        headers=headers) as response:
                    if not sink.begun:
                        sink.begin(response.content_length)
                    skip = _bytes_to_skip(response, sink, digest)
                    if not skip and (raw := _raw_body(response)) is not None:
                        await self._receive(response, sink, *raw)
                    else:
                        # Everything buffered so far, in one piece: large under load (the socket
                        # fills the buffer while the last piece is hashed and written), prompt
                        # when the upstream trickles.
                        async for chunk in response.content.iter_any():
                            self._received.inc(len(chunk))
                            if skip:
                                chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                            if chunk:
                                await sink.write(chunk)
                if sink.size is None or sink.written == sink.size:
                    return
                raise Unavailable(f"upstream {self.name} ended {digest} after {sink.written} bytes")
            except (TimeoutError, aiohttp.ClientError, Unavailable) as exc:
                if not sink.begun:
                    raise exc if isinstance(exc, Unavailable) else Unavailable(
                        f"upstream {self.name} failed on {digest}: {type(exc).__name__}") from exc
                failures = 0 if sink.written > before else failures + 1
                if failures >= MAX_RESUME_ATTEMPTS:
                    raise Unavailable(f"upstream {self.name} keeps failing on {digest}") from exc
                log.info("resuming %s at byte %d after: %r", digest, sink.written, exc)
                await asyncio.sleep(RESUME_BACKOFF * failures)

    async def _receive(self, response: aiohttp.ClientResponse, sink: BlobSink, sock: int, early: bytes) -> None:
        """The rest of a plain-HTTP body straight from its socket into `sink`; the connection is
        closed after, since aiohttp no longer knows where its stream stands."""
        assert response.content_length is not None
        before = sink.written
        try:
            if early:
                await sink.write(early)
            await sink.receive(sock, response.content_length - len(early), self._blob_session.timeout.sock_read)
        finally:
            self._received.inc(sink.written - before)
            os.close(sock)
            response.close()

    async def get_tags(self, name: str, query: Mapping[str, str]) -> tuple[bytes, str | None]:
        """The tag list body as the upstream sent it, and its Link header."""
        path = f"/v2/{name}/tags/list" + (f"?{urlencode(query)}" if query else "")
        async with self.request("GET", path, scope=scope_for(name), kind="tags") as response:
            body = await self._read_limited(response, "tag list")
            return body, response.headers.get("Link")


    async def get_referrers(self, name: str, subject: Digest) -> list[dict[str, object]] | None:
        path: str | None = f"/v2/{name}/referrers/{subject}"
        descriptors: list[dict[str, object]] = []
        for page in range(MAX_REFERRER_PAGES):
            assert path is not None
            try:
                async with self.request("GET", path, scope=scope_for(name), kind="referrers",
                                        headers={"Accept": OCI_INDEX}) as response:
                    body = await self._read_limited(response, "referrers list")
                    link = response.headers.get("Link")
            except (ManifestUnknown, NameUnknown):
                if page == 0:
                    return None
                raise Unavailable(f"upstream {self.name} lost page {page + 1} of the referrers of {subject}") from None
            descriptors += referrer_descriptors(body)
            if (path := self._next_page(link)) is None:
                return descriptors
        raise Unavailable(f"upstream {self.name} lists more than {MAX_REFERRER_PAGES} pages of referrers of {subject}")

    def _next_page(self, link: str | None) -> str | None:
        """The path of the next page a Link header points to, on this upstream only: a link to
        anywhere else is not followed (the mirror's credentials would go with it)."""
        if link is None or (match := _NEXT_RE.search(link)) is None:
            return None
        target = URL(self.config.url).join(URL(match["url"]))
        if target.origin() != self._origin:
            raise Unavailable(f"upstream {self.name} pages its referrers to another host: {target.origin()}")
        prefix = URL(self.config.url).path.rstrip("/")
        return target.raw_path_qs[len(prefix):] if target.raw_path.startswith(prefix) else target.raw_path_qs

    async def _read_limited(self, response: aiohttp.ClientResponse, what: str) -> bytes:
        """A small response body in full, refusing anything over the spec's manifest limit."""
        too_big = ManifestInvalid(f"upstream {what} is larger than {MANIFEST_MAX_BYTES} bytes")
        if (response.content_length or 0) > MANIFEST_MAX_BYTES:
            raise too_big
        body = bytearray()
        try:
            async for chunk in response.content.iter_any():
                self._received.inc(len(chunk))
                body += chunk
                if len(body) > MANIFEST_MAX_BYTES:
                    raise too_big
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"upstream {self.name} failed mid-{what}: {type(exc).__name__}") from exc
        return bytes(body)


def _raw_body(response: aiohttp.ClientResponse) -> tuple[int, bytes] | None:
    """The socket a plain-HTTP body arrives on (a descriptor of our own), taken over from aiohttp
    with the part of the body it had read already: the rest can then be spliced into the spool
    in the kernel, instead of being copied through aiohttp's buffers and Python's bytes. None
    where the socket's bytes are not the body itself (TLS, a chunked or encoded body), or where
    aiohttp may hold more than its stream shows (its reading paused for a full buffer). What is
    taken is still checked against the digest like any download."""
    connection = response.connection
    if (response.content_length is None or "Transfer-Encoding" in response.headers
            or response.headers.get("Content-Encoding", "identity") != "identity" or connection is None):
        return None
    protocol, transport = connection.protocol, connection.transport
    if (protocol is None or transport is None or transport.get_extra_info("sslcontext") is not None
            or getattr(protocol, "_reading_paused", True) or getattr(protocol, "_buffer_paused", True)):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    early = response.content.read_nowait()
    # No more bytes go to aiohttp from here (nor does its read timeout run: `receive` has its own).
    protocol.pause_reading()
    return os.dup(sock.fileno()), early


def _bytes_to_skip(response: aiohttp.ClientResponse, sink: BlobSink, digest: Digest) -> int:
    """How much of a resumed response repeats what the sink holds: none if the upstream
    honoured the Range, all of it if it sent the whole blob again."""
    if sink.written == 0:
        return 0
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        start = content_range.removeprefix("bytes ").split("-", 1)[0]
        if start != str(sink.written):
            raise Unavailable(f"upstream answered a resume with the wrong range {content_range!r}")
        return 0
    if sink.size is not None and response.content_length not in (None, sink.size):
        raise IntegrityError(f"upstream changed the size of {digest} between two requests")
    return sink.written


def _digest_header(response: aiohttp.ClientResponse) -> Digest | None:
    value = response.headers.get("Docker-Content-Digest")
    if not value:
        return None
    try:
        return Digest.parse(value)
    except MirrorError:
        return None


async def _error_codes(response: aiohttp.ClientResponse) -> set[str]:
    """The OCI error codes in an upstream's error body, whatever shape (or size) it has."""
    try:
        body = json.loads(await response.content.read(_ERROR_BODY_LIMIT))
    except (ValueError, aiohttp.ClientError, TimeoutError):
        return set()
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return set()
    return {str(e.get("code")) for e in errors if isinstance(e, dict)}
