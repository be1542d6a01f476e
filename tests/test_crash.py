"""Crash safety and a full disk, as an operator meets them.

1. `mirror serve`, a real process, is killed with SIGKILL at chosen moments of concurrent pulls
   (fills held by the upstream at known byte offsets, the instant a new manifest or a whole
   layer reaches a client, a race against running downloads) and restarted on the same cache
   each time. After every kill it must start, sweep its temp files, hold only blob files that
   match their digests, serve everything its index names, and serve everything a client had
   completely received as a hit without asking the upstream.
2. A fill that runs out of disk (a real 8 MiB tmpfs, and ENOSPC injected into the store's
   writes, which runs everywhere) fails that fill only: clients never get the whole body,
   nothing is published, the temp file goes, cached content is still served, and once space is
   freed the same blob is pulled whole. A disk that refuses a single write ends the fill there,
   put down to the disk: the upstream is not asked again, and no client is sent a wrong byte.

Nothing sleeps to synchronise: kills wait on bytes having reached a client (the pass-through
holds a blob at an offset, and the mirror never gives a client more than it has on disk),
restarts wait on the "listening on" log line, fills on `background.join()`, and every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import json
import logging
import os
import random
import sqlite3
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import mirror.spool
from mirror.oci import MANIFEST_MEDIA_TYPES, Digest
from tests.conftest import Counting, MirrorFactory, Registry
from tests.support.disks import mount_tmpfs, unmount
from tests.support.images import (
    PushedImage,
    digest_of,
    push_index,
    push_raw_image,
)
from tests.support.passthrough import Passthrough, passthrough
from tests.support.pulls import Clock
from tests.support.served import Served
from tests.support.skopeo import copy

MiB = 1 << 20
TIMEOUT = 30.0
"""Upper bound for any single wait: a regression fails instead of hanging the run."""
ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
CACHE = "X-Mirror-Cache"
UPSTREAM = "docker.io"
BIG = "crash/big"
BIG_SIZES = (8 * MiB, 16 * MiB, 24 * MiB, 32 * MiB)


# Content the upstream holds, and what the test expects back byte for byte.


@dataclass
class Catalogue:
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    """digest -> (body, media type)"""
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    """(name, tag) -> digest"""

    def add(self, image: PushedImage) -> None:
        self.manifests[image.digest] = (image.manifest, image.media_type)
        if image.tag != image.digest:
            self.tags[(image.name, image.tag)] = image.digest
        self.blobs.update(image.blobs)
        for child in image.children:
            self.add(child)


def blob_digests(image: PushedImage) -> list[str]:
    """Config and layers, in manifest order (the union over children for an index)."""
    found: list[str] = []
    for single in image.children or [image]:
        document = json.loads(single.manifest)
        found += [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]
    return found


# The cache as it lies on disk.


def blob_path(cache: Path, digest: str) -> Path:
    hex_digest = digest.removeprefix("sha256:")
    return cache / "blobs" / "sha256" / hex_digest[:2] / hex_digest


def blob_files(cache: Path) -> dict[str, Path]:
    """Every file in the blob tree by digest, each checked to be whole: its sha256 is its name,
    and it sits where the layout says."""
    found: dict[str, Path] = {}
    for path in sorted((cache / "blobs").rglob("*")):
        if path.is_dir():
            continue
        digest = "sha256:" + path.name
        assert path == blob_path(cache, digest), f"stray file in the blob tree: {path}"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == path.name, f"{path} holds content whose sha256 is {actual}"
        found[digest] = path
    return found


def temp_files(cache: Path) -> list[Path]:
    return sorted((cache / "tmp").iterdir())


@dataclass
class IndexRows:
    manifests: dict[str, str]
    tags: dict[tuple[str, str, str], str]
    links: set[tuple[str, str, str]]
    blobs: dict[str, int]


def read_index(cache: Path) -> IndexRows:
    db = sqlite3.connect(f"file:{cache / 'index.db'}?mode=ro", uri=True)
    try:
        return IndexRows(
            manifests={d: t for d, t in db.execute("SELECT digest, media_type FROM manifests")},
            tags={(u, n, t): d for u, n, t, d in db.execute("SELECT upstream, name, tag, digest FROM tags")},
            links=set(db.execute("SELECT upstream, name, digest FROM links")),
            blobs={d: size for d, size in db.execute("SELECT digest, size FROM blobs")},
        )
    finally:
        db.close()


# Clients pulling through the mirror, and what they have received.


@dataclass
class Received:
    """What clients got from one run of the mirror: progress, and what was complete."""

    bytes: Counter[str] = field(default_factory=Counter)
    """digest -> the most bytes of its body any one client has received"""
    headers: set[str] = field(default_factory=set)
    """blob digests whose response headers reached a client"""
    blobs: set[tuple[str, str]] = field(default_factory=set)
    """(name, digest): whole body received and checked against its digest"""
    manifests: set[tuple[str, str, str]] = field(default_factory=set)
    """(name, reference, digest): whole manifest received and checked"""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def until(self, ready: Callable[[], bool], what: str, tasks: list[asyncio.Task[None]]) -> None:
        """Wait until `ready()`. A client that fails meanwhile (the mirror is still up) fails
        the test at once, as does every client having finished first."""
        try:
            async with asyncio.timeout(TIMEOUT):
                while not ready():
                    for task in tasks:
                        error = task.exception() if task.done() and not task.cancelled() else None
                        if error is not None:
                            raise error
                    running = [task for task in tasks if not task.done()]
                    if not running:
                        pytest.fail(f"every client finished before {what}")
                    changed = asyncio.ensure_future(self.changed.wait())
                    await asyncio.wait([changed, *running], return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}; received {dict(self.bytes)}")


async def get_manifest(session: aiohttp.ClientSession, base: str, name: str, reference: str,
                       catalogue: Catalogue, received: Received) -> None:
    async with session.get(f"{base}/v2/{name}/manifests/{reference}", headers={"Accept": ACCEPT}) as response:
        body = await response.read()
    assert response.status == 200, f"{name}:{reference} -> {response.status} {body[:300]!r}"
    expected = reference if reference.startswith("sha256:") else catalogue.tags[(name, reference)]
    assert response.headers["Docker-Content-Digest"] == expected
    assert body == catalogue.manifests[expected][0], f"wrong bytes for manifest {name}@{expected}"
    received.manifests.add((name, reference, expected))
    received.notify()


async def get_blob(session: aiohttp.ClientSession, base: str, name: str, digest: str, expected: bytes,
                   received: Received) -> None:
    async with session.get(f"{base}/v2/{name}/blobs/{digest}") as response:
        assert response.status == 200, f"{name}@{digest} -> {response.status} {await response.read()!r}"
        received.headers.add(digest)
        received.notify()
        got = 0
        async for chunk in response.content.iter_any():
            # Even a body that will be cut short must be the blob's own bytes, up to the cut.
            wrong = first_difference(expected, chunk, got)
            assert wrong is None, f"{name}@{digest}: a client was sent wrong bytes from offset {wrong}"
            got += len(chunk)
            if got > received.bytes[digest]:
                received.bytes[digest] = got
                received.notify()
    # The body ended where Content-Length said (aiohttp raises on a short one): it must be whole.
    assert got == response.content_length == len(expected), f"{name}@{digest}: {got} of {len(expected)} bytes"
    received.blobs.add((name, digest))
    received.notify()


async def pull(session: aiohttp.ClientSession, base: str, image: PushedImage, catalogue: Catalogue,
               received: Received) -> None:
    """What a runtime does: the tag, the platform manifests, then every blob at once."""
    await get_manifest(session, base, image.name, image.tag, catalogue, received)
    for child in image.children:
        await get_manifest(session, base, child.name, child.digest, catalogue, received)
    async with asyncio.TaskGroup() as group:
        for digest in dict.fromkeys(blob_digests(image)):
            group.create_task(get_blob(session, base, image.name, digest, catalogue.blobs[digest], received))


def first_difference(expected: bytes, got: bytes, offset: int) -> int | None:
    """Where `got`, received at `offset`, first differs from `expected` (None: it does not)."""
    if expected[offset:offset + len(got)] == got:
        return None
    return offset + next((i for i, (a, b) in enumerate(zip(expected[offset:], got, strict=False)) if a != b),
                         min(len(got), len(expected) - offset))


def cut_by_the_kill(error: BaseException) -> bool:
    """An error a client may see because the mirror died under it, and nothing else."""
    if isinstance(error, BaseExceptionGroup):
        return all(cut_by_the_kill(e) for e in error.exceptions)
    return isinstance(error, aiohttp.ClientError | ConnectionError | asyncio.CancelledError)


# The kill points.


@dataclass(frozen=True)
class KillPoint:
    what: str
    when: Callable[[Received, PushedImage, list[tuple[str, int]]], bool]
    """Kill once this holds, given what clients received, the round's new image, and the big
    layers that were not cached when the round began ((digest, size), smallest first)."""
    holds: Callable[[list[tuple[str, int]]], dict[str, int]] = lambda todo: {}
    """Where the upstream holds each of those layers (how many bytes of its body it sends
    before it waits)."""
    wait_for_holds: bool = False
    """Also wait until every held layer has reached its hold at the mirror."""
    publish_first: bool = False
    """Before the kill, wait until the mirror serves the smallest of those layers as a hit:
    a layer a client completed whose file is known to be published."""

    def due(self, received: Received, holds: dict[str, int], fresh: PushedImage,
            todo: list[tuple[str, int]]) -> bool:
        return (not self.wait_for_holds or reached(received, holds)) and self.when(received, fresh, todo)


async def until_hit(session: aiohttp.ClientSession, base: str, name: str, digest: str) -> None:
    """Ask until the mirror answers that it has the blob in its cache (it publishes a fill just
    after its readers got the last byte)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            async with session.head(f"{base}/v2/{name}/blobs/{digest}") as response:
                assert response.status == 200
                if response.headers[CACHE] == "HIT":
                    return


