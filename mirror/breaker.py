"""Sparing an upstream while it fails: a circuit breaker per upstream, and a backoff per
repository for refusals. Nothing here knows HTTP clients; the upstream client asks before each
request (`admit`, which hands out a ticket) and reports how it went with that ticket.

The breaker:

    closed ──(429, a 503 with Retry-After, or ratelimit-remaining: 0)──> open until that time
    closed ──(a 5xx or a connection failure)──> suspect: closed, but one request at a time
    suspect ──(`failures` in a row)────────────> open for `backoff`
    suspect ──(an answer)──────────────────────> closed
    open ────(the wait is over)────────────────> half-open: the next request is the one probe
    half-open ──(the probe is answered)────────> closed
    half-open ──(the probe fails)──────────────> open again, the wait doubled (up to `max_backoff`)

While open, and for every request but the one in flight while suspect or half-open, nothing is
sent: the caller gets the error at once with the Retry-After its client should honour, and
serves stale what it has cached. Only answers to tickets of the current state count: a request
that was already under way when the state changed (a late 200 after a 429, the other 39
failures of a burst) cannot close the breaker again nor stretch its wait.
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
# Doublings of a backoff at most (the wait is capped long before; the exponent must be too).
_MAX_DOUBLINGS = 32


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


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted request: the state it was admitted in, and whether it is the one probe."""

    generation: int
    probe: bool


class Breaker:
    def __init__(self, upstream: str, config: BreakerConfig, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self._upstream = upstream
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self._generation = 0
        self._failures = 0
        self._openings = 0
        self._until = 0.0
        self._probing = False
        self._rate_limited = False
        self._reason = ""
        self.on_rate_limited: Callable[[float, str], None] | None = None
        """Told (seconds, reason) when this upstream starts rate-limiting: the other replicas
        hold off too."""

    def condition(self) -> tuple[str, str | None]:
        """`ok`, `degraded` (failing: not asked, or asked by one probe) or `rate-limited`, and why."""
        if self.state is State.CLOSED:
            return "ok", None
        return ("rate-limited" if self._rate_limited else "degraded"), self._reason

    def hold(self, wait: float, reason: str) -> None:
        """Another replica was rate-limited by this upstream for `wait` s: do not ask it either."""
        if self.state is State.OPEN and self._until >= self._clock() + wait:
            return
        self._open(wait, reason, True, told=True)

    def admit(self) -> Ticket:
        """Before a request: raise if it may not go. The caller must `release` the ticket
        however the request ends."""
        if self.state is State.OPEN and self._clock() >= self._until:
            self._change(State.HALF_OPEN)
        if self.state is State.CLOSED and self._failures == 0:
            return Ticket(self._generation, False)
        if self.state is not State.OPEN and not self._probing:
            # Suspect or half-open: one request finds out for all of them.
            self._probing = True
            return Ticket(self._generation, True)
        wait = self._until - self._clock() if self.state is State.OPEN else PROBE_WAIT
        retry_after = str(max(1, math.ceil(wait)))
        if self._rate_limited and self.state is State.OPEN:
            raise TooManyRequests(f"upstream {self._upstream} is rate-limiting the mirror; not asking it again "
                                  f"for {retry_after} s", retry_after)
        raise Unavailable(f"upstream {self._upstream} is failing ({self._reason}); not asking it again for "
                          f"{retry_after} s", retry_after)

    def release(self, ticket: Ticket) -> None:
        """The request is over; if it was the probe and reported nothing (its caller was
        cancelled), the next request may probe instead."""
        if ticket.probe and ticket.generation == self._generation:
            self._probing = False

    def answered(self, ticket: Ticket, status: int, headers: Mapping[str, str]) -> None:
        """The upstream answered `ticket`'s request with `status`."""
        if ticket.generation != self._generation:
            return
        exhausted = headers.get("ratelimit-remaining", "").partition(";")[0].strip() == "0"
        wait = _retry_after(headers.get("Retry-After")) or _retry_after(headers.get("ratelimit-reset"))
        if status == 429 or (status == 503 and wait is not None):
            if wait is None:
                wait = RATE_LIMIT_DEFAULT_WAIT if exhausted else self._backoff()
            self._open(wait, f"it answered {status}", status == 429)
        elif 500 <= status <= 599:
            self.failed(ticket, f"it answered {status}")
        else:
            self._close()
            if exhausted:
                self._open(RATE_LIMIT_DEFAULT_WAIT if wait is None else wait, "its pull limit is used up", True)

    def failed(self, ticket: Ticket, reason: str) -> None:
        """`ticket`'s request got no answer (a connection failure or a timeout), or a 5xx."""
        if ticket.generation != self._generation:
            return
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self._config.failures:
            self._open(self._backoff(), reason, False)
        else:
            self._reason = reason
            self._probing = False

    def _backoff(self) -> float:
        return float(min(self._config.backoff * 2 ** min(self._openings, _MAX_DOUBLINGS), self._config.max_backoff))

    def _open(self, wait: float, reason: str, rate_limited: bool, told: bool = False) -> None:
        wait = min(wait, MAX_RETRY_AFTER)
        self._openings += 1
        self._until = self._clock() + wait
        self._rate_limited = rate_limited
        self._reason = reason
        self._change(State.OPEN)
        log.warning("upstream %s: circuit open for %.1f s: %s", self._upstream, wait, reason)
        if rate_limited and not told and self.on_rate_limited is not None:
            self.on_rate_limited(wait, reason)

    def _close(self) -> None:
        self._failures = 0
        if self.state is not State.CLOSED:
            self._openings = 0
            self._change(State.CLOSED)
            log.warning("upstream %s: circuit closed: it answers again", self._upstream)
        self._probing = False

    def _change(self, state: State) -> None:
        """A new state, and a new generation: answers to requests admitted before do not count."""
        self._generation += 1
        self._probing = False
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
        self._refused: LRUCache[str, tuple[float, int, str, object]] = LRUCache(_REMEMBERED)

    def check(self, scope: str) -> None:
        """Raise the remembered refusal of `scope` while it is backing off."""
        entry = self._refused.get(scope)
        if entry is not None and self._clock() < entry[0]:
            until, _, message, detail = entry
            raise UpstreamRefused(message, {**(detail if isinstance(detail, dict) else {}),
                                            "retry_in_seconds": math.ceil(until - self._clock())})

    def refused(self, scope: str, error: UpstreamRefused) -> None:
        count = self._refused[scope][1] + 1 if scope in self._refused else 0
        wait = min(self._config.refusal_backoff * 2 ** min(count, _MAX_DOUBLINGS),
                   max(self._config.max_backoff, self._config.refusal_backoff))
        # The message and detail, not the error: a raised error holds every frame it went through.
        self._refused[scope] = (self._clock() + wait, count, error.message, error.detail)
        log.error("%s; not asking again for %.0f s", error.message, wait)

    def allowed(self, scope: str) -> None:
        self._refused.pop(scope, None)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After (delta seconds or an HTTP date) or a rate-limit reset."""
    if not value:
        return None
    value = value.partition(";")[0].strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    # An HTTP date is wall-clock time; the breaker's clock need not be.
    return max(0.0, when.timestamp() - time.time())
