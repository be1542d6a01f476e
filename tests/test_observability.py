"""What an operator watches: Prometheus metrics across a miss, a joined download, a hit, an
eviction and a rate limit; health endpoints that answer while the upstream is down; access log
lines; and no credential in any log line.

Metrics are recorded once a response's last byte is out. Each client below has a connection of
its own (limit 1), and a request on a keep-alive connection is read only after the previous one
is finished and recorded, so `settle` (one more request per client) orders the scrape after
every response the test has seen, without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.access import ACCESS_LOG
from mirror.config import EvictionConfig
from tests.conftest import Captured, Mirror, MirrorFactory
from tests.support.fake_upstream import FakeUpstream, Forced
from tests.support.pulls import ACCEPT, CACHE, NAME, TIMEOUT, Clock, add_image, blob_url, manifest_url

KiB = 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def clients() -> AsyncIterator[list[aiohttp.ClientSession]]:
    """Three clients, one keep-alive connection each."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(3)]
    yield sessions
    for session in sessions:
        await session.close()


async def settle(mirror: Mirror, *sessions: aiohttp.ClientSession) -> None:
    for session in sessions:
        async with asyncio.timeout(TIMEOUT), session.get(f"{mirror.url}/healthz") as response:
            assert response.status == 200


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with asyncio.timeout(TIMEOUT), session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str | None, bytes]:
    async with asyncio.timeout(TIMEOUT), session.get(url, headers=headers) as response:
        return response.status, response.headers.get(CACHE), await response.read()


async def test_metrics_follow_a_miss_a_joined_download_and_a_hit(
        fake: FakeUpstream, make_mirror: MirrorFactory, clients: list[aiohttp.ClientSession]) -> None:
    first, second, third = clients
    layer = random.Random(5).randbytes(512 * KiB)
    image = add_image(fake, layers=[layer])
    digest = image.layers[0]
    gate = asyncio.Event()
    fake.gates[digest] = (256 * KiB, gate)
    mirror = await make_mirror({"docker.io": fake.url})
    config_size = len(fake.blobs[image.config])

    assert (await get(first, manifest_url(mirror, NAME, "latest"), Accept=ACCEPT))[:2] == (200, "MISS")
    async with asyncio.timeout(TIMEOUT), first.get(blob_url(mirror, NAME, digest)) as leader:
        assert leader.headers[CACHE] == "MISS"
        received = await leader.content.readany()
        during = await scrape(third, mirror.url)
        assert value(during, "mirror_downloads_in_flight") == 1
        async with second.get(blob_url(mirror, NAME, digest)) as follower:
            assert follower.headers[CACHE] == "JOINED"
            gate.set()
            assert await follower.read() == layer
        received += await leader.read()
    assert received == layer
    await mirror.services.background.join()
    assert (await get(third, blob_url(mirror, NAME, digest)))[:2] == (200, "HIT")
    assert (await get(third, blob_url(mirror, NAME, image.config)))[:2] == (200, "MISS")
    await mirror.services.background.join()
    await settle(mirror, first, second, third)
    after = await scrape(third, mirror.url)

    assert value(after, "mirror_downloads_in_flight") == 0
    assert value(after, "mirror_cache_requests_total", kind="manifest", result="miss") == 1
    assert value(after, "mirror_cache_requests_total", kind="blob", result="miss") == 2
    assert value(after, "mirror_cache_requests_total", kind="blob", result="joined") == 1
    assert value(after, "mirror_cache_requests_total", kind="blob", result="hit") == 1
    assert value(after, "mirror_coalesced_requests_total", kind="blob") == 1
    # Bandwidth saved is one query: what was served from the cache cost no upstream byte.
    assert value(after, "mirror_served_bytes_total", source="upstream") == (
        len(image.manifest) + len(layer) + config_size)
    assert value(after, "mirror_served_bytes_total", source="cache") == 2 * len(layer)
    assert value(after, "mirror_upstream_bytes_total", upstream="docker.io") == (
        len(image.manifest) + len(layer) + config_size)
    assert value(after, "mirror_upstream_requests_total", upstream="docker.io", method="GET", status="200") == 3
    assert value(after, "mirror_upstream_request_duration_seconds_count", upstream="docker.io", method="GET") == 3
    assert value(after, "mirror_http_requests_total", route="blob", method="GET", status="200") == 4
    assert value(after, "mirror_http_requests_total", route="manifest", method="GET", status="200") == 1
    assert value(after, "mirror_http_request_duration_seconds_count", route="blob") == 4
    assert value(after, "mirror_cache_size_bytes") == len(image.manifest) + len(layer) + config_size
    assert value(after, "mirror_cache_blobs") == 3
    assert value(after, "mirror_build_info", version="0.1.0") == 1
    assert value(after, "process_resident_memory_bytes") > 0