def reached(received: Received, holds: dict[str, int]) -> bool:
    """Every held layer has all its held bytes at the mirror: the mirror gives clients all but
    the last byte it has written (so only headers while it has at most one)."""
    return all(digest in received.headers if offset <= 1 else received.bytes[digest] >= offset - 1
               for digest, offset in holds.items())


def complete(received: Received, image: PushedImage) -> bool:
    return (image.name, image.tag, image.digest) in received.manifests and all(
        (image.name, digest) in received.blobs for digest in image.blobs)


def layer_bytes(received: Received, image: PushedImage) -> int:
    return sum(received.bytes[digest] for digest in image.blobs)


# Tests


async def test_kill_9_during_concurrent_pulls_loses_nothing_and_serves_only_whole_content(
        registry: Registry, skopeo: str, tmp_path: Path) -> None:
    catalogue = Catalogue()
    small = list(registry.images.values())
    for image in small:
        catalogue.add(image)
    layers = [random.Random(f"crash-{size}").randbytes(size) for size in BIG_SIZES]
    big = push_raw_image(registry.url, BIG, "v1", layers)
    catalogue.add(big)
    layer_sizes = {digest_of(layer): len(layer) for layer in layers}
    del layers
    cache = tmp_path / "cache"

    def spread(todo: list[tuple[str, int]]) -> dict[str, int]:
        offsets = [0, MiB, todo[2][1] // 2, todo[3][1] - 1] if len(todo) == 4 else [s // 2 for _, s in todo]
        return {digest: offset for (digest, _), offset in zip(todo, offsets, strict=True)}

    kill_points = [
        KillPoint("every layer held mid-fill (at byte 0, 1 MiB, half-way, all but its last byte), "
                  "every other image complete",
                  lambda received, fresh, todo: all(complete(received, image) for image in (*small, fresh)),
                  spread, wait_for_holds=True),
        KillPoint("the instant the first manifest of a new repository reached a client",
                  lambda received, fresh, todo: any(name == fresh.name for name, _, _ in received.manifests)),
        KillPoint("the instant a whole layer reached a client, racing its publication",
                  lambda received, fresh, todo: any(digest in layer_sizes for _, digest in received.blobs),
                  lambda todo: {digest: size // 3 for digest, size in todo[1:]}),
        KillPoint("downloads racing, after 20 MiB of layers reached clients",
                  lambda received, fresh, todo: layer_bytes(received, big) >= 20 * MiB),
        KillPoint("the smallest layer left complete and published, the others held at a quarter, "
                  "the new repository complete",
                  lambda received, fresh, todo: complete(received, fresh) and all(
                      (BIG, digest) in received.blobs for digest, _ in todo[:1]),
                  lambda todo: {digest: size // 4 for digest, size in todo[1:]}, wait_for_holds=True,
                  publish_first=True),
        KillPoint("downloads racing, after 40 MiB of layers reached clients",
                  lambda received, fresh, todo: layer_bytes(received, big) >= 40 * MiB),
    ]

    durable_blobs: set[tuple[str, str]] = set()
    durable_manifests: set[tuple[str, str, str]] = set()
    held_mid_fill = 0
    async with passthrough(registry.url) as upstream:
        served = await Served.start("--cache-dir", cache, "--upstream", f"{UPSTREAM}={upstream.url}")
        try:
            for number, point in enumerate(kill_points, start=1):
                # A new repository every round, so every round stores new manifests and rows.
                fresh = push_index(registry.url, f"crash/round{number}", "v1",
                                   platforms=[("linux", "amd64"), ("linux", "arm64")])
                catalogue.add(fresh)
                on_disk = blob_files(cache)
                todo = sorted(((d, s) for d, s in layer_sizes.items() if d not in on_disk), key=lambda x: x[1])
                holds = point.holds(todo) if todo else {}
                for digest, offset in holds.items():
                    upstream.hold(digest, offset)

                received = Received()
                async with aiohttp.ClientSession(auto_decompress=False) as session:
                    # Two clients on the big image (one download per layer, both streaming
                    # from it), the round's new image, and every other image, all at once.
                    tasks = [asyncio.ensure_future(pull(session, served.url, image, catalogue, received))
                             for image in (big, fresh, big, *small)]
                    await received.until(functools.partial(point.due, received, holds, fresh, todo),
                                         f"kill point {number}: {point.what}", tasks)
                    if point.publish_first:
                        for digest, _ in todo[:1]:
                            await until_hit(session, served.url, BIG, digest)
                    await served.kill()
                    upstream.release_all()
                    async with asyncio.timeout(TIMEOUT):
                        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                for outcome in outcomes:
                    if outcome is not None and not cut_by_the_kill(outcome):
                        raise outcome

                # The cache as the kill left it, before anything starts on it again.
                partial = temp_files(cache)
                on_disk = blob_files(cache)
                for digest in layer_sizes:
                    parts = [p for p in partial if p.name.startswith(digest.removeprefix("sha256:") + ".")]
                    assert len(parts) <= 1, f"round {number}: more than one download of {digest}: {parts}"
                    if digest in holds:
                        assert digest not in on_disk, f"round {number}: held {digest} was published"
                        sizes = [p.stat().st_size for p in parts]
                        if point.wait_for_holds:
                            assert sizes == [holds[digest]], f"round {number}: {digest} was not left mid-fill"
                            held_mid_fill += 1
                        else:
                            assert all(size <= holds[digest] for size in sizes)
                for name, _, digest in received.manifests:
                    assert digest in on_disk, f"manifest {name}@{digest} was served but is not on disk"
                durable_manifests |= received.manifests
                durable_blobs |= {(name, d) for name, d in received.blobs if d in on_disk}

                served = await Served.start("--cache-dir", cache, "--upstream", f"{UPSTREAM}={upstream.url}")
                await check_restarted(served, cache, catalogue, upstream, durable_blobs, durable_manifests,
                                      swept=len(partial))

            # Finally a real client pulls everything through the mirror that survived it all.
            for image, all_images in ((big, False), (registry.images["index"], True)):
                destination = tmp_path / f"pulled-{image.name.replace('/', '-')}"
                await copy(skopeo, f"{served.host}/{image.name}:{image.tag}", destination, all_images)
                assert_dir_holds(destination, image)
        finally:
            await served.kill()
    assert held_mid_fill >= 4, "the kills were meant to land mid-download"
    assert {digest for _, digest in durable_blobs} & layer_sizes.keys(), "no layer was completed before a kill"


async def check_restarted(served: Served, cache: Path, catalogue: Catalogue, upstream: Passthrough,
                          durable_blobs: set[tuple[str, str]], durable_manifests: set[tuple[str, str, str]],
                          swept: int) -> None:
    """What must hold of a mirror just restarted on a cache a kill left behind."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def get(path: str, expect_hit: bool) -> bytes:
            async with session.get(f"{served.url}{path}", headers={"Accept": ACCEPT}) as response:
                body = await response.read()
            assert response.status == 200, f"{path} -> {response.status} {body[:300]!r}\n{served.tail()}"
            if expect_hit:
                assert response.headers[CACHE] == "HIT", f"{path} was not served from the cache"
            return body

        async with asyncio.timeout(TIMEOUT):
            assert await get("/v2/", expect_hit=False) == b"{}"
        assert temp_files(cache) == [], "temp files survived start-up"
        if swept:
            assert any(f"swept {swept} unfinished" in line for line in served.log), served.tail()
        files = blob_files(cache)
        assert set(files) <= catalogue.manifests.keys() | catalogue.blobs.keys()
        rows = read_index(cache)
        # What the index counts as cached (sizes, `mirror ls`, the eviction budget) is what is on disk.
        assert rows.blobs == {digest: path.stat().st_size for digest, path in files.items()}

        upstream.reset()
        async with asyncio.timeout(TIMEOUT):
            # Nothing that had completed is lost, nor fetched again.
            for name, digest in sorted(durable_blobs):
                assert await get(f"/v2/{name}/blobs/{digest}", expect_hit=True) == catalogue.blobs[digest]
            for name, reference, digest in sorted(durable_manifests):
                body = await get(f"/v2/{name}/manifests/{reference}", expect_hit=True)
                assert body == catalogue.manifests[digest][0]
            # Every manifest row is a known manifest, and servable when its bytes are there.
            for digest, media_type in sorted(rows.manifests.items()):
                assert digest in catalogue.manifests and catalogue.manifests[digest][1] == media_type
                linked = sorted(n for u, n, d in rows.links if d == digest and u == UPSTREAM)
                assert linked, f"manifest {digest} is indexed but no repository is linked to it"
                if digest in files:
                    body = await get(f"/v2/{linked[0]}/manifests/{digest}", expect_hit=True)
                    assert body == catalogue.manifests[digest][0]
            # Every linked blob whose bytes are there is served from them.
            for upstream_name, name, digest in sorted(rows.links):
                assert upstream_name == UPSTREAM
                if digest in catalogue.blobs and digest in files:
                    assert await get(f"/v2/{name}/blobs/{digest}", expect_hit=True) == catalogue.blobs[digest]
            # A tag whose manifest is there is a hit...
            missing = []
            for (upstream_name, name, tag), digest in sorted(rows.tags.items()):
                assert upstream_name == UPSTREAM and catalogue.tags[(name, tag)] == digest
                if digest in rows.manifests and digest in files:
                    assert await get(f"/v2/{name}/manifests/{tag}", expect_hit=True) == catalogue.manifests[digest][0]
                else:
                    missing.append((name, tag, digest))
            assert upstream.count() == 0, f"cached content was fetched again: {dict(upstream.requests)}"
            # ... and one whose manifest is not is fetched again.
            for name, tag, digest in missing:
                assert await get(f"/v2/{name}/manifests/{tag}", expect_hit=False) == catalogue.manifests[digest][0]


def assert_dir_holds(directory: Path, image: PushedImage) -> None:
    """A skopeo dir: copy holds exactly the image's manifests and blobs, byte for byte."""
    expected = {"manifest.json": image.manifest}
    for child in image.children:
        expected[f"{child.digest.removeprefix('sha256:')}.manifest.json"] = child.manifest
    expected |= {digest.removeprefix("sha256:"): data for digest, data in image.blobs.items()}
    found = {path.name for path in directory.iterdir()} - {"version"}
    assert found == expected.keys()
    for name, data in expected.items():
        assert (directory / name).read_bytes() == data, f"{directory / name} differs from the upstream's"


# A full disk.


class Disk:
    """Where the cache's writes land, and how much room they have."""

    def leave_free(self, free: int) -> None:
        raise NotImplementedError

    def free_up(self) -> None:
        raise NotImplementedError


class Tmpfs(Disk):
    """A real small filesystem: space is taken by a ballast file beside the cache's own."""

    def __init__(self, root: Path) -> None:
        self.ballast = root / "ballast"

    def leave_free(self, free: int) -> None:
        stats = os.statvfs(self.ballast.parent)
        take = stats.f_bavail * stats.f_frsize - free
        chunk = b"\0" * MiB
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while take > 0 or free == 0:
                try:
                    take -= os.write(fd, chunk[:take] if free else chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)

    def free_up(self) -> None:
        self.ballast.unlink(missing_ok=True)


class InjectedOs(Disk):
    """Stands in for `os` inside `mirror.spool`. Once `room` bytes are written, writes fail
    with `error` (ENOSPC: the last one short, as on a real filesystem), `refusals` times (None:
    until space is freed); everything else is the real `os`."""

    def __init__(self, room: int | None = None, refusals: int | None = None, error: int = errno.ENOSPC) -> None:
        self.room = room
        self.refusals = refusals
        self.error = error

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        if self.room is None:
            return os.write(fd, data)
        if self.room <= 0:
            if self.refusals is not None:
                self.refusals -= 1
                if self.refusals <= 0:
                    self.room = None  # the space came back (another process freed some)
            raise OSError(self.error, os.strerror(self.error))
        written = os.write(fd, memoryview(data)[:self.room])
        self.room -= written
        return written

    def splice(self, src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        """Bytes spliced into a file (a download taken straight from its socket) are writes too."""
        if self.room is None or not stat.S_ISREG(os.fstat(dst).st_mode):
            return os.splice(src, dst, count, *args, **kwargs)
        if self.room <= 0:
            return self.write(dst, b"")
        moved = os.splice(src, dst, min(count, self.room), *args, **kwargs)
        self.room -= moved
        return moved

    def leave_free(self, free: int) -> None:
        self.room = free

    def free_up(self) -> None:
        self.room = None


@pytest.fixture(params=["tmpfs", "injected-enospc"])
def disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    """The cache directory's disk: an 8 MiB tmpfs where this machine lets us mount one (else a
    skip, never a failure, even in CI: the injected variant covers the same behaviour), or
    ENOSPC injected into the store's writes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if request.param == "injected-enospc":
        injected = InjectedOs()
        monkeypatch.setattr(mirror.spool, "os", injected)
        yield injected
        return
    reason = mount_tmpfs(cache, "8m")
    if reason is not None:
        pytest.skip(f"no small filesystem to fill: {reason}")
    try:
        yield Tmpfs(cache)
    finally:
        unmount(cache)


class Puller:
    """A client of one in-process mirror."""

    def __init__(self, client: aiohttp.ClientSession, mirror_url: str) -> None:
        self.client = client
        self.url = mirror_url

    async def get(self, path: str) -> tuple[int, bytes, str | None]:
        async with asyncio.timeout(TIMEOUT), self.client.get(f"{self.url}{path}",
                                                             headers={"Accept": ACCEPT}) as response:
            return response.status, await response.read(), response.headers.get(CACHE)

    async def doomed(self, path: str, expected: bytes) -> str:
        """How a pull that cannot be stored ends for its client: an OCI error, or a cut whose
        bytes up to the cut are right; never the whole body."""
        got = b""
        try:
            async with asyncio.timeout(TIMEOUT), self.client.get(f"{self.url}{path}",
                                                                 headers={"Accept": ACCEPT}) as response:
                if response.status >= 400:
                    document = json.loads(await response.read())
                    assert document["errors"][0]["code"], document
                    return "error status"
                async for chunk in response.content.iter_any():
                    wrong = first_difference(expected, chunk, len(got))
                    assert wrong is None, f"{path}: the client was sent wrong bytes from offset {wrong}"
                    got += chunk
        except aiohttp.ClientPayloadError:
            return "cut"
        return f"{response.status} with a whole body of {len(got)} bytes"


async def test_full_disk_fails_the_fill_publishes_nothing_and_keeps_serving(
        disk: Disk, registry: Registry, counting: Counting, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached = registry.images["single"]
    uncached = registry.images["docker"]
    big = push_raw_image(registry.url, "crash/diskfull", "v1", [random.Random("diskfull").randbytes(6 * MiB)])
    layer = blob_digests(big)[1]
    mirror_ = await make_mirror({UPSTREAM: counting.url}, cache_dir=cache)
    pulls = Puller(client, mirror_.url)
    joined = mirror_.services.background.join
    try:
        # Cached while there was room: an image, and the manifest of one too big to follow.
        cached_paths = [(f"/v2/{cached.name}/manifests/{cached.tag}", cached.manifest),
                        *((f"/v2/{cached.name}/blobs/{d}", b) for d, b in cached.blobs.items())]
        for path, expected in [*cached_paths, (f"/v2/{big.name}/manifests/{big.tag}", big.manifest)]:
            status, body, _ = await pulls.get(path)
            assert status == 200 and body == expected, path
        await joined()
        before = blob_files(cache)

        # 1 MiB left: the 6 MiB layer cannot fit. Two clients want it; neither gets it whole.
        disk.leave_free(MiB)
        outcomes = await asyncio.gather(*(pulls.doomed(f"/v2/{big.name}/blobs/{layer}", big.blobs[layer])
                                          for _ in range(2)))
        assert set(outcomes) <= {"cut", "error status"}, outcomes
        async with asyncio.timeout(TIMEOUT):
            await joined()
        assert blob_files(cache) == before, "a fill that ran out of disk published something"
        assert layer not in read_index(cache).blobs, "a fill that ran out of disk was indexed"
        assert temp_files(cache) == [], "a fill that ran out of disk left its temp file"

        # Not a byte left: what is cached is still served, from the cache alone; what is not
        # (a manifest this time) fails with an OCI error and is not published either.
        disk.leave_free(0)
        counting.reset()
        for path, expected in cached_paths:
            assert await pulls.get(path) == (200, expected, "HIT"), path
        assert counting.count() == 0, dict(counting.requests)
        path = f"/v2/{uncached.name}/manifests/{uncached.tag}"
        assert await pulls.doomed(path, uncached.manifest) == "error status"
        async with asyncio.timeout(TIMEOUT):
            await joined()
        assert blob_files(cache) == before
        assert uncached.digest not in read_index(cache).manifests
        assert temp_files(cache) == []

        # Room again: the same pulls now succeed, whole, and are published.
        disk.free_up()
        assert await pulls.get(f"/v2/{big.name}/blobs/{layer}") == (200, big.blobs[layer], "MISS")
        assert (await pulls.get(path))[:2] == (200, uncached.manifest)
        async with asyncio.timeout(TIMEOUT):
            await joined()
        assert blob_files(cache).keys() == before.keys() | {layer, uncached.digest}
        assert read_index(cache).blobs[layer] == len(big.blobs[layer])
        assert temp_files(cache) == []
        assert await pulls.get(f"/v2/{big.name}/blobs/{layer}") == (200, big.blobs[layer], "HIT")
    finally:
        # The mirror (and its index) let go of the disk before it is unmounted.
        await mirror_.server.close()


async def test_a_disk_that_refuses_a_write_fails_the_fill_at_once_and_says_so(
        registry: Registry, make_mirror: MirrorFactory, client: aiohttp.ClientSession, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The disk refuses one write, then has room again (another process freed some). The fill
    must end there, put down to the disk: the upstream is fine, so it is not asked again, and
    the temp file (which clients are tailing) is never appended to past a partial write."""
    big = push_raw_image(registry.url, "crash/diskhiccup", "v1", [random.Random("hiccup").randbytes(6 * MiB)])
    layer = blob_digests(big)[1]
    disk = InjectedOs()
    monkeypatch.setattr(mirror.spool, "os", disk)
    async with passthrough(registry.url) as upstream:
        mirror_ = await make_mirror({UPSTREAM: upstream.url}, cache_dir=tmp_path / "cache")
        pulls = Puller(client, mirror_.url)
        assert (await pulls.get(f"/v2/{big.name}/manifests/{big.tag}"))[:2] == (200, big.manifest)
        upstream.reset()

        # The write that crosses 1 MiB lands in part, the next is refused. Any second request
        # for the blob is held 2 MiB into its body, so whatever it appends reaches the client.
        disk.room, disk.refusals = MiB + 12345, 1
        upstream.hold(layer, 2 * MiB)
        outcome = await pulls.doomed(f"/v2/{big.name}/blobs/{layer}", big.blobs[layer])
        assert outcome in ("cut", "error status")
        async with asyncio.timeout(TIMEOUT):
            await mirror_.services.background.join()
        assert await mirror_.services.store.size(Digest.parse(layer)) is None
        assert temp_files(tmp_path / "cache") == []
        reports = [r.getMessage() for r in caplog.records if layer in r.getMessage() and r.levelno >= logging.WARNING]
        assert any("disk is full" in m or "No space left" in m for m in reports), (
            f"the failure of {layer} is not put down to the full disk: {reports}")
        assert upstream.count("GET", "blobs") == 1, (
            f"the upstream was asked again for a blob the mirror's own disk refused: {dict(upstream.requests)}")


async def test_a_full_disk_serves_what_is_cached_and_refuses_the_rest_with_503(
        registry: Registry, counting: Counting, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    """A cache on a real 20 MiB filesystem filled to the last byte: the index can take no
    write, yet every request the cache can answer is answered (a tag past its TTL too), what it
    cannot answer is a 503 that says why, readiness says why, and nothing is lost once space
    comes back."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if (reason := mount_tmpfs(cache, "20m")) is not None:
        pytest.skip(f"no small filesystem to fill: {reason}")
    disk = Tmpfs(cache)
    image = push_raw_image(registry.url, "full/small", "v1", [random.Random("small").randbytes(64 * 1024)])
    layer = blob_digests(image)[1]
    # The same layer in a repository the cache has not seen it in: serving it there writes a link.
    sibling = push_raw_image(registry.url, "full/sibling", "v1", [image.blobs[layer]])
    uncached = registry.images["docker"]
    clock = Clock()
    mirror_ = await make_mirror({UPSTREAM: counting.url}, cache_dir=cache, tag_ttl=60, clock=clock)
    pulls = Puller(client, mirror_.url)
    tag_path = f"/v2/{image.name}/manifests/{image.tag}"
    cached_paths = [(f"/v2/{image.name}/manifests/{image.digest}", image.manifest),
                    *((f"/v2/{image.name}/blobs/{d}", b) for d, b in image.blobs.items())]
    try:
        assert (await pulls.get(tag_path))[:2] == (200, image.manifest)
        for path, expected in cached_paths:
            assert (await pulls.get(path))[:2] == (200, expected), path
        await mirror_.services.background.join()
        before = blob_files(cache)

        disk.leave_free(0)
        assert os.statvfs(cache).f_bavail == 0
        clock.advance(61)
        # Revalidated, its check remembered in memory though the index could not take it.
        results = []
        for _ in range(3):
            status, body, result = await pulls.get(tag_path)
            assert (status, body) == (200, image.manifest)
            results.append(result)
            await mirror_.services.background.join()
        assert results == ["REVALIDATING", "HIT", "HIT"]
        for path, expected in cached_paths:
            assert await pulls.get(path) == (200, expected, "HIT"), path
        assert await pulls.get(f"/v2/{sibling.name}/blobs/{layer}") == (200, image.blobs[layer], "HIT")

        for path in (f"/v2/{uncached.name}/manifests/{uncached.tag}",
                     f"/v2/{uncached.name}/blobs/{blob_digests(uncached)[1]}"):
            async with client.get(f"{mirror_.url}{path}", headers={"Accept": ACCEPT}) as response:
                error = (await response.json())["errors"][0]
                assert (response.status, error["code"]) == (503, "UNAVAILABLE"), path
                assert "disk is full" in error["message"] and "disk is full" in error["detail"], error
        async with client.get(f"{mirror_.url}/readyz") as response:
            assert response.status == 503
            assert "full" in (await response.json())["problems"]["cache"]
        await mirror_.services.background.join()
        assert blob_files(cache) == before
        assert temp_files(cache) == []

        disk.free_up()
        async with client.get(f"{mirror_.url}/readyz") as response:
            assert response.status == 200
        for path in (f"/v2/{uncached.name}/manifests/{uncached.tag}",
                     f"/v2/{uncached.name}/blobs/{blob_digests(uncached)[1]}"):
            assert (await pulls.get(path))[:2] == (200, uncached.blobs.get(path.rsplit("/", 1)[1],
                                                                           uncached.manifest)), path
        await mirror_.services.background.join()
        for path, expected in [(tag_path, image.manifest), *cached_paths]:
            assert (await pulls.get(path))[:2] == (200, expected), path
        assert before.keys() <= blob_files(cache).keys()
    finally:
        await mirror_.server.close()
        unmount(cache)


@pytest.mark.parametrize("failure", [errno.EIO, errno.EROFS])
async def test_a_disk_that_fails_writes_keeps_serving_what_is_cached(
        failure: int, registry: Registry, make_mirror: MirrorFactory, client: aiohttp.ClientSession, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """I/O errors and a filesystem gone read-only fail what must be written, with an OCI error
    that names the fault, and nothing else: cached content is served, nothing partial lands."""
    cached = push_raw_image(registry.url, "failing/cached", "v1", [random.Random("cached").randbytes(256 * 1024)])
    fresh = push_raw_image(registry.url, "failing/fresh", "v1", [random.Random("fresh").randbytes(256 * 1024)])
    disk = InjectedOs(error=failure)
    monkeypatch.setattr(mirror.spool, "os", disk)
    mirror_ = await make_mirror({UPSTREAM: registry.url}, cache_dir=tmp_path / "cache")
    pulls = Puller(client, mirror_.url)
    cached_paths = [(f"/v2/{cached.name}/manifests/{cached.tag}", cached.manifest),
                    *((f"/v2/{cached.name}/blobs/{d}", b) for d, b in cached.blobs.items())]
    for path, expected in cached_paths:
        assert (await pulls.get(path))[:2] == (200, expected)
    await mirror_.services.background.join()
    before = blob_files(tmp_path / "cache")

    disk.leave_free(0)
    for path, expected in cached_paths:
        assert await pulls.get(path) == (200, expected, "HIT"), path
    fresh_manifest = f"{mirror_.url}/v2/{fresh.name}/manifests/{fresh.tag}"
    async with client.get(fresh_manifest, headers={"Accept": ACCEPT}) as response:
        error = (await response.json())["errors"][0]
        assert (response.status, error["code"]) == (503, "UNAVAILABLE")
        assert os.strerror(failure) in error["message"] and errno.errorcode[failure] in error["detail"], error
    layer = blob_digests(fresh)[1]
    assert await pulls.doomed(f"/v2/{fresh.name}/blobs/{layer}", fresh.blobs[layer]) in ("cut", "error status")
    await mirror_.services.background.join()
    assert blob_files(tmp_path / "cache") == before
    assert temp_files(tmp_path / "cache") == []
    assert any(os.strerror(failure) in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)

    disk.free_up()
    assert (await pulls.get(f"/v2/{fresh.name}/blobs/{layer}"))[:2] == (200, fresh.blobs[layer])


async def test_an_index_that_cannot_be_opened_leaves_the_mirror_serving(
        registry: Registry, make_mirror: MirrorFactory, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A corrupt index file: the mirror starts on a temporary index rebuilt from the blobs,
    serves the cached bytes, says why it is not ready, and leaves the file for the operator."""
    image = push_raw_image(registry.url, "corrupt/index", "v1", [random.Random("corrupt").randbytes(64 * 1024)])
    cache = tmp_path / "cache"
    first = await make_mirror({UPSTREAM: registry.url}, cache_dir=cache)
    pulls = Puller(client, first.url)
    for path, expected in [(f"/v2/{image.name}/manifests/{image.tag}", image.manifest),
                           *((f"/v2/{image.name}/blobs/{d}", b) for d, b in image.blobs.items())]:
        assert (await pulls.get(path))[:2] == (200, expected)
    await first.services.background.join()
    await first.server.close()
    for leftover in cache.glob("index.db*"):
        leftover.unlink()
    garbage = b"this is not a database" * 1000
    (cache / "index.db").write_bytes(garbage)

    async with passthrough(registry.url) as upstream:
        second = await make_mirror({UPSTREAM: upstream.url}, cache_dir=cache)
        pulls = Puller(client, second.url)
        for digest, expected in image.blobs.items():
            assert await pulls.get(f"/v2/{image.name}/blobs/{digest}") == (200, expected, "HIT")
        assert upstream.count("GET", "blobs") == 0, "cached bytes came from the cache"
        assert (await pulls.get(f"/v2/{image.name}/manifests/{image.tag}"))[:2] == (200, image.manifest)
        async with client.get(f"{second.url}/readyz") as response:
            assert response.status == 503
            assert "cannot be opened" in (await response.json())["problems"]["index"]
    assert (cache / "index.db").read_bytes() == garbage
