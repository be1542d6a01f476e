"""A subject's referrers (signatures, SBOMs, attestations), for every upstream: from its
referrers API where it has one, else from the spec's fallback tag `sha256-<hex>`.

- The subject is immutable but its referrers are not (a signature arrives after its image, and
  one taken away may be a revocation), so a list has a freshness of its own: `referrers_ttl`,
  `referrers_negative_ttl` for an empty one. Past it, the list is asked for again (one request
  for all who wait) and replaced whole, never merged.
- If the upstream cannot answer, the cached list is served stale; with nothing cached, the
  error goes to the client (a 503 with Retry-After), never an empty list: a verifier would read
  that as "unsigned".
- A list is kept per repository, unfiltered, as an image index in the store; it hangs from its
  subject in the index, so evicting or pinning the image does the same to its referrers.
  `artifactType` is filtered here, whatever the upstream can do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from mirror.errors import (
    CacheWriteError,
    IntegrityError,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    TooManyRequests,
    Unavailable,
    UpstreamRefused,
)
from mirror.flight import Background, Coalescer
from mirror.index import Index, TagRecord
from mirror.metrics import Metrics, referrer_kind
from mirror.oci import OCI_INDEX, Digest, fallback_tag, referrer_descriptors, referrers_index
from mirror.proxy import CacheResult, Proxy
from mirror.routing import Route
from mirror.upstream import Source

log = logging.getLogger(__name__)

# Failures that leave a cached list servable (as for tags).
_STALE_IF = (Unavailable, TooManyRequests, IntegrityError, ManifestInvalid, CacheWriteError, UpstreamRefused)
# How long an upstream that answered 404 is taken to have no referrers API: it is asked for its
# fallback tag alone meanwhile, one request instead of two.
NO_API_MEMORY = 3600.0
# What a client is told to wait when the upstream is down and no list is cached.
RETRY_AFTER = "30"


@dataclass(frozen=True, slots=True)
class ReferrersList:
    descriptors: list[dict[str, object]]
    cache: CacheResult

    def response(self, artifact_type: str | None) -> tuple[bytes, bool]:
        """The index to send and whether it was filtered (`OCI-Filters-Applied`)."""
        if artifact_type is None:
            return referrers_index(self.descriptors), False
        return referrers_index([d for d in self.descriptors if d.get("artifactType") == artifact_type]), True


class Referrers:
    def __init__(self, proxy: Proxy, index: Index, upstreams: Mapping[str, Source], background: Background,
                 metrics: Metrics, revalidate_timeout: float = 5.0, clock: Callable[[], float] | None = None) -> None:
        self._proxy = proxy
        self._index = index
        self._upstreams = upstreams
        self._metrics = metrics
        self._revalidate_timeout = revalidate_timeout
        self._clock = clock or time.time
        self._fetches: Coalescer[tuple[str, str, Digest], ReferrersList] = Coalescer(background)
        self._without_api: dict[str, float] = {}

    async def answer(self, route: Route) -> ReferrersList:
        result = await self._list(route)
        self._metrics.referrers_requests.labels(result.cache.value.lower()).inc()
        for descriptor in result.descriptors:
            self._metrics.referrers_listed.labels(referrer_kind(descriptor.get("artifactType"))).inc()
        return result

    async def _list(self, route: Route) -> ReferrersList:
        upstream = self._upstreams[route.upstream.name]
        assert route.reference is not None and route.reference.digest is not None
        subject = route.reference.digest
        key = (upstream.name, route.name, subject)
        record = await self._index.referrers(*key)
        cached = await self._cached(record) if record is not None else None
        if record is None or cached is None:
            joined = self._fetches.running(key)
            try:
                fresh = await self._fetches.run(key, lambda: self._fetch(upstream, route.name, subject))
            except Unavailable as exc:
                raise Unavailable(exc.message, exc.retry_after or RETRY_AFTER, exc.detail) from exc
            return replace(fresh, cache=CacheResult.JOINED) if joined else fresh
        ttl = upstream.config.referrers_ttl if cached.descriptors else upstream.config.referrers_negative_ttl
        if self._clock() - record.checked_at < ttl:
            return cached
        revalidation = self._fetches.start(key, lambda: self._fetch(upstream, route.name, subject))
        try:
            # The wait is bounded: a slow upstream is treated as a failing one, and the
            # revalidation goes on in the background and replaces the list when it ends.
            async with asyncio.timeout(self._revalidate_timeout):
                fresh = await asyncio.shield(revalidation)
        except TimeoutError:
            log.warning("serving the referrers of %s in %s/%s stale: the upstream takes over %g s", subject,
                        upstream.name, route.name, self._revalidate_timeout)
            return replace(cached, cache=CacheResult.STALE)
        except _STALE_IF as exc:
            if isinstance(exc, UpstreamRefused) and upstream.config.on_refusal == "deny":
                raise
            log.warning("serving the referrers of %s in %s/%s stale: %s", subject, upstream.name, route.name,
                        exc.message)
            return replace(cached, cache=CacheResult.STALE)
        return replace(fresh, cache=CacheResult.REVALIDATED)

    async def _cached(self, record: TagRecord) -> ReferrersList | None:
        stored = await self._proxy.cached_manifest(record.digest)
        if stored is None:
            return None
        return ReferrersList(referrer_descriptors(stored.body), CacheResult.HIT)

    async def _fetch(self, upstream: Source, name: str, subject: Digest) -> ReferrersList:
        """Ask the upstream, then store the list and make it the repository's."""
        descriptors = None
        lacked_at = self._without_api.get(upstream.name)
        if lacked_at is None or self._clock() - lacked_at >= NO_API_MEMORY:
            descriptors = await upstream.get_referrers(name, subject)
            if descriptors is None:
                self._without_api[upstream.name] = self._clock()
            else:
                self._without_api.pop(upstream.name, None)
                self._metrics.referrers_fetched.labels("api").inc()
        if descriptors is None:
            descriptors = await self._from_fallback_tag(upstream, name, subject)
            self._metrics.referrers_fetched.labels("tag").inc()
        body = referrers_index(descriptors)
        digest = Digest.of(body)
        references = [Digest.parse(str(d["digest"])) for d in descriptors]
        await self._proxy.keep_manifest(upstream.name, name, digest, OCI_INDEX, body, references)
        await self._index.set_referrers(upstream.name, name, subject, TagRecord(digest, self._clock()))
        return ReferrersList(descriptors, CacheResult.MISS)

    @staticmethod
    async def _from_fallback_tag(upstream: Source, name: str, subject: Digest) -> list[dict[str, object]]:
        try:
            fetched = await upstream.get_manifest(name, fallback_tag(subject), OCI_INDEX)
        except (ManifestUnknown, NameUnknown):
            return []
        if fetched.digest is not None and fetched.digest != Digest.of(fetched.body):
            raise IntegrityError(f"upstream {upstream.name} sent the referrers tag of {subject} under another digest")
        return referrer_descriptors(fetched.body)