async def test_cache_size_counts_a_manifest_once_however_often_it_is_fetched(
        fake: FakeUpstream, make_mirror: MirrorFactory, clients: list[aiohttp.ClientSession]) -> None:
    session = clients[0]
    image = add_image(fake, tag="latest")
    fake.add_manifest(NAME, "1.0", image.manifest, "application/vnd.oci.image.manifest.v1+json")
    mirror = await make_mirror({"docker.io": fake.url})
    for tag in ("latest", "1.0", "latest"):
        assert (await get(session, manifest_url(mirror, NAME, tag), Accept=ACCEPT))[0] == 200
    samples = await scrape(session, mirror.url)
    blobs, size = await mirror.services.index.usage()
    assert (value(samples, "mirror_cache_blobs"), value(samples, "mirror_cache_size_bytes")) == (blobs, size) == (
        1, len(image.manifest))


async def test_metrics_count_evictions(fake: FakeUpstream, make_mirror: MirrorFactory,
                                       clients: list[aiohttp.ClientSession]) -> None:
    session = clients[0]
    images = [add_image(fake, f"team/{n}", layers=[random.Random(n).randbytes(100_000)], seed=n) for n in range(3)]
    mirror = await make_mirror({"docker.io": fake.url},
                               eviction=EvictionConfig(max_size=300_000, high_watermark=0.9, low_watermark=0.8))
    assert value(await scrape(session, mirror.url), "mirror_cache_max_size_bytes") == 300_000
    for image in images:
        await get(session, manifest_url(mirror, image.name, "latest"), Accept=ACCEPT)
        for digest in (image.config, *image.layers):
            await get(session, blob_url(mirror, image.name, digest))
        await mirror.services.background.join()
    samples = await scrape(session, mirror.url)
    evicted = value(samples, "mirror_evicted_bytes_total", reason="size")
    assert value(samples, "mirror_evictions_total", reason="size") >= 3, "a whole image went"
    assert evicted >= 100_000
    assert value(samples, "mirror_cache_size_bytes") == mirror.services.evictor.usage <= 240_000
    total = sum(len(image.manifest) + len(fake.blobs[image.config]) + 100_000 for image in images)
    assert value(samples, "mirror_cache_size_bytes") + evicted == total


async def test_metrics_show_upstream_rate_limits(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                 clients: list[aiohttp.ClientSession]) -> None:
    session = clients[0]
    image = add_image(fake)
    path = f"/v2/{NAME}/manifests/latest"
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, clock=clock)
    fake.forced[path] = Forced(429, headers={"Retry-After": "7", "ratelimit-limit": "100;w=21600",
                                             "ratelimit-remaining": "0;w=21600"}, times=1)
    assert (await get(session, manifest_url(mirror, NAME, "latest"), Accept=ACCEPT))[0] == 429
    assert value(await scrape(session, mirror.url), "mirror_upstream_circuit_state", upstream="docker.io") == 2
    clock.advance(7)
    fake.forced[path] = Forced(200, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json",
                                             "Docker-Content-Digest": image.digest, "ratelimit-limit": "100;w=21600",
                                             "ratelimit-remaining": "76;w=21600"}, body=image.manifest, times=1)
    assert (await get(session, manifest_url(mirror, NAME, "latest"), Accept=ACCEPT))[0] == 200
    await settle(mirror, session)
    samples = await scrape(session, mirror.url)
    assert value(samples, "mirror_upstream_rate_limited_total", upstream="docker.io") == 1
    assert value(samples, "mirror_upstream_requests_total", upstream="docker.io", method="GET", status="429") == 1
    assert value(samples, "mirror_upstream_ratelimit_remaining", upstream="docker.io") == 76
    assert value(samples, "mirror_upstream_ratelimit_limit", upstream="docker.io") == 100
    assert value(samples, "mirror_http_requests_total", route="manifest", method="GET", status="429") == 1
    assert value(samples, "mirror_upstream_circuit_state", upstream="docker.io") == 0


