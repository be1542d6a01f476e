"""The circuit breaker and the refusal backoff on their own, on a clock the test moves: the
races a burst of concurrent requests makes (late answers, a burst of failures), and odd input."""

from __future__ import annotations

import pytest

from mirror.breaker import Breaker, BreakerConfig, Refusals, State
from mirror.errors import TooManyRequests, Unavailable, UpstreamRefused
from tests.support.pulls import Clock


def breaker(clock: Clock, **config: float) -> Breaker:
    return Breaker("up", BreakerConfig(**config), clock)  # type: ignore[arg-type]


def test_a_late_answer_does_not_close_what_a_retry_after_opened() -> None:
    clock = Clock()
    b = breaker(clock)
    head, get = b.admit(), b.admit()
    b.answered(get, 429, {"Retry-After": "30"})
    b.answered(head, 200, {})  # admitted before the 429, answered after it
    assert b.state is State.OPEN
    with pytest.raises(TooManyRequests) as raised:
        b.admit()
    assert raised.value.retry_after == "30"


def test_a_burst_of_failures_opens_once_for_the_first_backoff() -> None:
    clock = Clock()
    b = breaker(clock, failures=2, backoff=1.0, max_backoff=300.0)
    burst = [b.admit() for _ in range(40)]
    for ticket in burst:
        b.failed(ticket, "500")
        b.release(ticket)
    assert b.state is State.OPEN
    with pytest.raises(Unavailable) as raised:
        b.admit()
    assert raised.value.retry_after == "1", "the 38 late failures neither doubled nor stretched the wait"


def test_after_a_failure_one_request_at_a_time_finds_out() -> None:
    clock = Clock()
    b = breaker(clock, failures=3)
    first = b.admit()
    b.failed(first, "502")
    b.release(first)
    probe = b.admit()
    assert probe.probe
    with pytest.raises(Unavailable) as raised:
        b.admit()
    assert raised.value.retry_after == "1"
    b.answered(probe, 200, {})
    b.release(probe)
    assert not b.admit().probe, "an answer ends the suspicion"


def test_a_cancelled_probe_lets_the_next_request_probe() -> None:
    clock = Clock()
    b = breaker(clock, failures=1)
    b.failed(b.admit(), "no answer")
    clock.advance(1)
    probe = b.admit()
    assert probe.probe and b.state is State.HALF_OPEN
    b.release(probe)  # its caller went away: it reported nothing
    assert b.admit().probe


@pytest.mark.parametrize("status", [500, 501, 507, 520, 524, 599])
def test_every_5xx_counts_as_a_failure(status: int) -> None:
    b = breaker(Clock(), failures=1)
    b.answered(b.admit(), status, {})
    assert b.state is State.OPEN


@pytest.mark.parametrize(("headers", "wait"), [
    ({"ratelimit-remaining": "0;w=21600"}, "60"),
    ({"ratelimit-remaining": "0;w=21600", "ratelimit-reset": "120"}, "120"),
    ({"Retry-After": "²"}, "1"),
    ({"Retry-After": "soon"}, "1"),
])
def test_a_429_waits_as_long_as_the_upstream_says(headers: dict[str, str], wait: str) -> None:
    b = breaker(Clock())
    b.answered(b.admit(), 429, headers)
    with pytest.raises(TooManyRequests) as raised:
        b.admit()
    assert raised.value.retry_after == wait


def test_a_used_up_pull_limit_closes_the_upstream_after_a_success() -> None:
    b = breaker(Clock())
    b.answered(b.admit(), 200, {"ratelimit-remaining": "0;w=21600", "ratelimit-reset": "90"})
    with pytest.raises(TooManyRequests) as raised:
        b.admit()
    assert raised.value.retry_after == "90"


def test_refusals_back_off_per_scope_and_never_overflow() -> None:
    clock = Clock()
    refusals = Refusals(BreakerConfig(refusal_backoff=30.0, max_backoff=300.0), clock)
    for _ in range(2000):
        refusals.refused("repository:a:pull", UpstreamRefused("refused"))
    with pytest.raises(UpstreamRefused) as raised:
        refusals.check("repository:a:pull")
    assert raised.value.detail == {"retry_in_seconds": 300}
    refusals.check("repository:b:pull")
    clock.advance(300)
    refusals.check("repository:a:pull")
