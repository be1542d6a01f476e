"""containerd, configured with the README's hosts.toml files, pulling from two registries through
one mirror that tells them apart by containerd's `ns` parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Counting, CountingFactory, MirrorFactory, Registry, require_binary
from tests.support.clients import Containerd, Sandbox
from tests.support.images import PushedImage, chain_ids, config_of, for_platform, host_architecture
from tests.support.snippets import snippet


@pytest.fixture(scope="module", autouse=True)
def containerd_binaries() -> None:
    require_binary("containerd")
    require_binary("ctr")


def hosts_dir(directory: Path, mirror_host: str, files: dict[str, str]) -> Path:
    """`certs.d`-style directory: {registry host: README snippet name}."""
    for host, name in files.items():
        (directory / host).mkdir(parents=True, exist_ok=True)
        (directory / host / "hosts.toml").write_text(snippet(name, mirror_host))
    return directory


def expected_content(image: PushedImage) -> set[str]:
    """What a pull for this machine's platform stores: the index (if any), the manifest and its blobs."""
    target = for_platform(image, host_architecture())
    return {image.digest, target.digest, *target.blobs}


def expected_snapshots(image: PushedImage) -> set[str]:
    """The layers unpacked, each checked by containerd against the config's diff_ids."""
    return set(chain_ids(config_of(for_platform(image, host_architecture()))[1]["rootfs"]["diff_ids"]))


async def assert_pulled(containerd: Containerd, pulls: list[tuple[str, PushedImage]]) -> None:
    listing = (await containerd.ctr("images", "ls")).stdout.splitlines()
    for reference, image in pulls:
        assert any(line.split()[:1] == [reference] and image.digest in line for line in listing), listing
    assert await containerd.content() == set().union(*(expected_content(image) for _, image in pulls))
    assert await containerd.snapshots() == set().union(*(expected_snapshots(image) for _, image in pulls))


async def test_containerd_pulls_two_registries_through_one_mirror_by_ns(
        sandbox: Sandbox, registry: Registry, make_counting: CountingFactory, make_mirror: MirrorFactory,
        tmp_path: Path) -> None:
    hub, quay = await make_counting(registry.url), await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": hub.url, "quay.io": quay.url})
    hosts = hosts_dir(tmp_path / "certs.d", mirror.host, {"docker.io": "containerd/docker.io/hosts.toml",
                                                         "quay.io": "containerd/quay.io/hosts.toml"})
    pulls = [("docker.io/library/alpine:3.19", registry.images["single"]),
             ("docker.io/library/multi:1.0", registry.images["index"]),
             ("quay.io/team/app:v1", registry.images["team"])]

    async with Containerd(sandbox, tmp_path / "first") as first:
        for reference, _ in pulls:
            await first.pull(reference, hosts)
        await assert_pulled(first, pulls)
    assert ("GET", "/v2/team/app/manifests/v1") in quay.requests
    assert not any("team/app" in path for (_, path) in hub.requests), "quay.io's image was routed to docker.io"
    assert not any("library/" in path for (_, path) in quay.requests), "docker.io's images were routed to quay.io"
    blobs = {d for _, image in pulls for d in for_platform(image, host_architecture()).blobs}
    assert hub.count("GET", "blobs") + quay.count("GET", "blobs") == len(blobs), "each blob was fetched once"
    await mirror.services.background.join()

    hub.reset()
    quay.reset()
    async with Containerd(sandbox, tmp_path / "second") as second:
        for reference, _ in pulls:
            await second.pull(reference, hosts)
        await assert_pulled(second, pulls)
    assert hub.count() + quay.count() == 0, f"second pulls reached an upstream: {hub.requests} {quay.requests}"


async def test_containerd_reaches_a_mirror_under_a_path_prefix(
        sandbox: Sandbox, registry: Registry, counting: Counting, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    mirror = await make_mirror({"docker.io": counting.url}, path_prefix="/registry")
    hosts = hosts_dir(tmp_path / "certs.d", mirror.host, {"docker.io": "containerd/path-prefix/hosts.toml"})
    image = registry.images["list"]
    async with Containerd(sandbox, tmp_path / "containerd") as containerd:
        await containerd.pull("docker.io/library/dockerlist:1.0", hosts)
        await assert_pulled(containerd, [("docker.io/library/dockerlist:1.0", image)])
    assert counting.count("GET", "blobs") == len(for_platform(image, host_architecture()).blobs)


async def test_a_registry_the_mirror_does_not_serve_is_refused_and_fails_on_loopback(
        sandbox: Sandbox, counting: Counting, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    # ghcr.io pointed at a mirror that does not serve it: 403 from the mirror, then containerd's
    # fallback to the `server` line, which the sandbox resolves to loopback.
    (tmp_path / "certs.d" / "ghcr.io").mkdir(parents=True)
    (tmp_path / "certs.d" / "ghcr.io" / "hosts.toml").write_text(
        snippet("containerd/quay.io/hosts.toml", mirror.host).replace("quay.io", "ghcr.io"))
    async with Containerd(sandbox, tmp_path / "containerd") as containerd:
        result = await containerd.pull("ghcr.io/owner/image:1.0", tmp_path / "certs.d", check=False)
        assert result.returncode != 0
        assert await containerd.content() == set()
        assert (await containerd.ctr("images", "ls", "--quiet")).stdout.strip() == ""
    assert counting.count() == 0
    assert "403 Forbidden" in result.stderr, result.stderr
    assert "https://ghcr.io/v2/" in result.stderr and "127.0.0.1:443: connect: connection refused" in result.stderr
