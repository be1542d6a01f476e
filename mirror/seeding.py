"""Filling the cache with the images of a list, ahead of any client: the same single-flight
downloads and verified store writes as client traffic (the proxy's), then a pin so that eviction
leaves them alone.

An image is its manifest, and for an index the children of the selected platforms (the index
itself is kept byte for byte: a sparse index, never a rewritten one), their configs and layers,
and, if asked, its referrers: the `sha256-<hex>` fallback tag of the OCI referrers scheme and
cosign's `.sig`, `.att` and `.sbom` tags, with their own referrers in turn.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from mirror.config import Config
from mirror.errors import CacheWriteError, ManifestUnknown, MirrorError, NameUnknown
from mirror.imagelist import ImageSpec, Platform
from mirror.index import Index
from mirror.metrics import Metrics
from mirror.oci import DOCKER_MANIFEST_LIST, OCI_INDEX, Digest, Reference, fallback_tag, parse_tag
from mirror.progress import Reporter
from mirror.proxy import ACCEPT_ALL, CachedBlob, ManifestResult, Proxy
from mirror.referrers import Referrers
from mirror.remote import ServerFetcher
from mirror.routing import Endpoint, Route
from mirror.services import open_services

log = logging.getLogger(__name__)

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Referrers of referrers (a signature of an SBOM) are followed this deep.
REFERRER_DEPTH = 3
# Cosign's tag suffixes for what it attaches to an image.
COSIGN_SUFFIXES = (".sig", ".att", ".sbom")
TAG_PAGE = 1000

Progress = Callable[["Event"], None]


@dataclass(frozen=True, slots=True)
class Event:
    """Something seeding did, for a progress display: `kind` is `blob` (bytes arrived) or `image` (one done)."""

    kind: str
    reference: str
    bytes: int = 0


@dataclass(slots=True)
class Seeded:
    """What one reference came to."""

    reference: str
    digest: str
    media_type: str
    platforms_present: list[str] = field(default_factory=list)
    platforms_missing: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    """Every manifest digest kept: the image's own, its selected children, its referrers."""
    blobs: dict[str, int] = field(default_factory=dict)
    """Every config and layer, with its size."""
    referrers: list[str] = field(default_factory=list)
    referrer_tags: dict[str, str] = field(default_factory=dict)
    """The tags the referrers were found under (`sha256-<hex>.sig` ...), with their digests: an
    offline mirror serves them by these tags, as clients look them up."""
    referrer_lists: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    """Subject digest -> its referrers as the referrers API listed them: an offline mirror
    answers that API from these."""
    bytes_fetched: int = 0
    bytes_cached: int = 0
    pinned: bool = False


class Fetcher(Protocol):
    """Where seeding gets images from: the cache's own proxy, or a running mirror's /v2 API."""

    async def manifest(self, spec: ImageSpec, reference: Reference) -> ManifestResult: ...
    async def blob(self, spec: ImageSpec, digest: Digest) -> tuple[int, bool]:
        """The blob's size once it is in the cache, and whether it had to be fetched for that."""
    async def tags(self, spec: ImageSpec, query: Mapping[str, str]) -> tuple[bytes, str | None]: ...
    async def referrers(self, spec: ImageSpec, subject: Digest) -> list[dict[str, object]]:
        """`subject`'s referrers, as the referrers API lists them (whether or not the upstream has it)."""
    async def pin(self, digest: Digest) -> bool: ...


