"""Keeping the cache inside its disk budget.

Usage is tracked in memory (read from the index at start-up, then added to on every publish).
Past the high watermark, one eviction pass runs in the background and removes least recently
used content until usage is under the low watermark; and content unused for longer than its
upstreams' max_age goes whatever the usage. What may go is decided by the index:
unpinned manifests, and blobs no cached manifest references, so an image goes as a whole and
a layer shared with a cached image stays. A blob a client is reading right now is skipped.
Rows go before files: a crash in between leaves a file the index does not know, which the
next start-up records again and a later pass evicts. Replicas sharing a bucket evict one at a
time (a cluster lease), over the whole bucket's usage as the shared index counts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from mirror.config import EvictionConfig
from mirror.flight import Background
from mirror.index import Index
from mirror.metrics import Metrics
from mirror.oci import Digest
from mirror.storage import BlobStore

log = logging.getLogger(__name__)

# Candidates asked of the index at a time.
_BATCH = 256


@dataclass(frozen=True, slots=True)
class Evicted:
    digest: Digest
    size: int


class Evictor:
    def __init__(self, config: EvictionConfig, store: BlobStore, index: Index, background: Background,
                 metrics: Metrics) -> None:
        self._config = config
        self._store = store
        self._index = index
        self._background = background
        self._metrics = metrics
        self.usage = 0
        self.blobs = 0
        self._reading: Counter[Digest] = Counter()
        self._pass_running = False
        # One pass at a time: two could pick the same victim and count its size twice.
        self._lock = asyncio.Lock()
        self.exclusive: Callable[[str], AbstractAsyncContextManager[bool]] | None = None
        """Where replicas share the cache: the lease that lets one of them evict (yields False
        while another holds it)."""

    async def open(self) -> None:
        await self.refresh()

    async def refresh(self) -> None:
        """Usage as the index counts it: with replicas, what the others added too."""
        self.blobs, self.usage = await self._index.usage()
        self._check()

    def added(self, size: int) -> None:
        self.usage += size
        self.blobs += 1
        self._check()

    def reading(self, digest: Digest) -> None:
        """A client is about to read `digest` from its file: not to be evicted until `done`."""
        self._reading[digest] += 1

    def done(self, digest: Digest) -> None:
        self._reading[digest] -= 1
        if self._reading[digest] <= 0:
            del self._reading[digest]

    def _check(self) -> None:
        limit = self._config.max_size
        if limit is not None and self.usage > limit * self._config.high_watermark and not self._pass_running:
            self._pass_running = True
            self._background.spawn(self._pass(), name="eviction pass")

    async def _pass(self) -> None:
        try:
            evicted = await self.evict()
            log.info("evicted %d blobs (%d bytes); cache now holds %d bytes",
                     len(evicted), sum(e.size for e in evicted), self.usage)
        finally:
            self._pass_running = False
        self._check()

    async def evict(self) -> list[Evicted]:
        """Down to the low watermark, least recently used first."""
        assert self._config.max_size is not None
        target = self._config.max_size * self._config.low_watermark
        evicted = await self._remove(lambda: self._index.eviction_candidates(_BATCH), lambda: self.usage > target,
                                     "size")
        if self.usage > target:
            log.warning("cache holds %d bytes, over its budget, but the rest is pinned or in use", self.usage)
        return evicted

    async def expire(self, max_ages: Mapping[str, float], now: float) -> list[Evicted]:
        """Content unused for longer than the max_age of every upstream that links it."""
        if not max_ages:
            return []
        cutoffs = {upstream: now - age for upstream, age in max_ages.items()}
        return await self._remove(lambda: self._index.expired_candidates(cutoffs, _BATCH), lambda: True, "age")

    async def _remove(self, candidates: Callable[[], Awaitable[list[tuple[Digest, int]]]],
                      wanted: Callable[[], bool], reason: str) -> list[Evicted]:
        async with self._lock:
            if self.exclusive is None:
                return await self._remove_locked(candidates, wanted, reason)
            async with self.exclusive("evict") as held:
                if not held:
                    return []
                self.blobs, self.usage = await self._index.usage()
                return await self._remove_locked(candidates, wanted, reason)

    async def _remove_locked(self, candidates: Callable[[], Awaitable[list[tuple[Digest, int]]]],
                             wanted: Callable[[], bool], reason: str) -> list[Evicted]:
        evicted: list[Evicted] = []
        while wanted():
            batch = [(d, size) for d, size in await candidates() if d not in self._reading]
            if not batch:
                break
            for digest, size in batch:
                if not wanted() or digest in self._reading:
                    continue
                released = await self._remove_one(digest, size, reason, evicted)
                # An image goes whole: what only its manifest held goes with it, past the target
                # if need be, or a config without its image would be left to take room.
                while released:
                    freed = [(d, n) for d, n in await self._index.evictable(released) if d not in self._reading]
                    released = [child for d, n in freed for child in await self._remove_one(d, n, reason, evicted)]
        return evicted

    async def _remove_one(self, digest: Digest, size: int, reason: str, evicted: list[Evicted]) -> list[Digest]:
        """Evict `digest`; what it referenced, which may now be free to go too."""
        released = await self._index.forget(digest)
        await self._store.remove(digest)
        self.usage -= size
        self.blobs -= 1
        self._metrics.evictions.labels(reason).inc()
        self._metrics.evicted_bytes.labels(reason).inc(size)
        self._metrics.activity.evicted(size)
        evicted.append(Evicted(digest, size))
        return released
