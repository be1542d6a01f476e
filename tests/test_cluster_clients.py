"""Real clients against a real cluster: three `mirror serve` processes on one bucket (a real
SeaweedFS) and one Redis (a real redis-server), in front of the real registry through the
`counting` pass-through. skopeo and containerd pull every kind of fixture image through one
replica; the same pulls through the other replicas cost the upstream nothing; and one cold
image pulled through all three replicas at once is downloaded from the upstream once per blob."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Counting, Registry, require_binary
from tests.support.clients import Containerd, Sandbox
from tests.support.images import PushedImage, chain_ids, config_of, for_platform, host_architecture, push_raw_image
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedFS
from tests.support.served import Served
from tests.support.skopeo import copy
from tests.support.snippets import snippet

MiB = 1 << 20
REPLICAS = 3
PREFIX = "cluster"
DEFAULT_TAG_TTL = 300.0
"""An upstream's tag_ttl when nothing sets it: a cached tag is served without asking the
upstream for this long after it was last checked (by any replica: the check is in Redis)."""
PUBLISH_TIMEOUT = 60.0
POLL = 0.05


@dataclass
class Cluster:
    replicas: list[Served]
    seaweedfs: SeaweedFS
    bucket: str

    async def in_bucket(self) -> set[str]:
        """The digests the replicas have published to the shared bucket."""
        start = f"{PREFIX}/blobs/sha256/"
        found: set[str] = set()
        async with self.seaweedfs.client() as s3:
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                found.update(f"sha256:{item['Key'][len(start):]}" for item in page.get("Contents", []))
        return found

    async def wait_published(self, digests: Iterable[str]) -> None:
        """Until every digest is whole in the bucket: a replica answers its client from the
        spool and publishes just after, so a pull can end before its last blob is published."""
        wanted = set(digests)
        deadline = time.monotonic() + PUBLISH_TIMEOUT
        while missing := wanted - await self.in_bucket():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {r.url}\n{r.tail()}" for r in self.replicas)
                pytest.fail(f"not published in {PUBLISH_TIMEOUT:.0f} s: {sorted(missing)}\n{logs}")
            await asyncio.sleep(POLL)


ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster(counting: Counting, seaweedfs: SeaweedFS, s3_bucket: str, redis_server: RedisServer,
                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ClusterFactory]:
    """Starts the replicas as the README runs them: `--storage s3://BUCKET/PREFIX --redis URL
    --cache-dir SPOOL`, the S3 endpoint and keys from the AWS SDK's variables, and docker.io
    being the counting pass-through. `tag_ttl`, if given, comes from a config file."""
    for variable, value in (("AWS_ENDPOINT_URL_S3", seaweedfs.endpoint), ("AWS_REGION", seaweedfs.region),
                            ("AWS_ACCESS_KEY_ID", seaweedfs.access_key),
                            ("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)):
        monkeypatch.setenv(variable, value)
    running: list[Served] = []

    async def start(tag_ttl: str | None = None) -> Cluster:
        options: list[str | Path] = ["--storage", f"s3://{s3_bucket}/{PREFIX}", "--redis", redis_server.url]
        if tag_ttl is None:
            options += ["--upstream", f"docker.io={counting.url}"]
        else:
            config = tmp_path / "mirror.yaml"
            config.write_text(f"upstreams:\n  - name: docker.io\n    url: {counting.url}\n    tag_ttl: {tag_ttl}\n")
            options += ["--config", config]
        started = await asyncio.gather(*(Served.start("--cache-dir", tmp_path / f"spool{i}", *options)
                                         for i in range(REPLICAS)), return_exceptions=True)
        running.extend(s for s in started if isinstance(s, Served))
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        return Cluster(running[-REPLICAS:], seaweedfs, s3_bucket)

    try:
        yield start
    finally:
        for replica in running:
            await replica.kill()
            # Shown by pytest only when the test failed.
            print(f"--- log of the replica at {replica.url}\n{replica.tail(80)}")


def reference(image: PushedImage, *, short: bool) -> str:
    """How a user names the image on a mirror: `alpine:3.19`, or in full `library/alpine:3.19`."""
    return f"{image.name.removeprefix('library/') if short else image.name}:{image.tag}"


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


def every_digest(image: PushedImage) -> set[str]:
    """The image's manifests (index and children) and blobs."""
    return {image.digest, *(child.digest for child in image.children), *image.blobs}


