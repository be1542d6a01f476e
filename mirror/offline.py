"""The upstream of a mirror that must not contact one (an air-gapped site): every question the
cache could not answer is answered "not cached" at once, with no DNS look-up, connection or
token, and recorded as a miss so that the next image list can be made from them. Tag lists come
from the index. It stands where an online `Upstream` would, so no caller checks for offline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn

from mirror.config import UpstreamConfig
from mirror.errors import BlobUnknown, ManifestUnknown, MirrorError, NameUnknown, Unavailable
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.upstream import BlobSink, Condition, Head, Manifest

log = logging.getLogger(__name__)

Recorder = Callable[[str, str, str, str], Awaitable[None]]
"""Records a miss: (upstream, repository, reference, kind)."""
TagLister = Callable[[str, str], Awaitable[list[str]]]
"""The cached tags of (upstream, repository)."""
Explainer = Callable[[Digest], Awaitable[str | None]]
"""Why a manifest digest is missing, where the cache knows (a platform an index names but that was
not seeded or imported)."""


class OfflineUpstream:
    def __init__(self, config: UpstreamConfig, record: Recorder, cached_tags: TagLister, explain: Explainer,
                 metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        self._record = record
        self._cached_tags = cached_tags
        self._explain = explain
        self._misses = metrics.offline_misses

    def condition(self) -> Condition:
        return Condition("offline", "configured offline: only what is cached is served")

    async def head(self, kind: str, name: str, reference: str, accept: str | None = None) -> Head:
        await self._miss(kind, name, reference)

    async def get_manifest(self, name: str, reference: str, accept: str) -> Manifest:
        await self._miss("manifest", name, reference)

    async def fetch_blob(self, name: str, digest: Digest, sink: BlobSink) -> None:
        await self._miss("blob", name, str(digest))

    async def get_tags(self, name: str, query: Mapping[str, str]) -> tuple[bytes, str | None]:
        tags = sorted(await self._cached_tags(self.name, name))
        if not tags:
            raise NameUnknown(f"{self.name}/{name} has no cached tags and the mirror is offline", {"offline": True})
        if "last" in query:
            tags = [t for t in tags if t > query["last"]]
        if query.get("n", "").isdigit():
            tags = tags[:int(query["n"])]
        return json.dumps({"name": name, "tags": tags}).encode(), None

    async def get_referrers(self, name: str, subject: Digest) -> list[dict[str, object]] | None:
        """Never "none": a verifier reading an empty list would take the image for unsigned."""
        self._misses.labels("referrers").inc()
        raise Unavailable(f"the referrers of {subject} in {self.name}/{name} are not cached, and the mirror is offline",
                          detail={"offline": True, "upstream": self.name, "name": name, "subject": str(subject)})

    async def _miss(self, kind: str, name: str, reference: str) -> NoReturn:
        self._misses.labels(kind).inc()
        try:
            await self._record(self.name, name, reference, kind)
        except MirrorError as exc:
            log.warning("could not record the miss of %s/%s %s: %s", self.name, name, reference, exc.message)
        detail: dict[str, object] = {"offline": True, "upstream": self.name, "name": name, "reference": reference}
        message = f"{self.name}/{name} {reference} is not cached, and the mirror is offline"
        platform = (await self._explain(Digest.parse(reference))
                    if kind == "manifest" and reference.startswith("sha256:") else None)
        if platform is not None:
            detail["platform"] = platform
            message += f": platform {platform} of this image was not seeded or imported"
        error = ManifestUnknown if kind == "manifest" else BlobUnknown
        raise error(message, detail)
