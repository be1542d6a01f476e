"""An upstream in trouble, against the scriptable fake: the circuit breaker that spares it,
stale-while-revalidate, manifests that are not manifests, refusals of the mirror's credentials,
deletions, and remembered 404s.

Time is the mirror's injected clock, moved by the test: two seconds of traffic take no two
seconds here, and nothing sleeps to synchronise (`background.join()` waits for the mirror's own
work, an `asyncio.Event` holds the fake's answer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiohttp
import pytest

from mirror.oci import DOCKER_MANIFEST, OCI_MANIFEST, Digest
from tests.conftest import Mirror, MirrorFactory
from tests.support.fake_upstream import FakeUpstream, Forced
from tests.support.pulls import (
    ACCEPT,
    CACHE,
    NAME,
    OTHER,
    TIMEOUT,
    Clock,
    Fetched,
    add_image,
    fetch,
    manifest_url,
    pull_blob,
    pull_manifest,
)

FAILURES = {
    "429 with Retry-After": (Forced(429, {"Retry-After": "30"}), 1),
    "503 with Retry-After": (Forced(503, {"Retry-After": "30"}), 1),
    "ratelimit-remaining: 0": (Forced(429, {"ratelimit-remaining": "0;w=21600", "ratelimit-reset": "30"}), 1),
    "500": (Forced(500), 3),
    "502": (Forced(502), 3),
    "503": (Forced(503), 3),
    "connection closed unanswered": (Forced(0, drop=True), 3),
}


async def circuit_state(client: aiohttp.ClientSession, mirror: Mirror) -> float:
    """The upstream's breaker as /metrics shows it: 0 closed, 1 half-open, 2 open."""
    async with client.get(f"{mirror.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith('mirror_upstream_circuit_state{upstream="docker.io"}'):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no mirror_upstream_circuit_state for docker.io")


async def all_but_one_answered(requests: Sequence[asyncio.Future[Fetched]]) -> None:
    """Until every request but one (the one the fake holds) has its answer."""
    async with asyncio.timeout(TIMEOUT):
        while sum(r.done() for r in requests) < len(requests) - 1:
            await asyncio.wait([r for r in requests if not r.done()], return_when=asyncio.FIRST_COMPLETED)


async def settle(mirror: Mirror) -> None:
    async with asyncio.timeout(TIMEOUT):
        await mirror.services.background.join()


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_failing_upstream_is_asked_at_most_three_times_for_forty_requests(
        failure: str, fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    """40 requests over 2 s (cached tags past their TTL, uncached tags, uncached blobs) against
    an upstream failing one way: at most 3 upstream requests (1 while a Retry-After holds), the
    cached tag always served, the others refused at once with a Retry-After to honour."""
    forced, allowed = FAILURES[failure]
    image = add_image(fake, layers=[b"cached layer"])
    uncached = add_image(fake, OTHER, layers=[b"uncached layer"], seed=1)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=0.5, clock=clock)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    assert (await pull_blob(client, mirror, NAME, image.layers[0])).status == 200
    await settle(mirror)
    fake.requests.clear()

    fake.failing = forced
    retry_afters = []
    for n in range(40):
        kind = n % 3
        if kind == 0:
            served = await pull_manifest(client, mirror, NAME, "latest")
            assert (served.status, served.body) == (200, image.manifest)
            assert served.headers[CACHE] in ("STALE", "REVALIDATING", "HIT"), served.headers[CACHE]
        else:
            refused = await (pull_manifest(client, mirror, OTHER, "latest") if kind == 1
                             else pull_blob(client, mirror, OTHER, uncached.layers[0]))
            assert refused.status in (429, 503), refused.body
            assert refused.error_code() in ("TOOMANYREQUESTS", "UNAVAILABLE")
            if "Retry-After" in refused.headers:
                retry_afters.append(int(refused.headers["Retry-After"]))
        await settle(mirror)
        clock.advance(0.05)
    asked = sum(fake.requests.values())
    assert 1 <= asked <= allowed, dict(fake.requests)
    assert retry_afters and all(r >= 1 for r in retry_afters)
    if allowed == 1:
        # Counted down from the upstream's own 30 s.
        assert 28 <= retry_afters[-1] <= 30 < retry_afters[0] + 1
    assert any("circuit open" in r.getMessage() for r in caplog.records)
    assert await circuit_state(client, mirror) == 2, "open"

    # Once the wait is over and the upstream answers again: one probe closes the breaker.
    fake.failing = None
    clock.advance(31)
    assert (await pull_manifest(client, mirror, OTHER, "latest")).status == 200
    assert await circuit_state(client, mirror) == 0, "closed"
    assert any("circuit closed" in r.getMessage() for r in caplog.records)


