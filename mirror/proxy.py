"""The pull-through policy: what is served from the cache, what is fetched, what is revalidated,
and what is served stale because the upstream failed.

- A digest is immutable: once cached it is served without asking the upstream.
- A tag younger than its upstream's TTL is served from the cache; an older one is revalidated
  with a HEAD and fetched again only if its digest moved. By default the cached copy is served
  at once while one revalidation runs in the background (stale-while-revalidate); an upstream
  may ask for strict freshness, and then the request waits for it (up to a timeout).
- If the upstream is down, slow, errors, rate-limits, or refuses the mirror's credentials, the
  cached tag is served stale, and the failed check counts as a check: the tag is not tried
  again until its TTL has passed once more. An upstream that says the tag or repository is gone
  (404) has deleted it: the tag is dropped.
- An upstream 404 for a manifest is remembered for the upstream's `negative_ttl`.
- The index is written on the way, but a write that fails (a full disk) never fails a request
  the cache can answer.
- Cached content is served for a repository only if that repository is known to reference it,
  or the upstream confirms it with a HEAD in that repository's scope (design invariant 5).
- A miss on a blob starts (or joins) one `Fill` per digest; a miss on a manifest is one
  coalesced fetch per (upstream, repository, reference, Accept).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from cachetools import LRUCache, TTLCache

from mirror.cluster import Cluster, poll
from mirror.errors import (
    BlobUnknown,
    CacheWriteError,
    Denied,
    IntegrityError,
    ManifestInvalid,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    TooManyRequests,
    Unavailable,
    UpstreamRefused,
)
from mirror.eviction import Evictor
from mirror.flight import Background, Coalescer, Fill, Fills, run_to_end
from mirror.index import Index, TagRecord
from mirror.oci import (
    MANIFEST_MAX_BYTES,
    MANIFEST_MEDIA_TYPES,
    Digest,
    Reference,
    accepts,
    attachment_subject,
    manifest_media_type,
    manifest_references,
)
from mirror.routing import Route
from mirror.storage import BlobStore
from mirror.upstream import Source

log = logging.getLogger(__name__)

ACCEPT_ALL = ", ".join(MANIFEST_MEDIA_TYPES)
# Failures that leave a cached tag servable: the upstream is out of reach, slow, rate-limiting,
# sending bad content, refusing the mirror, or the cache cannot take what it sent.
_STALE_IF = (Unavailable, TooManyRequests, IntegrityError, ManifestInvalid, CacheWriteError, UpstreamRefused)
# Absent manifests and failed tag checks remembered at most, per upstream / in all.
_REMEMBERED = 65536
# Bytes of manifest bodies and small blobs kept in memory (more than the largest manifest
# accepted), and what a small blob is: answered from memory, without a file opened and sent.
MANIFEST_MEMORY = 32 << 20
SMALL_BLOB = 64 << 10
# Tries to catch a blob that keeps finishing downloading between two looks.
_ROUNDS = 3
# How long a replica waits for the manifest another replica is fetching, before fetching it too.
MANIFEST_WAIT = 10.0


class CacheResult(Enum):
    HIT = "HIT"
    MISS = "MISS"
    JOINED = "JOINED"
    """A miss that joined a download already in flight."""
    REVALIDATED = "REVALIDATED"
    REVALIDATING = "REVALIDATING"
    """Served from the cache past its TTL while a revalidation runs in the background."""
    STALE = "STALE"
    """Served from the cache past its TTL because the upstream could not confirm it."""


@dataclass(frozen=True, slots=True)
class ManifestResult:
    body: bytes
    media_type: str
    digest: Digest
    cache: CacheResult


@dataclass(frozen=True, slots=True)
class CachedBlob:
    size: int
    digest: Digest
    path: Path | None
    """A local file to send with sendfile; None where the store streams it (`Proxy.chunks`)."""
    redirect: str | None = None
    """Where the client may fetch it itself (a presigned bucket URL), if the store says so."""
    body: bytes | None = None
    """The whole blob, where it is small enough to be answered from memory."""


@dataclass(frozen=True, slots=True)
class StreamingBlob:
    fill: Fill
    cache: CacheResult
    file: BinaryIO
    """The reader's own descriptor on the growing spool file, closed by the reader."""


@dataclass(frozen=True, slots=True)
class BlobHead:
    size: int | None
    cache: CacheResult