class CacheFetcher:
    """The proxy of a cache this process opened: its single-flight downloads and verified writes."""

    def __init__(self, proxy: Proxy, referrers: Referrers, index: Index) -> None:
        self._proxy = proxy
        self._referrers = referrers
        self._index = index

    async def manifest(self, spec: ImageSpec, reference: Reference) -> ManifestResult:
        result = await self._proxy.manifest(Route(spec.upstream, spec.name, Endpoint.MANIFEST, reference), ACCEPT_ALL)
        # What an offline mirror on this cache lacked is a miss no more (if the index can say so).
        with contextlib.suppress(CacheWriteError):
            await self._index.clear_miss(spec.upstream.name, spec.name, str(reference))
        return result

    async def blob(self, spec: ImageSpec, digest: Digest) -> tuple[int, bool]:
        blob = await self._proxy.blob(Route(spec.upstream, spec.name, Endpoint.BLOB, Reference(digest=digest)))
        if isinstance(blob, CachedBlob):
            self._proxy.done_reading(blob)
            return blob.size, False
        await blob.fill.published()
        return blob.fill.written, True

    async def tags(self, spec: ImageSpec, query: Mapping[str, str]) -> tuple[bytes, str | None]:
        return await self._proxy.tags(Route(spec.upstream, spec.name, Endpoint.TAGS), query)

    async def referrers(self, spec: ImageSpec, subject: Digest) -> list[dict[str, object]]:
        route = Route(spec.upstream, spec.name, Endpoint.REFERRERS, Reference(digest=subject))
        return (await self._referrers.answer(route)).descriptors

    async def pin(self, digest: Digest) -> bool:
        return await self._index.pin(digest)


class Seeder:
    def __init__(self, fetcher: Fetcher, progress: Progress | None = None, pin: bool = True) -> None:
        """`pin`: keep what is seeded out of eviction's reach (an export only reads)."""
        self._fetcher = fetcher
        self._progress = progress or (lambda _: None)
        self._pin = pin

    async def expand(self, spec: ImageSpec) -> list[ImageSpec]:
        """A repository entry as the tags its filters admit; any other entry as it is."""
        if spec.reference is not None:
            return [spec]
        assert spec.tags is not None
        tags: list[str] = []
        query: dict[str, str] = {"n": str(TAG_PAGE)}
        while True:
            body, link = await self._fetcher.tags(spec, query)
            page = json.loads(body).get("tags") or []
            tags += [t for t in page if isinstance(t, str)]
            if not link or not page:
                break
            query = {"n": str(TAG_PAGE), "last": page[-1]}
        admitted = sorted(t for t in tags if spec.tags.admits(t))
        return [ImageSpec(spec.source, spec.upstream, spec.name, Reference(tag=parse_tag(t)), spec.platforms,
                          spec.referrers) for t in admitted]

    async def seed(self, spec: ImageSpec, dry_run: bool = False) -> Seeded:
        """Fetch (or find cached) everything `spec` names and pin it; with `dry_run`, resolve
        the manifests only."""
        assert spec.reference is not None
        root = await self._manifest(spec, spec.reference)
        seeded = Seeded(str(spec), str(root.digest), root.media_type, manifests=[str(root.digest)])
        images = [root]
        if root.media_type in INDEX_TYPES:
            images = await self._children(spec, root, seeded)
        if not dry_run:
            for image in images:
                await self._blobs(spec, image, seeded)
        if spec.referrers:
            await self._referrers(spec, root.digest, seeded, dry_run, REFERRER_DEPTH)
        if self._pin and not dry_run:
            pinned = [await self._fetcher.pin(Digest.parse(digest)) for digest in seeded.manifests]
            seeded.pinned = all(pinned)
        self._progress(Event("image", str(spec)))
        return seeded

    async def _manifest(self, spec: ImageSpec, reference: Reference) -> ManifestResult:
        return await self._fetcher.manifest(spec, reference)

    async def _children(self, spec: ImageSpec, index: ManifestResult, seeded: Seeded) -> list[ManifestResult]:
        """The children of `index` for the platforms asked for (all if none were)."""
        document = json.loads(index.body)
        children = [d for d in document.get("manifests", []) if isinstance(d, dict)]
        wanted = spec.platforms
        chosen = children if wanted is None else [d for d in children
                                                  if any(p.matches(d.get("platform")) for p in wanted)]
        if wanted is not None:
            seeded.platforms_missing = [str(p) for p in wanted
                                        if not any(p.matches(d.get("platform")) for d in children)]
        results = []
        for descriptor in chosen:
            child = await self._manifest(spec, Reference(digest=Digest.parse(str(descriptor["digest"]))))
            if str(child.digest) in seeded.manifests:
                continue  # an index may name a child twice
            results.append(child)
            seeded.manifests.append(str(child.digest))
            if (platform := Platform.of(descriptor.get("platform"))) is not None:
                seeded.platforms_present.append(str(platform))
        return results

    async def _blobs(self, spec: ImageSpec, image: ManifestResult, seeded: Seeded) -> None:
        document = json.loads(image.body)
        descriptors = [document.get("config"), *(document.get("layers") or []), *(document.get("blobs") or [])]
        for descriptor in descriptors:
            if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
                continue
            digest = Digest.parse(descriptor["digest"])
            if str(digest) in seeded.blobs:
                continue
            size, fetched = await self._fetcher.blob(spec, digest)
            seeded.blobs[str(digest)] = size
            if fetched:
                seeded.bytes_fetched += size
                self._progress(Event("blob", str(spec), size))
            else:
                seeded.bytes_cached += size

    async def _referrers(self, spec: ImageSpec, subject: Digest, seeded: Seeded, dry_run: bool, depth: int) -> None:
        """Every referrer of `subject` (the referrers API, or the fallback tag where the upstream
        lacks it), what cosign's tags hold, and their referrers in turn."""
        listed = await self._fetcher.referrers(spec, subject)
        seeded.referrer_lists[str(subject)] = listed
        attached = [await self._manifest(spec, Reference(digest=Digest.parse(str(d["digest"])))) for d in listed]
        tag = fallback_tag(subject)
        for candidate in (tag, *(tag + suffix for suffix in COSIGN_SUFFIXES)):
            try:
                found = await self._manifest(spec, Reference(tag=candidate))
            except (ManifestUnknown, NameUnknown):
                continue
            seeded.referrer_tags[candidate] = str(found.digest)
            if candidate != tag:
                attached.append(found)
            elif str(found.digest) not in seeded.manifests:
                # The fallback scheme's own index, for clients that read it by its tag.
                seeded.manifests.append(str(found.digest))
        for referrer in attached:
            if str(referrer.digest) in seeded.manifests:
                continue
            seeded.manifests.append(str(referrer.digest))
            seeded.referrers.append(str(referrer.digest))
            if not dry_run:
                await self._blobs(spec, referrer, seeded)
            if depth > 1:
                await self._referrers(spec, referrer.digest, seeded, dry_run, depth - 1)


