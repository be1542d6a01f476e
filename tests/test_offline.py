"""An offline mirror (`mirror serve --offline`): what is cached is served, tags whatever their
age, not one packet reaches the configured upstream, and what it lacked is recorded for the
next image list (`mirror misses`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from mirror.config import load
from mirror.imagelist import load_list
from tests.conftest import Counting, MirrorFactory, Registry
from tests.support.pulls import ACCEPT
from tests.support.served import Served


async def test_offline_serves_the_cache_sends_nothing_upstream_and_records_misses(
        registry: Registry, counting: Counting, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = registry.images["single"]
    online = await make_mirror({"docker.io": counting.url}, cache_dir=cache, tag_ttl=1)
    paths = {f"/v2/alpine/manifests/{image.tag}": image.manifest,
             **{f"/v2/alpine/blobs/{d}": b for d, b in image.blobs.items()}}
    for path, expected in paths.items():
        async with client.get(f"{online.url}{path}", headers={"Accept": ACCEPT}) as response:
            assert (response.status, await response.read()) == (200, expected)
    await online.services.background.join()
    await online.server.close()

    counting.reset()
    # A TTL of 0: online, every request would revalidate the tag.
    config_file = tmp_path / "mirror.yaml"
    config_file.write_text(f"upstreams:\n  - {{name: docker.io, url: '{counting.url}', tag_ttl: 0}}\n")
    async with await Served.start("--config", config_file, "--cache-dir", cache, "--offline") as offline:
        # Offline, a tag is served as it is, whatever its age, without a question upstream.
        for path, expected in paths.items():
            async with client.get(f"{offline.url}{path}", headers={"Accept": ACCEPT}) as response:
                assert (response.status, await response.read()) == (200, expected), path
                assert response.headers["X-Mirror-Cache"] == "HIT"
        missing = {
            "/v2/busybox/manifests/1.36": ("MANIFEST_UNKNOWN", 404),
            "/v2/alpine/manifests/edge": ("MANIFEST_UNKNOWN", 404),
            f"/v2/alpine/blobs/sha256:{'0' * 64}": ("BLOB_UNKNOWN", 404),
        }
        for path, (code, status) in missing.items():
            for _ in range(2):
                async with client.get(f"{offline.url}{path}", headers={"Accept": ACCEPT}) as response:
                    error = (await response.json())["errors"][0]
                    assert (response.status, error["code"]) == (status, code), path
                    assert "offline" in error["message"] and error["detail"]["offline"] is True
        async with client.get(f"{offline.url}/v2/alpine/tags/list") as response:
            assert (await response.json())["tags"] == [image.tag], "tags come from the cache"
        async with client.get(f"{offline.url}/metrics") as response:
            metrics = await response.text()
        assert 'mirror_offline_misses_total{kind="manifest"}' in metrics
        assert counting.count() == 0, f"an offline mirror asked its upstream: {dict(counting.requests)}"

        listed = subprocess.run([sys.executable, "-m", "mirror", "misses", "--cache-dir", str(cache)],
                                capture_output=True, text=True, check=True).stdout
        as_json = json.loads(subprocess.run([sys.executable, "-m", "mirror", "misses", "--cache-dir", str(cache),
                                             "--json"], capture_output=True, text=True, check=True).stdout)
    assert {(m["name"], m["reference"], m["count"]) for m in as_json if m["kind"] == "manifest"} >= {
        ("library/busybox", "1.36", 2), ("library/alpine", "edge", 2)}
    # The misses are the next image list, as they are.
    config = load(None, environ={"MIRROR_UPSTREAMS": f"docker.io={registry.url}"})
    specs = load_list(listed, config)
    assert {str(spec) for spec in specs} == {"docker.io/library/busybox:1.36", "docker.io/library/alpine:edge"}


async def test_seed_from_misses_fetches_what_the_offline_mirror_lacked(
        registry: Registry, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    async with (await Served.start("--cache-dir", cache, "--upstream", "docker.io=http://127.0.0.1:9",
                                   "--offline") as offline,
                client.get(f"{offline.url}/v2/busybox/manifests/1.36", headers={"Accept": ACCEPT}) as response):
        assert response.status == 404
    # A route again: the cache's own misses are the list.
    run = subprocess.run([sys.executable, "-m", "mirror", "seed", "--from-misses", "--cache-dir", str(cache),
                          "--upstream", f"docker.io={registry.url}", "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    [result] = json.loads(run.stdout)
    assert (result["reference"], result["digest"]) == ("docker.io/library/busybox:1.36",
                                                       registry.images["docker"].digest)
    assert result["pinned"]
    listed = subprocess.run([sys.executable, "-m", "mirror", "misses", "--cache-dir", str(cache), "--json"],
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(listed) == [], "a miss seeding filled is a miss no more"