async def test_the_breaker_backs_off_exponentially_with_one_probe_at_a_time(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    tags = [f"t{n}" for n in range(5)]
    for n, tag in enumerate(tags):
        add_image(fake, tag=tag, seed=n)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, clock=clock)
    fake.failing = Forced(500)
    # Two failures open it for 1 s; each failed probe doubles the wait: 2 s, 4 s.
    for _ in range(2):
        assert (await pull_manifest(client, mirror, NAME, "latest")).status == 503
    for wait in (1, 2, 4):
        refused = await pull_manifest(client, mirror, NAME, "latest")
        assert refused.status == 503 and refused.headers["Retry-After"] == str(wait)
        before = fake.count()
        clock.advance(wait)
        # The probe, and requests racing it: only the probe reaches the upstream.
        gate = asyncio.Event()
        fake.failing = Forced(500, gate=gate)
        racing = [asyncio.ensure_future(pull_manifest(client, mirror, NAME, tag)) for tag in tags]
        # The probe is held by the fake: every other request is answered meanwhile.
        await all_but_one_answered(racing)
        turned_away = [r.result() for r in racing if r.done()]
        gate.set()
        results = await asyncio.gather(*racing)
        assert fake.count() == before + 1, "one probe at a time"
        assert all(r.status == 503 for r in results)
        assert all(r.headers["Retry-After"] == "1" for r in turned_away)


async def test_a_stale_tag_is_served_at_once_while_a_hung_upstream_is_asked_once(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    image = add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    gate = asyncio.Event()
    path = f"/v2/{NAME}/manifests/latest"
    fake.held[path] = gate
    heads = fake.requests[("HEAD", path)]
    clock.advance(61)
    for _ in range(5):
        # Well inside the 5 s revalidation timeout: nothing waits for the hung upstream.
        async with asyncio.timeout(1):
            served = await pull_manifest(client, mirror, NAME, "latest")
        assert (served.status, served.body, served.headers[CACHE]) == (200, image.manifest, "REVALIDATING")
    gate.set()
    await settle(mirror)
    assert fake.requests[("HEAD", path)] == heads + 1, "one revalidation for all of them"
    fresh = await pull_manifest(client, mirror, NAME, "latest")
    assert fresh.headers[CACHE] == "HIT", "the revalidation restarted the TTL"


async def test_strict_freshness_waits_for_the_revalidation(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    old = add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock, stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    new = add_image(fake, seed=7)
    clock.advance(61)
    moved = await pull_manifest(client, mirror, NAME, "latest")
    assert (moved.body, moved.headers[CACHE]) == (new.manifest, "MISS")
    assert moved.body != old.manifest


@pytest.mark.parametrize(("body", "content_type"), [
    (b"\x89PNG not a manifest at all", OCI_MANIFEST),
    (b"[1, 2, 3]", OCI_MANIFEST),
    (b'{"schemaVersion": 1, "name": "team/app"}', DOCKER_MANIFEST),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}',
     DOCKER_MANIFEST),
    (b'{"schemaVersion": 2, "mediaType": "text/html"}', OCI_MANIFEST),
])
async def test_a_manifest_that_is_not_a_manifest_is_refused_and_not_cached(
        body: bytes, content_type: str, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession) -> None:
    image = add_image(fake)
    path = f"/v2/{NAME}/manifests/latest"
    fake.forced[path] = Forced(200, {"Content-Type": content_type}, body=body, times=2)
    mirror = await make_mirror({"docker.io": fake.url})
    for _ in range(2):
        refused = await pull_manifest(client, mirror, NAME, "latest")
        assert (refused.status, refused.error_code()) == (502, "MANIFEST_INVALID")
    assert fake.requests[("GET", path)] == 2, "nothing was cached: each request asked again"
    assert await mirror.services.store.size(Digest.of(body)) is None
    served = await pull_manifest(client, mirror, NAME, "latest")
    assert (served.status, served.body, served.headers[CACHE]) == (200, image.manifest, "MISS")