Failure = tuple[ImageSpec, MirrorError]


async def seed_all(seeder: Seeder, specs: list[ImageSpec], dry_run: bool) -> tuple[list[Seeded], list[Failure]]:
    """Every spec in turn; a reference that fails is reported and the rest go on."""
    done: list[Seeded] = []
    failed: list[Failure] = []
    for listed in specs:
        try:
            expanded = await seeder.expand(listed)
        except MirrorError as exc:
            failed.append((listed, exc))
            continue
        for spec in expanded:
            try:
                result = await seeder.seed(spec, dry_run)
            except MirrorError as exc:
                failed.append((spec, exc))
                continue
            done.append(result)
    return done, failed


async def seed(config: Config, specs: list[ImageSpec], dry_run: bool, quiet: bool = False,
               server: str | None = None) -> tuple[list[Seeded], list[Failure]]:
    """`mirror seed`: on the cache directory, with the services a serving mirror would open, or
    through a running mirror's /v2 API (`server`). Interrupted, it keeps what was whole; run
    again, it fetches only the rest."""
    with Reporter("seeding", len(specs), quiet) as reporter:
        if server is not None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.timeouts.connect,
                                            sock_read=config.timeouts.read)
            async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
                return await seed_all(Seeder(ServerFetcher(session, server), reporting(reporter)), specs, dry_run)
        async with open_services(config, Metrics()) as services:
            seeder = Seeder(CacheFetcher(services.proxy, services.referrers, services.index), reporting(reporter))
            return await seed_all(seeder, specs, dry_run)


def reporting(reporter: Reporter) -> Progress:
    """Seeding's events on a progress display: bytes as blobs arrive, a step per image."""
    def progress(event: Event) -> None:
        if event.kind == "blob":
            reporter.moved(event.bytes, event.reference)
        else:
            reporter.finished(event.reference)
    return progress