def assert_copied(directory: Path, image: PushedImage) -> None:
    """A `skopeo copy --all ... dir:` of `image` holds exactly what was pushed to the registry:
    the same manifest bytes (so the same digests) and every blob byte for byte."""
    expected = {"version", "manifest.json", *(hex_of(d) for d in image.blobs),
                *(f"{hex_of(child.digest)}.manifest.json" for child in image.children)}
    assert {p.name for p in directory.iterdir()} == expected, f"{image.name}:{image.tag}"
    assert (directory / "manifest.json").read_bytes() == image.manifest, f"{image.name}:{image.tag}"
    for child in image.children:
        assert (directory / f"{hex_of(child.digest)}.manifest.json").read_bytes() == child.manifest
    for digest, data in image.blobs.items():
        assert (directory / hex_of(digest)).read_bytes() == data, f"{image.name}:{image.tag} {digest}"


async def pull_all(skopeo: str, replica: Served, images: dict[str, PushedImage], into: Path, *, short: bool) -> None:
    into.mkdir()
    for label, image in images.items():
        await copy(skopeo, f"{replica.host}/{reference(image, short=short)}", into / label, True)
        assert_copied(into / label, image)


async def test_every_fixture_image_pulled_through_one_replica_costs_nothing_through_the_others(
        skopeo: str, registry: Registry, counting: Counting, start_cluster: ClusterFactory, tmp_path: Path) -> None:
    cluster = await start_cluster()
    first, *others = cluster.replicas
    images = registry.images  # single OCI, docker v2, twelve layers, OCI index, docker list, non-library
    checked = time.monotonic()
    await pull_all(skopeo, first, images, tmp_path / "first", short=True)
    assert counting.count("GET", "blobs") == sum(len(image.blobs) for image in images.values()), \
        f"each blob is downloaded once: {dict(counting.requests)}"
    await cluster.wait_published(set().union(*map(every_digest, images.values())))

    for i, replica in enumerate(others, 2):
        counting.reset()
        await pull_all(skopeo, replica, images, tmp_path / f"replica{i}", short=False)
        # Blobs and manifests by digest come from the bucket, as the index in Redis says they
        # may for these repositories. Each tag was checked by replica 1 under `tag_ttl` ago, and
        # that check is in Redis: a replica that never saw the tag serves it without a HEAD.
        assert time.monotonic() - checked < DEFAULT_TAG_TTL, "too slow to test within tag_ttl"
        assert counting.count() == 0, f"the pulls through replica {i} reached the upstream: {dict(counting.requests)}"


async def test_a_tag_past_its_ttl_is_revalidated_by_another_replica_with_a_head_only(
        skopeo: str, registry: Registry, counting: Counting, start_cluster: ClusterFactory, tmp_path: Path) -> None:
    """With `tag_ttl: 0s` every tag is due for a check at once: the next replica asks the
    upstream with a HEAD whether the tag still names the digest, and fetches nothing more."""
    cluster = await start_cluster(tag_ttl="0s")
    first, second, _ = cluster.replicas
    images = {label: registry.images[label] for label in ("single", "index", "list")}
    await pull_all(skopeo, first, images, tmp_path / "first", short=True)
    await cluster.wait_published(set().union(*map(every_digest, images.values())))

    counting.reset()
    await pull_all(skopeo, second, images, tmp_path / "second", short=True)
    tags = {("HEAD", f"/v2/{image.name}/manifests/{image.tag}") for image in images.values()}
    # The check may run in the background (stale-while-revalidate): the cached copy was served
    # meanwhile, so it may reach the upstream just after the pull ends.
    deadline = time.monotonic() + PUBLISH_TIMEOUT
    while not tags <= counting.requests.keys() and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
    assert set(counting.requests) == tags, f"only HEADs of the tags: {dict(counting.requests)}"


def hosts_dir(directory: Path, replica: Served) -> Path:
    """containerd's `certs.d` with the README's docker.io hosts.toml, pointed at one replica."""
    (directory / "docker.io").mkdir(parents=True)
    (directory / "docker.io" / "hosts.toml").write_text(snippet("containerd/docker.io/hosts.toml", replica.host))
    return directory