async def test_health_answers_while_the_upstream_is_down_and_readiness_checks_the_cache(
        make_mirror: MirrorFactory, clients: list[aiohttp.ClientSession], tmp_path: Path) -> None:
    session = clients[0]
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9"}, cache_dir=tmp_path / "cache")

    async def probe(path: str) -> tuple[int, dict[str, Any]]:
        async with asyncio.timeout(TIMEOUT), session.get(f"{mirror.url}{path}") as response:
            return response.status, await response.json()

    assert await probe("/healthz") == (200, {"status": "ok"})
    assert await probe("/readyz") == (200, {"status": "ready"})
    assert (await get(session, manifest_url(mirror, NAME, "latest"), Accept=ACCEPT))[0] == 503  # upstream down

    shutil.rmtree(tmp_path / "cache" / "tmp")  # the cache can no longer take a download
    status, body = await probe("/readyz")
    assert status == 503 and set(body["problems"]) == {"cache"}
    (tmp_path / "cache" / "tmp").mkdir()
    mirror.services.draining = True
    status, body = await probe("/readyz")
    assert status == 503 and set(body["problems"]) == {"shutdown"}
    assert await probe("/healthz") == (200, {"status": "ok"})


async def test_access_log_has_one_line_per_request(
        fake: FakeUpstream, make_mirror: MirrorFactory, clients: list[aiohttp.ClientSession],
        captured: Captured) -> None:
    session = clients[0]
    image = add_image(fake, layers=[b"layer"])
    mirror = await make_mirror({"docker.io": fake.url})
    await get(session, manifest_url(mirror, NAME, "latest"), Accept=ACCEPT, **{"User-Agent": "test-client/1"})
    await get(session, blob_url(mirror, NAME, image.layers[0]))
    await get(session, f"{mirror.url}/v2/Bad_Name/manifests/latest")
    await settle(mirror, session)

    lines = captured.access()
    assert [(e["method"], e["path"], e["status"], e["cache"], e["upstream"]) for e in lines] == [
        ("GET", f"/v2/{NAME}/manifests/latest", 200, "MISS", "docker.io"),
        ("GET", f"/v2/{NAME}/blobs/{image.layers[0]}", 200, "MISS", "docker.io"),
        ("GET", "/v2/Bad_Name/manifests/latest", 400, None, None),
        ("GET", "/healthz", 200, None, None),
    ]
    assert [e["bytes"] for e in lines[:2]] == [len(image.manifest), len(b"layer")]
    assert lines[0]["user_agent"] == "test-client/1"
    assert all(isinstance(e["duration_seconds"], float) and e["remote"] == "127.0.0.1" for e in lines)
    text = [r.getMessage() for r in captured.records if r.name == ACCESS_LOG.name]
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - \[\d\d/\w{{3}}/\d{{4}}:\d\d:\d\d:\d\d \+0000\] "GET /v2/{NAME}/manifests/latest HTTP/1\.1" '
        rf'200 {len(image.manifest)} \d+\.\d{{3}}s cache=MISS upstream=docker\.io', text[0]), text[0]


async def test_no_credential_or_token_in_any_log_line(
        fake: FakeUpstream, make_mirror: MirrorFactory, clients: list[aiohttp.ClientSession],
        captured: Captured) -> None:
    session = clients[0]
    password, client_secret = "hunter2-upstream-PASSWORD", "client-s3cret"
    fake.auth = "bearer"
    fake.credentials = ("robot", password)
    image = add_image(fake, layers=[b"private layer"])
    good = await make_mirror({"docker.io": fake.url}, username="robot", password=password)
    wrong = await make_mirror({"docker.io": fake.url}, username="robot", password=f"{password}-old")
    client_auth = "Basic " + base64.b64encode(f"someone:{client_secret}".encode()).decode()

    statuses = []
    for mirror in (good, wrong):
        statuses.append((await get(session, manifest_url(mirror, NAME, "latest"), Accept=ACCEPT,
                                   Authorization=client_auth))[0])
        for digest in (image.config, *image.layers):
            statuses.append((await get(session, blob_url(mirror, NAME, digest), Authorization=client_auth))[0])
        await mirror.services.background.join()
        await settle(mirror, session)
    assert statuses == [200, 200, 200, 403, 403, 403], "the credentialed pull worked, the wrong password did not"

    tokens = set(fake._tokens)
    assert tokens, "the upstream issued tokens"
    secrets = {password, f"{password}-old", client_secret, client_auth, *tokens,
               aiohttp.encode_basic_auth("robot", password), base64.b64encode(f"robot:{password}".encode()).decode()}
    lines = list(captured.lines())
    assert len(lines) > 20 and any("401" in line for line in lines)
    leaks = [line for line in lines for secret in secrets if secret in line]
    assert not leaks, leaks
