"""Sparing an upstream while it fails: a circuit breaker per upstream, and a backoff per
repository for refusals. Nothing here knows HTTP clients; the upstream client reports each
outcome and asks before each request.

The breaker:

    closed ──(429 / 503 with Retry-After, ratelimit-remaining: 0)──────────> open until that time
    closed ──(`failures` 5xx or connection failures in a row)──────────────> open for the backoff
    open ────(the wait is over; the next request is the one probe)─────────> half-open
    half-open ──(the probe is answered)────────────────────────────────────> closed
    half-open ──(the probe fails)──────────> open again, the backoff doubled (up to `max_backoff`)

While open (and, for every request but the probe, while half-open) no request goes: the caller
gets the error at once, with the Retry-After its client should honour, and serves stale what it
has cached.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from cachetools import LRUCache

from mirror.errors import TooManyRequests, Unavailable, UpstreamRefused

log = logging.getLogger(__name__)

# An upstream's own Retry-After (or rate-limit reset) is honoured up to this long; Docker Hub's
# pull window is six hours.
MAX_RETRY_AFTER = 6 * 3600.0
# How long `ratelimit-remaining: 0` closes the upstream when it says nothing of when the window resets.
RATE_LIMIT_DEFAULT_WAIT = 60.0
# What clients turned away while a probe is under way are told to wait.
PROBE_WAIT = 1.0
# Refused repositories remembered at most.
_REMEMBERED = 16384


class State(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 2
    """5xx answers or connection failures in a row that open the breaker."""
    backoff: float = 1.0
    """How long it first stays open after failures; doubled by every failed probe."""
    max_backoff: float = 300.0
    refusal_backoff: float = 30.0
    """How long a repository the upstream refused (401, 403) is not asked again; doubled while
    the refusals go on, up to `max_backoff`."""


class Breaker:
    def __init__(self, upstream: str, config: BreakerConfig, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self._upstream = upstream
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self._failures = 0
        self._openings = 0
        self._until = 0.0
        self._probing = False
        self._rate_limited = False
        self._reason = ""

    def admit(self) -> bool:
        """Before a request: raise if it may not go; True if it is the half-open probe, whose
        caller must call `probe_ended` however it ends."""
        if self.state is State.CLOSED:
            return False
        now = self._clock()
        if self.state is State.OPEN and now >= self._until:
            self._change(State.HALF_OPEN)
        if self.state is State.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        wait = self._until - now if self.state is State.OPEN else PROBE_WAIT
        retry_after = str(max(1, math.ceil(wait)))
        if self._rate_limited:
            raise TooManyRequests(f"upstream {self._upstream} is rate-limiting the mirror; not asking it again "
                                  f"for {retry_after} s", retry_after)
        raise Unavailable(f"upstream {self._upstream} is failing ({self._reason}); not asking it again for "
                          f"{retry_after} s", retry_after)

    def probe_ended(self) -> None:
        """The probe is over; if it reported nothing (its caller was cancelled), the next
        request may probe instead."""
        self._probing = False

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        """The upstream answered with `status`."""
        if status == 429 or (status == 503 and "Retry-After" in headers):
            wait = _retry_after(headers.get("Retry-After") or headers.get("ratelimit-reset"))
            self._open(wait if wait is not None else self._backoff(), f"it answered {status}", status == 429)
        elif status in (500, 502, 503, 504):
            self.failed(f"it answered {status}")
        else:
            self._close()
            if headers.get("ratelimit-remaining", "").partition(";")[0].strip() == "0":
                wait = _retry_after(headers.get("ratelimit-reset") or headers.get("Retry-After"))
                self._open(RATE_LIMIT_DEFAULT_WAIT if wait is None else wait, "its pull limit is used up", True)

    def failed(self, reason: str) -> None:
        """No answer (a connection failure or a timeout), or a 5xx."""
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self._config.failures:
            self._open(self._backoff(), reason, False)

    def _backoff(self) -> float:
        return float(min(self._config.backoff * 2 ** min(self._openings, 32), self._config.max_backoff))

    def _open(self, wait: float, reason: str, rate_limited: bool) -> None:
        self._openings += 1
        self._until = self._clock() + min(wait, MAX_RETRY_AFTER)
        self._rate_limited = rate_limited
        self._reason = reason
        self._change(State.OPEN)
        log.warning("upstream %s: circuit open for %.1f s: %s", self._upstream, min(wait, MAX_RETRY_AFTER), reason)

    def _close(self) -> None:
        self._failures = 0
        if self.state is not State.CLOSED:
            self._openings = 0
            self._change(State.CLOSED)
            log.warning("upstream %s: circuit closed: it answers again", self._upstream)

    def _change(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)


class Refusals:
    """Repositories (scopes) the upstream refused lately: not asked again until their backoff
    ends, so a wrong password is not hammered into a locked account."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        # Bounded: an anonymous Docker Hub refuses every repository that does not exist.
        self._refused: LRUCache[str, tuple[float, int, UpstreamRefused]] = LRUCache(_REMEMBERED)

    def check(self, *scopes: str) -> None:
        """Raise the remembered refusal of any of `scopes` that is still backing off."""
        now = self._clock()
        for scope in scopes:
            if (entry := self._refused.get(scope)) is not None and now < entry[0]:
                error = entry[2]
                raise UpstreamRefused(error.message, {"retry_in_seconds": math.ceil(entry[0] - now)})

    def refused(self, scope: str, error: UpstreamRefused) -> None:
        count = self._refused[scope][1] + 1 if scope in self._refused else 0
        wait = min(self._config.refusal_backoff * 2 ** count, max(self._config.max_backoff,
                                                                  self._config.refusal_backoff))
        self._refused[scope] = (self._clock() + wait, count, error)
        log.error("%s; not asking again for %.0f s", error.message, wait)

    def allowed(self, scope: str) -> None:
        self._refused.pop(scope, None)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After (delta seconds or an HTTP date) or a rate-limit reset."""
    if not value:
        return None
    value = value.partition(";")[0].strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    # An HTTP date is wall-clock time; the breaker's clock need not be.
    return max(0.0, when.timestamp() - time.time())
