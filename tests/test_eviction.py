"""A cache with a disk budget: least recently used images go, whole; what another cached image
still uses stays; pinned images and blobs being read are never taken."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import aiohttp

from mirror.config import EvictionConfig
from mirror.oci import Digest
from tests.conftest import Mirror, MirrorFactory
from tests.support.fake_upstream import FakeUpstream
from tests.support.pulls import ACCEPT, Image, add_image, blob_url, manifest_url

KB = 1000


def layer(seed: int, size: int = 100 * KB) -> bytes:
    return random.Random(seed).randbytes(size)


async def pull(client: aiohttp.ClientSession, mirror: Mirror, name: str, digests: tuple[str, ...]) -> list[str]:
    """Pull an image's manifest and blobs; the X-Mirror-Cache of each response."""
    results = []
    async with client.get(manifest_url(mirror, name, "latest"), headers={"Accept": ACCEPT}) as response:
        assert response.status == 200
        results.append(response.headers["X-Mirror-Cache"])
    for digest in digests:
        async with client.get(blob_url(mirror, name, digest)) as response:
            assert response.status == 200
            await response.read()
            results.append(response.headers["X-Mirror-Cache"])
    await mirror.services.background.join()
    return results


def mirror_cli(*args: str, cache: Path) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "mirror", *args, "--cache-dir", str(cache)],
                            capture_output=True, text=True)
    return result.returncode, result.stdout or result.stderr


def three_images(fake: FakeUpstream) -> tuple[Image, Image, Image]:
    """team/a, team/b and team/c: a config and one 100 kB layer each."""
    a, b, c = (add_image(fake, f"team/{name}", layers=[layer(seed)], seed=seed) for seed, name in enumerate("abc", 1))
    return a, b, c


def cached(mirror: Mirror, digest: str) -> bool:
    path = mirror.services.store.local_path(Digest.parse(digest))
    return path is not None and path.exists()


async def test_least_recently_used_image_goes_first(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                    client: aiohttp.ClientSession) -> None:
    a, b, c = three_images(fake)
    now = [1.0]
    mirror = await make_mirror({"docker.io": fake.url}, clock=lambda: now[0],
                               eviction=EvictionConfig(max_size=300 * KB, high_watermark=0.9, low_watermark=0.8))
    await pull(client, mirror, "team/a", (a.config, *a.layers))
    now[0] = 2.0
    await pull(client, mirror, "team/b", (b.config, *b.layers))
    now[0] = 3.0
    assert set(await pull(client, mirror, "team/a", (a.config, *a.layers))) == {"HIT"}  # a is used again
    now[0] = 4.0
    await pull(client, mirror, "team/c", (c.config, *c.layers))  # over 270 kB: down to 240 kB

    assert not any(cached(mirror, d) for d in (b.digest, b.config, *b.layers)), "b, least recently used, went whole"
    assert all(cached(mirror, d) for d in (a.digest, a.config, *a.layers, c.digest, c.config, *c.layers))
    assert mirror.services.evictor.usage <= 240 * KB
    fake.requests.clear()
    assert set(await pull(client, mirror, "team/a", (a.config, *a.layers))) == {"HIT"}
    assert fake.count("GET") == 0
    assert set(await pull(client, mirror, "team/b", (b.config, *b.layers))) == {"MISS"}, "b comes back on demand"


async def test_a_layer_another_cached_image_uses_stays(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                       client: aiohttp.ClientSession) -> None:
    shared = layer(10)
    a = add_image(fake, "team/a", layers=[shared, layer(11)], seed=1)
    b = add_image(fake, "team/b", layers=[shared], seed=2)
    c = add_image(fake, "team/c", layers=[layer(12)], seed=3)
    now = [1.0]
    mirror = await make_mirror({"docker.io": fake.url}, clock=lambda: now[0],
                               eviction=EvictionConfig(max_size=280 * KB, high_watermark=0.9, low_watermark=0.8))
    for t, (name, image) in enumerate((("team/a", a), ("team/b", b), ("team/c", c)), start=1):
        now[0] = float(t)
        await pull(client, mirror, name, (image.config, *image.layers))

    assert not cached(mirror, a.digest) and not cached(mirror, a.layers[1]), "a, least recently used, went"
    assert cached(mirror, a.layers[0]), "the layer b still uses stayed"
    assert set(await pull(client, mirror, "team/b", (b.config, *b.layers))) == {"HIT"}


async def test_pinned_images_and_blobs_being_read_are_kept(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                           client: aiohttp.ClientSession) -> None:
    a, b, c = three_images(fake)
    now = [1.0]
    mirror = await make_mirror({"docker.io": fake.url}, clock=lambda: now[0],
                               eviction=EvictionConfig(max_size=250 * KB, high_watermark=0.9, low_watermark=0.5))
    await pull(client, mirror, "team/a", (a.config, *a.layers))
    assert mirror_cli("pin", "team/a:latest", cache=mirror.services.config.cache_dir) == (
        0, f"pinned docker.io/team/a {a.digest}\n")
    now[0] = 2.0
    await pull(client, mirror, "team/b", (b.config, *b.layers))
    mirror.services.evictor.reading(Digest.parse(b.layers[0]))  # a client is still reading b's layer
    now[0] = 3.0
    await pull(client, mirror, "team/c", (c.config, *c.layers))  # over 225 kB: as far towards 125 kB as allowed

    assert all(cached(mirror, d) for d in (a.digest, a.config, *a.layers)), "pinned: kept whatever its age"
    assert cached(mirror, b.layers[0]), "being read: kept"
    assert not cached(mirror, b.digest), "b's manifest was free to go"


