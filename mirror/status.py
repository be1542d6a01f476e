"""What an operator sees of a running mirror and may do to it: the figures behind the status page
and the admin API, each view cut to what its viewer may pull. Nothing here knows HTTP.

Every figure is a plain JSON-ready dict, so the page, scripts and tests read the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from mirror.activity import EVICTION_UPSTREAM, Tally, UpstreamHealth
from mirror.errors import ConfigError, RequestInvalid
from mirror.imagelist import ImageSpec, Platform, from_arguments
from mirror.index import CachedImage
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.seeding import INDEX_TYPES, CacheFetcher, Seeder, seed_all
from mirror.services import Services, collect_live

TOP = 10
"""Repositories in each top list."""
LISTING_TTL = 5.0
"""How long the list of cached images is reused (unless a pin, gc or seed changes it): every
open page asks each second, and listing walks every image's tree in the index."""

Visible = Callable[[str, str], bool]
"""Whether the viewer may pull (and so see) repository `name` of `upstream`."""


@dataclass(frozen=True, slots=True)
class GcResult:
    dry_run: bool
    usage_before: int
    usage_after: int
    evicted: list[dict[str, object]]


class Status:
    def __init__(self, services: Services, metrics: Metrics) -> None:
        self._services = services
        self._config = services.config
        self._activity = metrics.activity
        self._clock = services.clock
        """The cache's clock, which tag ages are counted by."""
        self._listing: tuple[float, list[CachedImage]] | None = None
        self._changes = 0
        """Counts pins, gcs and seeds: a listing begun before one is not kept."""

    async def _images(self) -> list[CachedImage]:
        now, changes = time.monotonic(), self._changes
        if self._listing is not None and now - self._listing[0] <= LISTING_TTL:
            return self._listing[1]
        images = await self._services.index.images()
        if changes == self._changes:
            self._listing = (now, images)
        return images

    def _changed(self) -> None:
        self._changes += 1
        self._listing = None

    def effectiveness(self) -> dict[str, Any]:
        """Hit ratios and bytes saved per upstream, last hour and since start, and the last hour's chart."""
        names = [u.name for u in self._config.upstreams]
        totals = self._activity.totals
        return {
            "since": self._activity.started,
            "upstreams": {name: {"last_hour": _ratios(self._activity.last_hour(name)),
                                 "since_start": _ratios(totals.get(name, Tally()))} for name in names},
            "total": {"last_hour": _ratios(_sum(self._activity.last_hour(n) for n in names)),
                      "since_start": _ratios(_sum(totals.get(n, Tally()) for n in names))},
            "series": [{"at": at, **_ratios(tally)} for at, tally in self._activity.series(names)],
        }

    def downloads(self, visible: Visible) -> list[dict[str, Any]]:
        now = time.time()
        shown = []
        for fill in self._services.proxy.fills:
            upstream, name = fill.origin
            if not visible(upstream, name):
                continue
            age = max(now - fill.started_at, 1e-3)
            shown.append({"upstream": upstream, "name": name, "digest": str(fill.digest), "bytes": fill.written,
                          "size": fill.size, "rate": fill.written / age, "readers": fill.readers, "age": age})
        return sorted(shown, key=lambda d: -d["age"])

    def upstreams(self, secrets: bool) -> list[dict[str, Any]]:
        """Without `secrets`, only whether the mirror has credentials for an upstream, not
        where they come from (a user name, a key file)."""
        shown = []
        for name, source in self._services.upstreams.items():
            condition = source.condition()
            health = self._activity.health.get(name) or UpstreamHealth()
            hour = self._activity.last_hour(name)
            remaining, limit = self._activity.rate_limits.get(name, (None, None))
            shown.append({
                "name": name, "url": source.config.url, "state": condition.state, "reason": condition.reason,
                "last_success": health.last_success, "last_error": health.last_error,
                "last_error_reason": health.last_error_reason,
                "requests_last_hour": hour.upstream_requests, "errors_last_hour": hour.upstream_errors,
                "rate_limited_last_hour": hour.upstream_429,
                "error_rate": hour.upstream_errors / hour.upstream_requests if hour.upstream_requests else 0.0,
                "ratelimit_remaining": remaining, "ratelimit_limit": limit,
                "credentials": (condition.credentials if secrets else "configured") if condition.credentials else None,
                "credentials_expire": condition.credentials_expire, "ttfb_median": health.ttfb_median(),
            })
        return shown

    async def storage(self, visible: Visible) -> dict[str, Any]:
        services, eviction = self._services, self._config.eviction
        pinned_blobs, pinned_bytes = await services.index.pinned_usage()
        images = [i for i in await self._images() if visible(i.upstream, i.name)]
        sizes: dict[str, dict[str, int]] = {}
        for image in images:
            # Tags of one manifest hold the same bytes: counted once per repository.
            sizes.setdefault(f"{image.upstream}/{image.name}", {})[image.digest] = image.size
        pulls: dict[str, int] = {}
        for (upstream, name, reference), count in self._activity.pulls.items():
            # By tag, as an image's own count: a platform's manifest is part of its index's pull.
            if visible(upstream, name) and not reference.startswith("sha256:"):
                pulls[f"{upstream}/{name}"] = pulls.get(f"{upstream}/{name}", 0) + count
        hour = self._activity.last_hour(EVICTION_UPSTREAM)
        since = self._activity.totals.get(EVICTION_UPSTREAM, Tally())
        budget = eviction.max_size
        return {
            "used": services.evictor.usage, "blobs": services.evictor.blobs, "budget": budget,
            "high_watermark": budget * eviction.high_watermark if budget else None,
            "low_watermark": budget * eviction.low_watermark if budget else None,
            "pinned_bytes": pinned_bytes, "pinned_blobs": pinned_blobs,
            "evictions_last_hour": hour.evictions, "evicted_bytes_last_hour": hour.evicted_bytes,
            "evictions_since_start": since.evictions, "evicted_bytes_since_start": since.evicted_bytes,
            "top_by_size": [{"repository": r, "bytes": sum(s.values())} for r, s in
                            sorted(sizes.items(), key=lambda item: -sum(item[1].values()))[:TOP]],
            "top_by_pulls": [{"repository": r, "pulls": n} for r, n in
                             sorted(pulls.items(), key=lambda item: -item[1])[:TOP]],
        }

    async def images(self, visible: Visible, administrable: Visible) -> list[dict[str, Any]]:
        """`administrable`: whether the viewer may pin and unpin each."""
        now = self._clock()
        ttls = {u.name: u.tag_ttl for u in self._config.upstreams}
        shown = []
        for image in await self._images():
            if not visible(image.upstream, image.name):
                continue
            # An upstream no longer configured: its tags are not revalidated, nor served.
            ttl = ttls.get(image.upstream, math.inf)
            age = max(now - image.checked_at, 0.0)
            pulls = self._activity.pulls.get((image.upstream, image.name, image.tag), 0)
            shown.append({**asdict(image), "pulls": pulls,
                          "tag_age": age, "ttl_left": max(ttl - age, 0.0) if ttl != math.inf else None,
                          "platforms": await self._platforms(image),
                          "can_pin": administrable(image.upstream, image.name)})
        return shown

    async def _platforms(self, image: CachedImage) -> list[dict[str, object]]:
        """An index's platforms, each present (its manifest is cached) or not."""
        if image.media_type not in INDEX_TYPES:
            return []
        body = await self._services.proxy.stored_body(Digest.parse(image.digest))
        try:
            manifests = json.loads(body or b"{}").get("manifests", [])
        except (ValueError, AttributeError):
            return []
        platforms = []
        for descriptor in manifests if isinstance(manifests, list) else []:
            if not isinstance(descriptor, dict) or (platform := Platform.of(descriptor.get("platform"))) is None:
                continue
            try:
                present = await self._services.index.manifest_type(Digest.parse(str(descriptor.get("digest")))) \
                    is not None
            except ValueError:
                continue
            platforms.append({"platform": str(platform), "present": present})
        return platforms

    def failures(self, visible: Visible) -> list[dict[str, Any]]:
        return [asdict(f) for f in reversed(self._activity.failures) if visible(f.upstream, f.name)]

    # Admin operations.

    async def pin(self, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
        """The pinned (or unpinned) image's manifest digest; None if it is not cached for that
        repository (a digest cached for another is not this one's to pin)."""
        index = self._services.index
        if reference.startswith("sha256:") and not await index.is_linked(upstream, name, Digest.parse(reference)):
            return None
        try:
            return await index.set_pinned(upstream, name, reference, pinned)
        finally:
            self._changed()

    async def gc(self, dry_run: bool) -> GcResult:
        try:
            before, after, evicted = await collect_live(self._services, dry_run)
        finally:
            self._changed()
        return GcResult(dry_run, before, after, [{"digest": str(e.digest), "size": e.size} for e in evicted])

    def image_specs(self, references: list[str]) -> list[ImageSpec]:
        try:
            return from_arguments(references, self._config)
        except ConfigError as exc:
            raise RequestInvalid(str(exc)) from None

    async def seed(self, specs: list[ImageSpec]) -> list[dict[str, Any]]:
        """Fetch and pin each image now, as `mirror seed` does on a stopped cache."""
        services = self._services
        seeder = Seeder(CacheFetcher(services.proxy, services.referrers, services.index), pin=True)
        try:
            done, failed = await seed_all(seeder, specs, False)
        finally:
            self._changed()
        return ([{"reference": s.reference, "digest": s.digest, "pinned": s.pinned, "blobs": len(s.blobs),
                  "bytes_fetched": s.bytes_fetched} for s in done]
                + [{"reference": str(spec), "error": error.message} for spec, error in failed])


def _sum(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total.add(tally)
    return total


def _ratios(tally: Tally) -> dict[str, float | int]:
    served = tally.bytes_cache + tally.bytes_upstream
    return {"requests": tally.requests, "from_cache": tally.from_cache,
            "hit_ratio": tally.from_cache / tally.requests if tally.requests else 0.0,
            "bytes_cache": tally.bytes_cache, "bytes_upstream": tally.bytes_upstream,
            "byte_hit_ratio": tally.bytes_cache / served if served else 0.0, "bytes_saved": tally.bytes_cache}