class Proxy:
    def __init__(self, store: BlobStore, index: Index, evictor: Evictor, upstreams: Mapping[str, Source],
                 background: Background, revalidate_timeout: float = 5.0,
                 clock: Callable[[], float] | None = None, cluster: Cluster | None = None) -> None:
        self._store = store
        self._cluster = cluster
        self._index = index
        self._evictor = evictor
        self._upstreams = upstreams
        self._revalidate_timeout = revalidate_timeout
        self._clock = clock or time.time
        self.fills = Fills(store, background)
        # Manifest bodies and small blobs most recently served: a hit then costs no file read (a
        # thread hand-off and an open per request, most of a small hit's cost).
        self._bodies: LRUCache[Digest, bytes] = LRUCache(MANIFEST_MEMORY, getsizeof=len)
        self._fetches: Coalescer[tuple[str, ...], ManifestResult] = Coalescer(background)
        # (upstream, name, tag) -> when its last check failed, and why.
        self._failed_checks: LRUCache[tuple[str, str, str], tuple[float, MirrorError]] = LRUCache(_REMEMBERED)
        # Per upstream: (name, reference) -> the 404 it answered.
        self._absent: dict[str, TTLCache[tuple[str, str], MirrorError]] = {
            name: TTLCache(_REMEMBERED, u.config.negative_ttl, timer=self._clock)
            for name, u in upstreams.items() if u.config.negative_ttl > 0}

    # Manifests

    async def manifest(self, route: Route, accept: str | None) -> ManifestResult:
        upstream = self._upstreams[route.upstream.name]
        reference = route.reference
        assert reference is not None
        complete_accept = all(accepts(accept, t) for t in MANIFEST_MEDIA_TYPES)
        upstream_accept = ACCEPT_ALL if complete_accept else (accept or ACCEPT_ALL)

        if reference.digest is not None:
            cached = await self.cached_manifest(reference.digest)
            if cached is not None and accepts(accept, cached.media_type):
                await self._ensure_visible(upstream, route.name, reference.digest, "manifest")
                return cached
            return await self._fetch_manifest(upstream, route.name, reference, upstream_accept, tag_it=False)

        assert reference.tag is not None
        record = await self._index.tag(upstream.name, route.name, reference.tag)
        cached = await self.cached_manifest(record.digest) if record else None
        if (record is None or cached is None) and not complete_accept:
            # What the tag means is learnt with everything accepted, as every client sees it;
            # most narrow clients (one media type) can take that form, and then hit from now on.
            canonical = await self._fetch_manifest(upstream, route.name, reference, ACCEPT_ALL, tag_it=True)
            if accepts(accept, canonical.media_type):
                return canonical
        if record is None or cached is None or not accepts(accept, cached.media_type):
            return await self._fetch_manifest(upstream, route.name, reference, upstream_accept,
                                              tag_it=complete_accept)
        ttl = route.upstream.tag_ttl
        if self._clock() - record.checked_at < ttl:
            return cached
        key = (upstream.name, route.name, reference.tag)
        if (failed := self._failed_checks.get(key)) is not None and self._clock() - failed[0] < ttl:
            return self._stale(upstream, cached, failed[1].detached())
        revalidation = self._fetches.start(("revalidate", *key),
                                           lambda: self._revalidate(upstream, route.name, reference, cached))
        if route.upstream.stale_while_revalidate and not revalidation.done():
            return replace(cached, cache=CacheResult.REVALIDATING)
        try:
            # Strict freshness still treats a slow upstream like a failing one; the revalidation
            # goes on in the background and updates the tag when it ends.
            async with asyncio.timeout(self._revalidate_timeout):
                result = await asyncio.shield(revalidation)
        except TimeoutError:
            log.warning("serving %s/%s:%s stale: revalidation is taking over %g s", *key, self._revalidate_timeout)
            return replace(cached, cache=CacheResult.STALE)
        except _STALE_IF as exc:
            return self._stale(upstream, cached, exc)
        if not accepts(accept, result.media_type):
            # The tag moved to a kind of manifest this client does not take.
            return await self._fetch_manifest(upstream, route.name, reference, upstream_accept, tag_it=False)
        return result

    def _stale(self, upstream: Source, cached: ManifestResult, error: MirrorError) -> ManifestResult:
        """The cached copy of a tag the upstream could not confirm, unless the upstream's policy
        is that a refusal stops it being served."""
        if isinstance(error, UpstreamRefused) and upstream.config.on_refusal == "deny":
            raise error
        return replace(cached, cache=CacheResult.STALE)

    async def _revalidate(self, upstream: Source, name: str, reference: Reference,
                          cached: ManifestResult) -> ManifestResult:
        """Ask the upstream whether the tag moved; with replicas, one of them asks for all, and
        the others take its answer from the shared index."""
        assert reference.tag is not None
        if self._cluster is None:
            return await self._check_tag(upstream, name, reference, cached)
        cluster, tag = self._cluster, reference.tag
        before = await self._index.tag(upstream.name, name, tag)
        lease = f"revalidate:{upstream.name}/{name}:{tag}"
        async with cluster.exclusive(lease) as held:
            if held:
                return await self._check_tag(upstream, name, reference, cached)
        answered = await poll(lambda: self._peer_tag(upstream, name, tag, before), lambda: cluster.working(lease),
                              self._revalidate_timeout)
        if answered is not None:
            return replace(answered, cache=CacheResult.REVALIDATED)
        return await self._check_tag(upstream, name, reference, cached)

    async def _peer_tag(self, upstream: Source, name: str, tag: str, before: TagRecord | None
                        ) -> ManifestResult | None:
        """The tag as another replica recorded it after `before`, if it has."""
        record = await self._index.tag(upstream.name, name, tag)
        if record is None or (before is not None and record.checked_at <= before.checked_at):
            return None
        return await self.cached_manifest(record.digest)

    async def _check_tag(self, upstream: Source, name: str, reference: Reference,
                         cached: ManifestResult) -> ManifestResult:
        assert reference.tag is not None
        key = (upstream.name, name, reference.tag)
        try:
            head = await upstream.head("manifest", name, reference.tag, ACCEPT_ALL)
            if head.digest == cached.digest:
                await self._best_effort(self._index.set_tag(upstream.name, name, reference.tag,
                                                            TagRecord(cached.digest, self._clock())))
                result = replace(cached, cache=CacheResult.REVALIDATED)
            else:
                result = await self._fetch_manifest(upstream, name, reference, ACCEPT_ALL, tag_it=True)
        except (ManifestUnknown, NameUnknown) as exc:
            # The upstream deleted the tag (or the whole repository): so does the cache.
            log.warning("%s/%s:%s is gone upstream: dropping it from the cache", *key)
            self._failed_checks.pop(key, None)
            self._remember_absent(upstream, name, reference, exc)
            await self._best_effort(self._index.drop_tag(*key))
            raise
        except _STALE_IF as exc:
            # Counts as a check: the tag is served stale until the next one is due.
            self._failed_checks[key] = (self._clock(), exc.detached())
            logged = log.error if isinstance(exc, UpstreamRefused) else log.warning
            logged("%s/%s:%s could not be revalidated, serving the cached copy stale (policy: %s): %s", *key,
                   "deny" if isinstance(exc, UpstreamRefused) and upstream.config.on_refusal == "deny" else "stale",
                   exc.message)
            raise
        self._failed_checks.pop(key, None)
        return result

    async def cached_manifest(self, digest: Digest) -> ManifestResult | None:
        # The index says first whether it is still cached (evicted: forgotten there); the bytes
        # of a digest never change, so memory may answer for the store.
        media_type = await self._index.manifest_type(digest)
        if media_type is None or (body := await self.stored_body(digest)) is None:
            return None
        self._index.touch(digest)
        return ManifestResult(body, media_type, digest, CacheResult.HIT)

    async def _fetch_manifest(self, upstream: Source, name: str, reference: Reference, accept: str,
                              tag_it: bool) -> ManifestResult:
        absent = self._absent.get(upstream.name)
        if absent is not None and (gone := absent.get((name, str(reference)))) is not None:
            raise type(gone)(gone.message, detail={"remembered_for_seconds": upstream.config.negative_ttl})
        key = ("manifest", upstream.name, name, str(reference), accept)
        joined = self._fetches.running(key)
        if not joined:
            self._store.spool.ensure_room()
        result = await self._fetches.run(key, lambda: self._download_manifest(upstream, name, reference, accept,
                                                                              tag_it))
        return replace(result, cache=CacheResult.JOINED) if joined else result

    async def _download_manifest(self, upstream: Source, name: str, reference: Reference, accept: str,
                                 tag_it: bool) -> ManifestResult:
        """With replicas, one of them fetches a manifest for all (a short lease); the others take
        it from the shared cache once it is there, or fetch it themselves if it does not come."""
        if self._cluster is None or (reference.digest is None and not tag_it):
            return await self._get_manifest(upstream, name, reference, accept, tag_it)
        cluster, lease = self._cluster, f"manifest:{upstream.name}/{name}:{reference}"
        before = await self._index.tag(upstream.name, name, reference.tag) if reference.tag is not None else None
        async with cluster.exclusive(lease) as held:
            if held:
                return await self._get_manifest(upstream, name, reference, accept, tag_it)
        if reference.digest is not None:
            digest = reference.digest
            fetched = await poll(lambda: self.cached_manifest(digest), lambda: cluster.working(lease), MANIFEST_WAIT)
        else:
            fetched = await poll(lambda: self._peer_tag(upstream, name, str(reference), before),
                                 lambda: cluster.working(lease), MANIFEST_WAIT)
        if fetched is not None and accepts(accept, fetched.media_type):
            return replace(fetched, cache=CacheResult.JOINED)
        return await self._get_manifest(upstream, name, reference, accept, tag_it)

    async def _get_manifest(self, upstream: Source, name: str, reference: Reference, accept: str,
                            tag_it: bool) -> ManifestResult:
        try:
            fetched = await upstream.get_manifest(name, str(reference), accept)
        except (ManifestUnknown, NameUnknown) as exc:
            self._remember_absent(upstream, name, reference, exc)
            raise
        digest = Digest.of(fetched.body)
        for claimed in (reference.digest, fetched.digest):
            if claimed is not None and claimed != digest:
                raise IntegrityError(f"upstream {upstream.name} sent a manifest for {claimed} whose digest is {digest}")
        media_type = manifest_media_type(fetched.body, fetched.media_type)

        async def store() -> None:
            await self.keep_manifest(upstream.name, name, digest, media_type, fetched.body,
                                     manifest_references(fetched.body))
            if tag_it and reference.tag is not None:
                await self._index.set_tag(upstream.name, name, reference.tag, TagRecord(digest, self._clock()))
                if (subject := attachment_subject(reference.tag)) is not None:
                    # A signature or SBOM under cosign's tags goes with its image.
                    await self._index.attach(subject, digest)
        # As for blobs: what is published is recorded before a shutdown closes the index.
        await run_to_end(store())
        return ManifestResult(fetched.body, media_type, digest, CacheResult.MISS)

    async def keep_manifest(self, upstream: str, name: str, digest: Digest, media_type: str, body: bytes,
                            references: list[Digest]) -> None:
        """Store a verified manifest (or a referrers list) and record it for the repository."""
        if await self._store.size(digest) is None:
            # Same digest, same bytes: a manifest stored under another tag is not written again.
            await self._store.put(digest, body)
        self._bodies[digest] = body
        await self._record_blob(digest, len(body))
        await self._index.add_manifest(upstream, name, digest, media_type, references)

    def _remember_absent(self, upstream: Source, name: str, reference: Reference, error: MirrorError) -> None:
        if (absent := self._absent.get(upstream.name)) is not None:
            absent[(name, str(reference))] = error.detached()

    @staticmethod
    async def _best_effort(write: Awaitable[None]) -> None:
        """An index write a request does not depend on: if the cache cannot take it (a full
        disk), the request is answered all the same."""
        try:
            await write
        except CacheWriteError as exc:
            log.warning("could not record in the index: %s", exc.message)

    # Blobs

    async def blob(self, route: Route) -> CachedBlob | StreamingBlob:
        """A cached blob, or a download under way whose upstream has answered."""
        upstream = self._upstreams[route.upstream.name]
        digest = _digest_of(route)
        # A download that ends between joining it and opening its spool has published the blob
        # (or failed): the next round finds it in the store (or starts another).
        for _ in range(_ROUNDS):
            size = await self._store.size(digest)
            if size is not None or self.fills.active(digest) is not None:
                await self._ensure_visible(upstream, route.name, digest, "blob")
                if size is None:
                    # Checked again: the fill may have finished, or failed, while we asked.
                    size = await self._store.size(digest)
                if size is not None:
                    self._index.touch(digest)
                    if size <= SMALL_BLOB and (body := await self.stored_body(digest)) is not None:
                        return CachedBlob(size, digest, None, body=body)
                    self._evictor.reading(digest)  # until `done_reading`: eviction leaves it alone
                    return CachedBlob(size, digest, self._store.local_path(digest), await self._store.redirect(digest))
                if (fill := self.fills.active(digest)) is not None:
                    try:
                        await fill.started()
                    except (BlobUnknown, NameUnknown, Denied):
                        # The repository that started it was refused; this one was confirmed.
                        pass
                    else:
                        if (file := fill.reader()) is not None:
                            return StreamingBlob(fill, CacheResult.JOINED, file)
                        continue
            fill = self.fills.active(digest)
            if fill is None:
                self._store.spool.ensure_room()
                fill = self.fills.start(digest, lambda f: self._download_blob(upstream, route.name, f),
                                        (upstream.name, route.name))
            await fill.started()
            await self._best_effort(self._index.link(upstream.name, route.name, digest))
            if (file := fill.reader()) is not None:
                return StreamingBlob(fill, CacheResult.MISS, file)
        raise Unavailable(f"{digest} kept finishing before it could be read: try again")

    async def stored_body(self, digest: Digest) -> bytes | None:
        """A small stored blob or manifest from memory, or read once into it (not counted as a
        use: callers that serve it touch the index themselves)."""
        body = self._bodies.get(digest)
        if body is None and (body := await self._store.read(digest)) is not None:
            self._bodies[digest] = body
        return body

    async def small_blob(self, route: Route) -> bytes:
        """A whole small blob (a signature's payload), through the cache like any blob."""
        blob = await self.blob(route)
        if isinstance(blob, StreamingBlob):
            blob.file.close()
            size = blob.fill.size
            await blob.fill.published()
        else:
            self.done_reading(blob)
            size = blob.size
        if size is not None and size > MANIFEST_MAX_BYTES:
            raise ManifestInvalid(f"{blob.digest if isinstance(blob, CachedBlob) else blob.fill.digest} is "
                                  f"{size} bytes: too large for a signature payload")
        body = await self.stored_body(_digest_of(route))
        if body is None:
            raise Unavailable(f"{_digest_of(route)} was fetched but cannot be read back: try again")
        return body

    def chunks(self, blob: CachedBlob, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of a cached blob the store does not keep as a local file."""
        return self._store.chunks(blob.digest, start, end)

    async def blob_head(self, route: Route) -> BlobHead:
        upstream = self._upstreams[route.upstream.name]
        digest = _digest_of(route)
        size = await self._store.size(digest)
        if size is not None:
            await self._ensure_visible(upstream, route.name, digest, "blob")
            self._index.touch(digest)
            return BlobHead(size, CacheResult.HIT)
        head = await upstream.head("blob", route.name, str(digest))
        return BlobHead(head.size, CacheResult.MISS)

    async def _download_blob(self, upstream: Source, name: str, fill: Fill) -> None:
        async def publish() -> None:
            await fill.commit()
            await self._record_blob(fill.digest, fill.written)

        async def published() -> None:
            # Once publishing has begun the blob lands whatever happens (a rename in a thread,
            # an upload's completion): a shutdown waits until it is recorded too.
            await run_to_end(publish())
        if self._cluster is not None:
            await self._cluster.fetch_blob(upstream, name, fill.digest, fill, published,
                                           lambda: self._from_store(fill))
        else:
            await upstream.fetch_blob(name, fill.digest, fill)
            await published()

    async def _from_store(self, fill: Fill) -> bool:
        """Finish `fill` from the store if another replica published the blob meanwhile."""
        size = await self._store.size(fill.digest)
        if size is None:
            return False
        if not fill.begun:
            fill.begin(size)
        async with aclosing(self._store.chunks(fill.digest, fill.written, size)) as chunks:
            async for data in chunks:
                await fill.write(data)
        return True

    async def _record_blob(self, digest: Digest, size: int) -> None:
        """Index a published file; if the index cannot take it now, the next start-up will."""
        try:
            if await self._index.add_blob(digest, size):
                self._evictor.added(size)
        except CacheWriteError as exc:
            log.warning("published %s but could not index it (the next start-up will): %s", digest, exc.message)

    def done_reading(self, blob: CachedBlob) -> None:
        if blob.body is None:  # one from memory was never marked as being read
            self._evictor.done(blob.digest)

    async def _ensure_visible(self, upstream: Source, name: str, digest: Digest, kind: str) -> None:
        """Raise unless `name` may see `digest`: known from its manifests, or confirmed by the
        upstream in that repository's own scope."""
        if await self._index.is_linked(upstream.name, name, digest):
            return
        await upstream.head(kind, name, str(digest), ACCEPT_ALL if kind == "manifest" else None)
        await self._best_effort(self._index.link(upstream.name, name, digest))

    # Tags

    async def tags(self, route: Route, query: Mapping[str, str]) -> tuple[bytes, str | None]:
        return await self._upstreams[route.upstream.name].get_tags(route.name, query)


def _digest_of(route: Route) -> Digest:
    assert route.reference is not None and route.reference.digest is not None
    return route.reference.digest