async def test_pin_and_unpin_by_image_reference(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                client: aiohttp.ClientSession) -> None:
    a = add_image(fake, "library/a", layers=[layer(1)], seed=1)
    mirror = await make_mirror({"docker.io": fake.url})
    cache = mirror.services.config.cache_dir
    code, message = mirror_cli("pin", "a:latest", cache=cache)
    assert code == 1 and "docker.io/library/a:latest is not cached" in message
    await pull(client, mirror, "library/a", (a.config, *a.layers))
    for reference in ("a", "docker.io/library/a:latest", f"library/a@{a.digest}"):
        assert mirror_cli("pin", reference, cache=cache) == (0, f"pinned docker.io/library/a {a.digest}\n")
    assert mirror_cli("unpin", "a", cache=cache) == (0, f"unpinned docker.io/library/a {a.digest}\n")
    code, out = mirror_cli("pin", "a", "--json", cache=cache)
    assert (code, json.loads(out)) == (0, {"upstream": "docker.io", "name": "library/a", "digest": a.digest,
                                           "pinned": True})
    code, message = mirror_cli("pin", "quay.io/x/y:1", cache=cache)
    assert code == 2 and "not configured" in message


async def test_gc_evicts_now_and_dry_run_changes_nothing(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                         client: aiohttp.ClientSession) -> None:
    images = [add_image(fake, f"team/i{n}", layers=[layer(n)], seed=n) for n in range(3)]
    now = [1.0]
    mirror = await make_mirror({"docker.io": fake.url}, clock=lambda: now[0])  # no budget while serving
    for n, image in enumerate(images):
        now[0] = float(n + 1)
        await pull(client, mirror, f"team/i{n}", (image.config, *image.layers))
    cache = mirror.services.config.cache_dir
    code, message = mirror_cli("gc", "--max-size", "150kB", cache=cache)
    assert code == 1 and "another mirror process is using the cache" in message
    await mirror.server.close()

    code, out = mirror_cli("gc", "--max-size", "150kB", "--dry-run", "--json", cache=cache)
    dry = json.loads(out)
    assert code == 0 and dry["dry_run"] and dry["usage_after"] <= 120 * KB
    assert {e["digest"] for e in dry["evicted"]} == {images[0].digest, images[0].config, *images[0].layers,
                                                      images[1].digest, images[1].config, *images[1].layers}
    assert all((cache / "blobs" / "sha256" / d[7:9] / d[7:]).exists() for d in images[0].layers), "dry run"

    code, out = mirror_cli("gc", "--max-size", "150kB", "--json", cache=cache)
    done = json.loads(out)
    assert code == 0 and done["evicted"] == dry["evicted"]
    assert not any((cache / "blobs" / "sha256" / e["digest"][7:9] / e["digest"][7:]).exists() for e in done["evicted"])
    assert (cache / "blobs" / "sha256" / images[2].layers[0][7:9] / images[2].layers[0][7:]).exists()


async def test_content_unused_past_max_age_expires(fake: FakeUpstream, make_mirror: MirrorFactory,
                                                   client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """max_age counts from the last pull; an upstream without one keeps what it links."""
    a, b, c = three_images(fake)
    now = [0.0]
    mirror = await make_mirror({"docker.io": fake.url, "keep.test": fake.url}, clock=lambda: now[0],
                               max_ages={"docker.io": 100.0})
    await pull(client, mirror, "team/a", (a.config, *a.layers))
    await pull(client, mirror, "keep.test/team/c", (c.config, *c.layers))
    now[0] = 150.0
    await pull(client, mirror, "team/b", (b.config, *b.layers))

    expired = await mirror.services.evictor.expire({"docker.io": 100.0}, 200.0)
    assert {str(e.digest) for e in expired} == {a.digest, a.config, *a.layers}
    assert all(cached(mirror, d) for d in (b.digest, *b.layers, c.digest, *c.layers))
    await mirror.server.close()

    # The same through configuration and `mirror gc`, at the real time: b is old by now too.
    config = tmp_path / "mirror.yaml"
    config.write_text(f"""
upstreams:
  - {{name: docker.io, url: "{fake.url}", max_age: 100s}}
  - {{name: keep.test, url: "{fake.url}"}}
""")
    code, out = mirror_cli("gc", "--json", "--config", str(config), cache=mirror.services.config.cache_dir)
    assert code == 0, out
    assert {e["digest"] for e in json.loads(out)["evicted"]} == {b.digest, b.config, *b.layers}
    assert all(cached(mirror, d) for d in (c.digest, c.config, *c.layers)), "kept: keep.test has no max_age"
