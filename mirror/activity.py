"""What the mirror did lately, for the status page: per upstream and per minute, the requests
and bytes that decide how much the cache saves, what upstreams answered, what was evicted, which
images were pulled, and the last failures.

Prometheus counters say the same since start, but without the last hour, per upstream or per
repository (labels stay bounded there). Every request and byte is counted here under exactly the
conditions the matching counter of `mirror.metrics` counts it, so the two always agree. All of it
is in memory, per process: a restart starts from zero, as the counters do.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

WINDOW_MINUTES = 60
MAX_FAILURES = 100
MAX_PULLED = 50_000
"""Images whose pulls are counted (the least recently pulled are forgotten past it)."""
_TTFB_SAMPLES = 200


@dataclass(slots=True)
class Tally:
    """What one upstream saw in one minute, or since start."""

    requests: int = 0
    """Manifest and blob requests answered from the cache or an upstream (`mirror_cache_requests`)."""
    from_cache: int = 0
    """Of those, answered without a download of their own: hits, joins, stale and revalidated."""
    bytes_cache: int = 0
    """Body bytes sent from the cache (`mirror_served_bytes{source="cache"}`)."""
    bytes_upstream: int = 0
    """Body bytes sent while downloading them (`mirror_served_bytes{source="upstream"}`)."""
    upstream_requests: int = 0
    upstream_errors: int = 0
    """Upstream answers that were no answer, or a 5xx."""
    upstream_429: int = 0
    evictions: int = 0
    evicted_bytes: int = 0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class UpstreamHealth:
    """How an upstream has been answering."""

    last_success: float | None = None
    last_error: float | None = None
    last_error_reason: str | None = None
    ttfb: deque[float] = field(default_factory=lambda: deque(maxlen=_TTFB_SAMPLES))

    def ttfb_median(self) -> float | None:
        return statistics.median(self.ttfb) if self.ttfb else None


@dataclass(frozen=True, slots=True)
class Failure:
    """A pull that failed, as its client was told (never a credential: error messages carry none)."""

    at: float
    upstream: str
    name: str
    reference: str
    route: str
    status: int
    code: str
    message: str


EVICTION_UPSTREAM = ""
"""Evictions are the cache's, not an upstream's: they are tallied under this key."""


class Activity:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.totals: dict[str, Tally] = {}
        self._minutes: dict[str, dict[int, Tally]] = {}
        self.health: dict[str, UpstreamHealth] = {}
        self.failures: deque[Failure] = deque(maxlen=MAX_FAILURES)
        self.pulls: dict[tuple[str, str, str], int] = {}
        """Manifests served, by upstream, repository and reference, least recently pulled first."""
        self.rate_limits: dict[str, tuple[int | None, int | None]] = {}
        """Per upstream, the pulls left in its window and its limit, as it last said."""

    def _tally(self, upstream: str) -> tuple[Tally, Tally]:
        """Since start and this minute's, for `upstream`."""
        minute = int(self._clock() // 60)
        minutes = self._minutes.setdefault(upstream, {})
        if minute not in minutes:
            minutes[minute] = Tally()
            for old in [m for m in minutes if m <= minute - WINDOW_MINUTES]:
                del minutes[old]
        return self.totals.setdefault(upstream, Tally()), minutes[minute]

    def served(self, upstream: str, counted: bool, from_cache: bool, cache_bytes: int, upstream_bytes: int) -> None:
        for tally in self._tally(upstream):
            tally.requests += counted
            tally.from_cache += counted and from_cache
            tally.bytes_cache += cache_bytes
            tally.bytes_upstream += upstream_bytes

    def pulled(self, upstream: str, name: str, reference: str) -> None:
        """A manifest was served for `reference`: one pull of that image."""
        key = (upstream, name, reference)
        self.pulls[key] = self.pulls.pop(key, 0) + 1  # re-inserted: the order is least recently pulled first
        if len(self.pulls) > MAX_PULLED:
            del self.pulls[next(iter(self.pulls))]

    def now(self) -> float:
        return self._clock()

    def failed(self, failure: Failure) -> None:
        self.failures.append(failure)

    def asked(self, upstream: str, status: int | None, seconds: float, reason: str | None = None) -> None:
        """An upstream answered `status` after `seconds` (None: no answer at all)."""
        error = status is None or status >= 500
        for tally in self._tally(upstream):
            tally.upstream_requests += 1
            tally.upstream_errors += error
            tally.upstream_429 += status == 429
        health = self.health.setdefault(upstream, UpstreamHealth())
        now = self._clock()
        if status is not None:
            health.ttfb.append(seconds)
        if status is None or error or status == 429:
            health.last_error = now
            health.last_error_reason = reason or (f"answered {status}" if status is not None else "no answer")
        elif status < 400:
            health.last_success = now

    def evicted(self, size: int) -> None:
        for tally in self._tally(EVICTION_UPSTREAM):
            tally.evictions += 1
            tally.evicted_bytes += size

    def last_hour(self, upstream: str) -> Tally:
        total = Tally()
        cutoff = int(self._clock() // 60) - WINDOW_MINUTES
        for minute, tally in self._minutes.get(upstream, {}).items():
            if minute > cutoff:
                total.add(tally)
        return total

    def series(self, upstreams: Iterable[str]) -> list[tuple[int, Tally]]:
        """The last hour, minute by minute (epoch seconds of each minute), all of `upstreams` together."""
        now = int(self._clock() // 60)
        points = []
        for minute in range(now - WINDOW_MINUTES + 1, now + 1):
            tally = Tally()
            for upstream in upstreams:
                if (found := self._minutes.get(upstream, {}).get(minute)) is not None:
                    tally.add(found)
            points.append((minute * 60, tally))
        return points
