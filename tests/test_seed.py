"""`mirror seed`: an image list fetched from the real registry into a cache directory, through
the same downloads as client traffic, pinned, reported per reference; a second run fetches
nothing; --dry-run fetches no blob; a bad list is refused before anything is fetched."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Counting, Registry
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import push_image, random_layer
from tests.support.pulls import NAME, add_image
from tests.support.served import Served


def mirror_command(*args: str | Path, upstream: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *map(str, args), "--upstream", f"docker.io={upstream}"],
                          capture_output=True, text=True, timeout=120, check=False)


def pinned(cache: Path) -> set[str]:
    db = sqlite3.connect(cache / "index.db")
    try:
        return {row[0] for row in db.execute("SELECT digest FROM blobs WHERE pinned = 1")}
    finally:
        db.close()


def stored(cache: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (cache / "blobs" / "sha256").glob("*/*")}


async def test_seed_fetches_pins_and_reports_every_listed_image(
        registry: Registry, counting: Counting, tmp_path: Path) -> None:
    for tag in ("1.0.0", "1.2.0", "2.0.0-rc1", "2.1.0"):
        await asyncio.to_thread(push_image, registry.url, "library/filtered", tag,
                                layers=[random_layer(2048, sum(map(ord, tag)))])
    single, index, docker_list = registry.images["single"], registry.images["index"], registry.images["list"]
    amd64_digest = next(d["digest"] for d in json.loads(index.manifest)["manifests"]
                        if d["platform"]["architecture"] == "amd64")
    amd64 = next(c for c in index.children if c.digest == amd64_digest)
    listing = tmp_path / "images.yaml"
    listing.write_text(f"""
images:
  - alpine:3.19
  - ref: multi:1.0
    platforms: [linux/amd64, linux/s390x]
  - dockerlist:1.0
  - busybox@{registry.images["docker"].digest}
  - repository: filtered
    tags: {{semver: ">=1.1.0, <3.0.0", deny: ["-rc"]}}
