"""What the mirror remembers about its cache: sizes, references and access times that survive
a restart, reconciled with the files at start-up, and listed by `mirror ls`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

from mirror.index import SqliteIndex, TagRecord, cached_images
from mirror.oci import Digest
from tests.conftest import Counting, Mirror, MirrorFactory, Registry
from tests.support.images import PushedImage

ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


async def pull(client: aiohttp.ClientSession, mirror: Mirror, image: PushedImage) -> None:
    """Manifest, then every blob of it, as a client pulling the image would."""
    for child in [image, *image.children]:
        async with client.get(f"{mirror.url}/v2/{image.name}/manifests/{child.tag if child is image else child.digest}",
                              headers={"Accept": ACCEPT}) as response:
            assert response.status == 200
    for digest, data in image.blobs.items():
        async with client.get(f"{mirror.url}/v2/{image.name}/blobs/{digest}") as response:
            assert await response.read() == data
    await mirror.services.background.join()


def image_size(image: PushedImage) -> int:
    return len(image.manifest) + sum(len(c.manifest) for c in image.children) + sum(map(len, image.blobs.values()))


async def test_ls_lists_cached_tags_with_their_size(make_mirror: MirrorFactory, registry: Registry,
                                                    counting: Counting, client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    single, index = registry.images["single"], registry.images["index"]
    await pull(client, mirror, single)
    await pull(client, mirror, index)
    await mirror.server.close()
    cache = mirror.services.config.cache_dir

    listed = {(i.name, i.tag): i for i in cached_images(cache / "index.db")}
    assert set(listed) == {("library/alpine", "3.19"), ("library/multi", "1.0")}
    alpine, multi = listed[("library/alpine", "3.19")], listed[("library/multi", "1.0")]
    assert (alpine.digest, alpine.size, alpine.blobs) == (single.digest, image_size(single), 1 + len(single.blobs))
    assert (multi.digest, multi.size) == (index.digest, image_size(index))
    assert multi.blobs == 1 + len(index.children) + len(index.blobs)

    out = subprocess.run([sys.executable, "-m", "mirror", "ls", "--json", "--cache-dir", str(cache)],
                         capture_output=True, text=True, check=True).stdout
    assert {(e["name"], e["tag"], e["size"], e["pinned"]) for e in json.loads(out)} == {
        ("library/alpine", "3.19", image_size(single), False), ("library/multi", "1.0", image_size(index), False)}
    table = subprocess.run([sys.executable, "-m", "mirror", "ls", "--cache-dir", str(cache)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "BLOBS", "LAST", "PULLED", "PINNED"]
    assert table[1].startswith("docker.io/library/alpine") and "3.19" in table[1]


def test_ls_on_an_empty_cache(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mirror", "ls", "--json", "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


async def test_access_times_are_batched_and_survive_restart(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    image = registry.images["docker"]
    now = [1000.0]
    mirror = await make_mirror({"docker.io": counting.url}, clock=lambda: now[0])
    await pull(client, mirror, image)
    database = mirror.services.config.cache_dir / "index.db"

    def last_access() -> dict[str, float]:
        with sqlite3.connect(database) as db:
            return dict(db.execute("SELECT digest, last_access FROM blobs").fetchall())
    assert set(last_access().values()) == {1000.0}

    now[0] = 2000.0
    digest = next(iter(image.blobs))
    async with client.get(f"{mirror.url}/v2/{image.name}/blobs/{digest}") as response:
        assert response.headers["X-Mirror-Cache"] == "HIT"
    assert last_access()[digest] == 1000.0, "a hit writes nothing to disk by itself"
    await mirror.services.index.flush_access()
    assert last_access()[digest] == 2000.0


async def test_startup_reconciles_the_index_with_the_files(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    """A crash can fall between publishing a file and recording it, or a file can vanish: the
    next start-up makes the index match the files, and serving goes on."""
    image = registry.images["single"]
    mirror = await make_mirror({"docker.io": counting.url})
    await pull(client, mirror, image)
    await mirror.server.close()
    cache = mirror.services.config.cache_dir
    unrecorded, vanished = list(image.blobs)[:2]
    with sqlite3.connect(cache / "index.db") as db:
        db.execute("DELETE FROM blobs WHERE digest = ?", (unrecorded,))
    vanishing = mirror.services.store.local_path(Digest.parse(vanished))
    assert vanishing is not None
    vanishing.unlink()

    restarted = await make_mirror({"docker.io": counting.url}, cache_dir=cache)
    files = 1 + len(image.blobs) - 1  # the manifest and the blobs, less the one that vanished
    assert await restarted.services.index.usage() == (files, image_size(image) - len(image.blobs[vanished]))
    counting.reset()
    async with client.get(f"{restarted.url}/v2/{image.name}/blobs/{unrecorded}") as response:
        assert (response.headers["X-Mirror-Cache"], await response.read()) == ("HIT", image.blobs[unrecorded])
    async with client.get(f"{restarted.url}/v2/{image.name}/blobs/{vanished}") as response:
        assert (response.headers["X-Mirror-Cache"], await response.read()) == ("MISS", image.blobs[vanished])
    assert counting.count("GET", "blobs") == 1


async def test_a_tag_read_that_races_its_removal_is_not_remembered(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.db")
    await index.open()
    try:
        digest = Digest.of(b"manifest")
        await index.set_tag("docker.io", "library/alpine", "3.19", TagRecord(digest, 1.0))
        reading = asyncio.create_task(index.tag("docker.io", "library/alpine", "3.19"))
        await asyncio.sleep(0)  # the read is queued on the database thread, ahead of the removal
        await index.drop_tag("docker.io", "library/alpine", "3.19")
        assert (await reading) == TagRecord(digest, 1.0), "the read saw the row before it went"
        assert await index.tag("docker.io", "library/alpine", "3.19") is None, "and did not bring it back"
        await index.set_tag("docker.io", "library/alpine", "3.19", TagRecord(digest, 2.0))
        assert await index.tag("docker.io", "library/alpine", "3.19") == TagRecord(digest, 2.0)
    finally:
        await index.close()