def pulled_by_containerd(image: PushedImage) -> set[str]:
    """What containerd stores for this machine's platform: the index (if any), the manifest and its blobs."""
    target = for_platform(image, host_architecture())
    return {image.digest, target.digest, *target.blobs}


async def assert_pulled(containerd: Containerd, pulls: dict[str, PushedImage]) -> None:
    """Each reference names the registry's digest, the content store holds exactly the pushed
    digests, and every layer unpacked to the diff_id its config gives (containerd checks that)."""
    listing = (await containerd.ctr("images", "ls")).stdout.splitlines()
    for name, image in pulls.items():
        assert any(line.split()[:1] == [name] and image.digest in line for line in listing), listing
    assert await containerd.content() == set().union(*map(pulled_by_containerd, pulls.values()))
    layers = {chain for image in pulls.values()
              for chain in chain_ids(config_of(for_platform(image, host_architecture()))[1]["rootfs"]["diff_ids"])}
    assert await containerd.snapshots() == layers


async def test_containerd_pulls_through_one_replica_and_another_pulls_the_same_for_nothing(
        sandbox: Sandbox, registry: Registry, counting: Counting, start_cluster: ClusterFactory,
        tmp_path: Path) -> None:
    require_binary("containerd")
    require_binary("ctr")
    cluster = await start_cluster()
    first, _, third = cluster.replicas
    pulls = {"docker.io/library/alpine:3.19": registry.images["single"],
             "docker.io/library/busybox:1.36": registry.images["docker"],
             "docker.io/library/multi:1.0": registry.images["index"],
             "docker.io/library/dockerlist:1.0": registry.images["list"]}

    cold = hosts_dir(tmp_path / "certs.d-third", third)
    async with Containerd(sandbox, tmp_path / "cold") as containerd:
        for name in pulls:
            await containerd.pull(name, cold)
        await assert_pulled(containerd, pulls)
    wanted = set().union(*map(pulled_by_containerd, pulls.values()))
    blobs = {d for image in pulls.values() for d in for_platform(image, host_architecture()).blobs}
    assert counting.count("GET", "blobs") == len(blobs), f"each blob is downloaded once: {dict(counting.requests)}"
    await cluster.wait_published(wanted)

    counting.reset()
    warm = hosts_dir(tmp_path / "certs.d-first", first)
    async with Containerd(sandbox, tmp_path / "warm") as containerd:
        for name in pulls:
            await containerd.pull(name, warm)
        await assert_pulled(containerd, pulls)
    assert counting.count() == 0, f"containerd's pulls via replica 1 reached the upstream: {dict(counting.requests)}"


@pytest.fixture(scope="module")
def large(registry: Registry) -> PushedImage:
    """An image of three 16 MiB layers: downloads long enough for the replicas' pulls to overlap."""
    layers = [random.Random(f"cluster-clients{i}").randbytes(16 * MiB) for i in range(3)]
    return push_raw_image(registry.url, "library/clustered", "1.0", layers)


@pytest.mark.parametrize("label", ["many", "index", "list", "large"])
async def test_one_cold_image_pulled_through_every_replica_at_once_is_downloaded_once(
        label: str, skopeo: str, registry: Registry, large: PushedImage, counting: Counting,
        start_cluster: ClusterFactory, tmp_path: Path) -> None:
    image = large if label == "large" else registry.images[label]
    cluster = await start_cluster()
    await asyncio.gather(*(copy(skopeo, f"{replica.host}/{reference(image, short=True)}", tmp_path / f"replica{i}",
                                True) for i, replica in enumerate(cluster.replicas, 1)))
    for i in range(1, REPLICAS + 1):
        assert_copied(tmp_path / f"replica{i}", image)
    gets = {path: n for (method, path), n in counting.requests.items() if method == "GET" and "/blobs/" in path}
    assert gets == {f"/v2/{image.name}/blobs/{digest}": 1 for digest in image.blobs}, \
        "every blob is downloaded from the upstream once for the whole cluster"
    await cluster.wait_published(every_digest(image))