async def test_a_garbage_revalidation_leaves_the_cached_tag_served(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    image = add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock, stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    fake.forced[f"/v2/{NAME}/manifests/latest"] = Forced(200, {"Content-Type": OCI_MANIFEST}, body=b"garbage")
    clock.advance(61)
    stale = await pull_manifest(client, mirror, NAME, "latest")
    assert (stale.status, stale.body, stale.headers[CACHE]) == (200, image.manifest, "STALE")


async def test_an_upstream_that_refuses_the_mirror_is_an_outage_for_cached_tags(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    image = add_image(fake)
    add_image(fake, tag="uncached", seed=3)
    other = add_image(fake, OTHER, seed=4)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock, stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    fake.forced[f"/v2/{NAME}/manifests/latest"] = Forced(401, {"WWW-Authenticate": 'Basic realm="upstream"'})
    fake.forced[f"/v2/{NAME}/manifests/uncached"] = Forced(403)
    clock.advance(61)
    stale = await pull_manifest(client, mirror, NAME, "latest")
    assert (stale.status, stale.body, stale.headers[CACHE]) == (200, image.manifest, "STALE")
    assert any(r.levelno == logging.ERROR and "refused" in r.getMessage() for r in caplog.records), "logged loudly"

    # The refusal holds for the repository: no request of it reaches the upstream meanwhile,
    # and an uncached tag there is refused with a 403 (a 401 would ask the client to log in).
    before = fake.count()
    assert (await pull_manifest(client, mirror, NAME, "latest")).headers[CACHE] == "STALE"
    refused = await pull_manifest(client, mirror, NAME, "uncached")
    assert (refused.status, refused.error_code()) == (403, "DENIED")
    assert "WWW-Authenticate" not in refused.headers
    assert fake.count() == before
    # Another repository is not held back.
    assert (await pull_manifest(client, mirror, OTHER, "latest")).body == other.manifest

    # Once the backoff is over the upstream is asked again, and its answer counts.
    fake.forced.clear()
    clock.advance(61)
    assert (await pull_manifest(client, mirror, NAME, "latest")).headers[CACHE] == "REVALIDATED"
    assert (await pull_manifest(client, mirror, NAME, "uncached")).status == 200


async def test_on_refusal_deny_stops_serving_a_cached_tag(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock, on_refusal="deny")
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    fake.forced[f"/v2/{NAME}/manifests/latest"] = Forced(403)
    clock.advance(61)
    first = await pull_manifest(client, mirror, NAME, "latest")
    assert first.headers[CACHE] == "REVALIDATING"
    await settle(mirror)
    for _ in range(2):
        denied = await pull_manifest(client, mirror, NAME, "latest")
        assert (denied.status, denied.error_code()) == (403, "DENIED")


async def test_a_tag_deleted_upstream_is_dropped(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    image = add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock, stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    del fake.manifests[(NAME, "latest")]
    clock.advance(61)
    gone = await pull_manifest(client, mirror, NAME, "latest")
    assert (gone.status, gone.error_code()) == (404, "MANIFEST_UNKNOWN")
    assert await mirror.services.index.tag("docker.io", NAME, "latest") is None
    # The content itself is still there, by digest.
    assert (await pull_manifest(client, mirror, NAME, image.digest)).headers[CACHE] == "HIT"


async def test_an_upstream_404_is_remembered_for_negative_ttl(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, clock=clock, negative_ttl=30)
    path = f"/v2/{NAME}/manifests/next"
    for _ in range(10):
        missing = await pull_manifest(client, mirror, NAME, "next")
        assert (missing.status, missing.error_code()) == (404, "MANIFEST_UNKNOWN")
        clock.advance(1)
    assert fake.requests[("GET", path)] == 1
    image = add_image(fake, tag="next")
    assert (await pull_manifest(client, mirror, NAME, "next")).status == 404, "still remembered"
    clock.advance(21)
    found = await pull_manifest(client, mirror, NAME, "next")
    assert (found.status, found.body) == (200, image.manifest)
    assert fake.requests[("GET", path)] == 2


async def test_negative_ttl_zero_remembers_nothing(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": fake.url}, negative_ttl=0)
    for _ in range(3):
        assert (await pull_manifest(client, mirror, NAME, "next")).status == 404
    assert fake.requests[("GET", f"/v2/{NAME}/manifests/next")] == 3


async def test_head_of_a_stale_tag_is_served_too(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    image = add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=60, clock=clock)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    fake.failing = Forced(503, {"Retry-After": "30"})
    fake.requests.clear()
    clock.advance(61)
    results = []
    for _ in range(3):
        head: Fetched = await fetch(client, manifest_url(mirror, NAME, "latest"), "HEAD", {"Accept": ACCEPT})
        assert head.status == 200 and head.headers["Docker-Content-Digest"] == image.digest
        results.append(head.headers[CACHE])
        await settle(mirror)
    assert results == ["REVALIDATING", "STALE", "STALE"]
    assert fake.count() == 1


async def test_once_a_request_failed_concurrent_requests_send_one_at_a_time(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """40 clients at once, for 40 different uncached tags, just after one failure: one of them
    goes upstream (held there), the 39 others are answered at once, and the breaker opens when
    that one fails too. A burst of late failures does not stretch the wait."""
    tags = [f"t{n}" for n in range(40)]
    for n, tag in enumerate(tags):
        add_image(fake, tag=tag, seed=n)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, clock=clock)
    gate = asyncio.Event()
    fake.failing = Forced(500, gate=gate)
    first = asyncio.ensure_future(pull_manifest(client, mirror, NAME, "latest"))
    gate.set()
    assert (await first).status == 503
    gate.clear()
    burst = [asyncio.ensure_future(pull_manifest(client, mirror, NAME, tag)) for tag in tags]
    await all_but_one_answered(burst)
    gate.set()
    results = await asyncio.gather(*burst)
    assert all(r.status == 503 for r in results)
    assert fake.count() == 2, dict(fake.requests)
    refused = await pull_manifest(client, mirror, NAME, "t0")
    assert refused.headers["Retry-After"] == "1", "open for the first backoff, not doubled by the burst"
