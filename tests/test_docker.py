"""The Docker daemon, configured with the README's daemon.json, pulling Docker Hub names through the
mirror (the local registry behind it stands in for Docker Hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Counting, MirrorFactory, Registry, require_binary
from tests.support.clients import DockerDaemon, Sandbox
from tests.support.images import PushedImage, config_of, for_platform, host_architecture
from tests.support.snippets import snippet


@pytest.fixture(scope="module", autouse=True)
def docker_binaries() -> None:
    require_binary("dockerd")
    require_binary("docker")


async def assert_pulled(daemon: DockerDaemon, reference: str, image: PushedImage) -> None:
    """The daemon holds exactly the upstream's image for its platform: the config digest is the image
    ID, and the layers it unpacked hash to the config's diff_ids."""
    target = for_platform(image, host_architecture())
    config_digest, config = config_of(target)
    info = await daemon.inspect(reference)
    assert info["Id"] == config_digest
    assert info["Architecture"] == host_architecture()
    assert info["RootFS"] == {"Type": "layers", "Layers": config["rootfs"]["diff_ids"]}
    repo_digests = info["RepoDigests"]
    assert isinstance(repo_digests, list) and any(d.endswith(f"@{image.digest}") for d in repo_digests)


# (label, how the user names it): bare names and library/ names, single images and multi-platform ones.
PULLS = [("single", "alpine:3.19"), ("docker", "library/busybox:1.36"), ("index", "multi:1.0"),
         ("list", "docker.io/library/dockerlist:1.0")]


async def test_docker_pulls_through_the_mirror_and_a_fresh_daemon_pulls_from_cache(
        sandbox: Sandbox, registry: Registry, counting: Counting, make_mirror: MirrorFactory,
        tmp_path: Path) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    daemon_json = snippet("docker/daemon.json", mirror.host)

    async with DockerDaemon(sandbox, tmp_path / "first", daemon_json) as first:
        for label, reference in PULLS:
            await first.docker("pull", reference)
            await assert_pulled(first, reference, registry.images[label])
    wanted = {d for label, _ in PULLS for d in for_platform(registry.images[label], host_architecture()).blobs}
    assert counting.count("GET", "blobs") == len(wanted), "each blob the daemon needed was fetched once"
    await mirror.services.background.join()

    counting.reset()
    async with DockerDaemon(sandbox, tmp_path / "second", daemon_json) as second:
        for label, reference in PULLS:
            await second.docker("pull", reference)
            await assert_pulled(second, reference, registry.images[label])
    assert counting.count() == 0, f"the second daemon's pulls reached the upstream: {dict(counting.requests)}"


async def test_a_pull_the_mirror_refuses_fails_on_loopback(
        sandbox: Sandbox, counting: Counting, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    async with DockerDaemon(sandbox, tmp_path / "daemon", snippet("docker/daemon.json", mirror.host)) as daemon:
        result = await daemon.docker("pull", "nothere:1.0", check=False)
        listed = await daemon.docker("image", "ls", "--quiet")
    assert counting.count("GET", "manifests") + counting.count("HEAD", "manifests") >= 1, "the mirror was asked"
    assert result.returncode != 0
    # Docker fell back to Docker Hub itself, which the sandbox resolves to loopback.
    assert '"https://registry-1.docker.io/v2/": dial tcp 127.0.0.1:443: connect: connection refused' in result.stderr, (
        result.stderr)
    assert listed.stdout.strip() == ""
