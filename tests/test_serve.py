"""`mirror serve` as an orchestrator runs it: metrics and health on a listener of their own, JSON
logs, and SIGTERM, which lets responses under way finish for the grace period and never leaves a
partial blob in the cache."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.pulls import ACCEPT, NAME, TIMEOUT, add_image
from tests.support.registry import free_port
from tests.support.served import Served

MiB = 1 << 20


def cached_files(cache: Path) -> tuple[list[Path], list[Path]]:
    """(published blobs, temporary files) in a cache directory."""
    return sorted((cache / "blobs").rglob("*/*/*")), sorted((cache / "tmp").iterdir())


async def test_sigterm_cuts_a_download_that_outlasts_the_grace_and_publishes_nothing(
        fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(2 * MiB)
    digest = fake.add_blob(data)
    fake.gates[digest] = (MiB, asyncio.Event())  # the upstream stalls half way, for good
    cache = tmp_path / "cache"
    async with (await Served.start("--cache-dir", cache, "--upstream", f"docker.io={fake.url}",
                                   "--shutdown-grace", "1s") as served,
                asyncio.timeout(TIMEOUT), client.get(f"{served.url}/v2/{NAME}/blobs/{digest}") as response):
        assert response.status == 200
        received = await response.content.readany()
        assert await served.terminate() == 0
        with pytest.raises(aiohttp.ClientPayloadError):
            received += await response.read()
        await served.wait_for("shutting down: responses under way have 1s to finish")
    assert 0 < len(received) < len(data)
    assert cached_files(cache) == ([], []), "no partial blob, and no temporary file left behind"


async def test_sigterm_lets_a_response_under_way_finish_while_readiness_fails(
        fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    image = add_image(fake, layers=[random.Random(4).randbytes(2 * MiB)])
    layer = image.layers[0]
    gate = asyncio.Event()
    fake.gates[layer] = (MiB, gate)
    cache = tmp_path / "cache"
    ops = f"127.0.0.1:{free_port()}"
    async with await Served.start("--cache-dir", cache, "--upstream", f"docker.io={fake.url}", "--metrics-listen", ops,
                                  "--log-format", "json", "--shutdown-grace", "20s") as served:

        async def probe(url: str) -> tuple[int, bytes]:
            async with asyncio.timeout(TIMEOUT), client.get(url) as response:
                return response.status, await response.read()

        # Metrics and health live on their own listener, not beside the API.
        assert (await probe(f"http://{ops}/readyz"))[0] == 200
        assert (await probe(f"http://{ops}/healthz"))[0] == 200
        assert (await probe(f"{served.url}/metrics"))[0] == 404
        async with asyncio.timeout(TIMEOUT), client.get(f"{served.url}/v2/{NAME}/manifests/latest",
                                                        headers={"Accept": ACCEPT}) as response:
            assert await response.read() == image.manifest

        async with asyncio.timeout(TIMEOUT), client.get(f"{served.url}/v2/{NAME}/blobs/{layer}") as response:
            received = await response.content.readany()
            served.process.terminate()
            await served.wait_for("shutting down")
            status, body = await probe(f"http://{ops}/readyz")
            assert (status, json.loads(body)["problems"]) == (503, {"shutdown": "shutting down"})
            gate.set()
            received += await response.read()
        assert received == fake.blobs[layer], "the response under way finished, whole"
        assert await served.wait() == 0
        blobs, temporary = cached_files(cache)
        assert temporary == [] and [p.name for p in blobs if p.name == layer.removeprefix("sha256:")], (
            "the finished download was published")

    # Every line is a JSON object; the access lines carry the request's fields.
    entries = [json.loads(line) for line in served.log]
    access = [e for e in entries if e["logger"] == "mirror.access" and e["path"].startswith("/v2/")]
    assert [(e["path"], e["status"], e["cache"], e["upstream"]) for e in access] == [
        (f"/v2/{NAME}/manifests/latest", 200, "MISS", "docker.io"),
        (f"/v2/{NAME}/blobs/{layer}", 200, "MISS", "docker.io")]
    assert access[1]["bytes"] == len(fake.blobs[layer])