""")
    cache = tmp_path / "cache"
    run = await asyncio.to_thread(mirror_command, "seed", "-f", listing, "--cache-dir", cache, "--json",
                                  upstream=counting.url)
    assert run.returncode == 0, run.stderr
    results: list[dict[str, Any]] = json.loads(run.stdout)
    by_reference = {r["reference"]: r for r in results}
    assert set(by_reference) == {"docker.io/library/alpine:3.19", "docker.io/library/multi:1.0",
                                 "docker.io/library/dockerlist:1.0",
                                 f"docker.io/library/busybox@{registry.images['docker'].digest}",
                                 "docker.io/library/filtered:1.2.0", "docker.io/library/filtered:2.1.0"}
    multi = by_reference["docker.io/library/multi:1.0"]
    assert multi["digest"] == index.digest
    assert (multi["platforms_present"], multi["platforms_missing"]) == (["linux/amd64"], ["linux/s390x"])
    assert multi["manifests"] == [index.digest, amd64.digest], "a sparse index: the index itself and one child"
    assert set(multi["blobs"]) == set(amd64.blobs)
    listed = by_reference["docker.io/library/dockerlist:1.0"]
    assert (listed["digest"], listed["platforms_present"]) == (docker_list.digest, ["linux/amd64", "linux/arm64"])
    assert by_reference["docker.io/library/alpine:3.19"]["bytes_fetched"] == sum(map(len, single.blobs.values()))

    # Everything listed is in the store, whole, and pinned; the platform not asked for is not.
    other = next(c for c in index.children if c.digest != amd64.digest)
    everything = {d for r in results for d in (*r["manifests"], *r["blobs"])}
    assert everything <= stored(cache)
    assert other.digest not in stored(cache) and not set(other.blobs) & stored(cache)
    assert {d for r in results for d in r["manifests"]} <= pinned(cache)

    # Again: nothing is fetched, every byte was already there.
    counting.reset()
    again = await asyncio.to_thread(mirror_command, "seed", "-f", listing, "--cache-dir", cache, "--json",
                                    upstream=counting.url)
    assert again.returncode == 0, again.stderr
    assert all(r["bytes_fetched"] == 0 and r["bytes_cached"] > 0 for r in json.loads(again.stdout))
    assert counting.count("GET", "blobs") == 0


async def test_seed_dry_run_fetches_no_blob_and_pins_nothing(
        registry: Registry, counting: Counting, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = await asyncio.to_thread(mirror_command, "seed", "alpine:3.19", "multi:1.0", "--dry-run",
                                  "--cache-dir", cache, upstream=counting.url)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("resolved docker.io/library/") == 2
    assert registry.images["index"].digest in run.stdout
    assert counting.count("GET", "blobs") == 0
    assert pinned(cache) == set()


async def test_seed_reports_what_failed_and_does_the_rest(
        registry: Registry, counting: Counting, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = await asyncio.to_thread(mirror_command, "seed", "alpine:3.19", "alpine:no-such-tag", "--cache-dir", cache,
                                  upstream=counting.url)
    assert run.returncode == 1
    assert "seeded docker.io/library/alpine:3.19" in run.stdout
    assert "failed docker.io/library/alpine:no-such-tag" in run.stderr


async def test_a_bad_list_is_refused_before_anything_is_fetched(counting: Counting, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("alpine:3.19\nquay.io/prometheus/prometheus:v2\n")
    run = await asyncio.to_thread(mirror_command, "seed", "-f", listing, "--cache-dir", tmp_path / "cache",
                                  upstream=counting.url)
    assert run.returncode == 2
    assert "line 2: registry 'quay.io' is not a configured upstream" in run.stderr
    assert counting.count() == 0


async def test_ctrl_c_keeps_what_was_whole_and_the_same_command_finishes(
        fake: FakeUpstream, tmp_path: Path) -> None:
    layers = [random.Random(n).randbytes(256 * 1024) for n in range(3)]
    image = add_image(fake, NAME, layers=layers)
    held = asyncio.Event()
    fake.gates[image.layers[2]] = (128 * 1024, held)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "mirror", "seed", f"{NAME}:latest", "--cache-dir", str(cache),
               "--upstream", f"docker.io={fake.url}"]
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    def half_way() -> bool:
        held_hex = image.layers[2].removeprefix("sha256:")
        return any(p.stat().st_size >= 128 * 1024 for p in (cache / "tmp").glob(f"{held_hex}.*.part"))

    async with asyncio.timeout(60):
        # Interrupted while the last layer is held half-way: its temp file holds what came so far.
        while not half_way():
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, err = await process.communicate()
    assert process.returncode == 130, err.decode()[-2000:]
    assert "run the same command again" in err.decode()
    assert stored(cache) == {image.digest, image.config, *image.layers[:2]}, "only whole blobs, nothing partial"
    held.set()
    before = fake.count("GET", "blobs")
    run = await asyncio.to_thread(mirror_command, "seed", f"{NAME}:latest", "--cache-dir", cache, "--json",
                                  upstream=fake.url)
    assert run.returncode == 0, run.stderr
    assert stored(cache) >= {image.digest, image.config, *image.layers}
    assert fake.count("GET", "blobs") == before + 1, "only the interrupted layer was fetched again"


async def test_seed_prewarms_a_running_mirror_through_its_api(
        registry: Registry, counting: Counting, tmp_path: Path, client: aiohttp.ClientSession) -> None:
    single = registry.images["single"]
    async with await Served.start("--cache-dir", tmp_path / "cache", "--upstream",
                                  f"docker.io={counting.url}") as served:
        run = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "mirror", "seed", "--server", served.url, "alpine:3.19", "multi:1.0", "--json"],
            capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr
        results = {r["reference"]: r for r in json.loads(run.stdout)}
        assert results["docker.io/library/alpine:3.19"]["digest"] == single.digest
        assert results["docker.io/library/alpine:3.19"]["bytes_fetched"] == sum(map(len, single.blobs.values()))
        assert not results["docker.io/library/alpine:3.19"]["pinned"], "no admin API yet: cached, not pinned"
        fetched = counting.count("GET", "blobs")
        assert fetched == len(single.blobs) + len(registry.images["index"].blobs)
        # Warm now: a client's pull never reaches the upstream.
        counting.reset()
        for digest, data in single.blobs.items():
            async with client.get(f"{served.url}/v2/library/alpine/blobs/{digest}") as response:
                assert (response.status, await response.read(), response.headers["X-Mirror-Cache"]) == (
                    200, data, "HIT")
        assert counting.count("GET", "blobs") == 0


def test_seed_against_a_mirror_that_does_not_answer_says_so(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "mirror", "seed", "--server", "http://127.0.0.1:9", "alpine:3.19"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1
    assert "failed docker.io/library/alpine:3.19" in run.stderr and "Traceback" not in run.stderr, run.stderr
