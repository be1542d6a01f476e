"""podman and skopeo, configured with the README's registries.conf (the mirror style CRI-O shares
through containers/image: `/v2/<registry-host>/...`), pulling two registries through one mirror."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import CountingFactory, MirrorFactory, Registry, require_binary
from tests.support.clients import Podman, Sandbox
from tests.support.images import PushedImage, config_of, for_platform, host_architecture
from tests.support.snippets import snippet


async def assert_pulled(podman: Podman, reference: str, image: PushedImage) -> None:
    """podman holds the upstream's image for its platform: config digest as ID, layers unpacked
    and checked against the config's diff_ids."""
    config_digest, config = config_of(for_platform(image, host_architecture()))
    info = await podman.inspect(reference)
    assert f"sha256:{info['Id']}" == config_digest
    assert info["Digest"] == image.digest
    assert info["RootFS"] == {"Type": "layers", "Layers": config["rootfs"]["diff_ids"]}


PULLS = [("docker.io/library/alpine:3.19", "single"), ("docker.io/library/dockerlist:1.0", "list"),
         ("quay.io/team/app:v1", "team")]


async def test_podman_pulls_two_registries_through_registries_conf_mirrors(
        sandbox: Sandbox, registry: Registry, make_counting: CountingFactory, make_mirror: MirrorFactory,
        tmp_path: Path) -> None:
    require_binary("podman")
    hub, quay = await make_counting(registry.url), await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": hub.url, "quay.io": quay.url})
    conf = tmp_path / "registries.conf"
    conf.write_text(snippet("containers/registries.conf", mirror.host))

    async with Podman(sandbox, tmp_path / "first", conf) as first:
        for reference, label in PULLS:
            await first.podman("pull", reference)
            await assert_pulled(first, reference, registry.images[label])
    assert ("GET", "/v2/team/app/manifests/v1") in quay.requests
    assert not any("team/app" in path for (_, path) in hub.requests), "quay.io's image was routed to docker.io"
    assert not any("library/" in path for (_, path) in quay.requests), "docker.io's images were routed to quay.io"
    blobs = {d for _, label in PULLS for d in for_platform(registry.images[label], host_architecture()).blobs}
    assert hub.count("GET", "blobs") + quay.count("GET", "blobs") == len(blobs), "each blob was fetched once"
    await mirror.services.background.join()

    hub.reset()
    quay.reset()
    async with Podman(sandbox, tmp_path / "second", conf) as second:
        for reference, label in PULLS:
            await second.podman("pull", reference)
            await assert_pulled(second, reference, registry.images[label])
    assert hub.count() + quay.count() == 0, f"second pulls reached an upstream: {hub.requests} {quay.requests}"


async def test_podman_pull_the_mirror_refuses_fails_on_loopback(
        sandbox: Sandbox, registry: Registry, make_counting: CountingFactory, make_mirror: MirrorFactory,
        tmp_path: Path) -> None:
    require_binary("podman")
    hub = await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": hub.url})  # quay.io is not served: 403 DENIED
    conf = tmp_path / "registries.conf"
    conf.write_text(snippet("containers/registries.conf", mirror.host))
    async with Podman(sandbox, tmp_path / "podman", conf) as podman:
        result = await podman.podman("pull", "quay.io/team/app:v1", check=False)
        listed = await podman.podman("images", "--quiet")
    assert result.returncode != 0
    assert "registry 'quay.io' is not configured on this mirror" in result.stderr, result.stderr
    assert '"https://quay.io/v2/": dial tcp 127.0.0.1:443: connect: connection refused' in result.stderr
    assert listed.stdout.strip() == ""
    assert hub.count() == 0


async def test_skopeo_reads_the_same_registries_conf(
        sandbox: Sandbox, skopeo: str, registry: Registry, make_counting: CountingFactory,
        make_mirror: MirrorFactory, tmp_path: Path) -> None:
    quay = await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "quay.io": quay.url})
    conf = tmp_path / "registries.conf"
    conf.write_text(snippet("containers/registries.conf", mirror.host))
    image = registry.images["team"]
    result = await sandbox.run(skopeo, "--registries-conf", str(conf), "inspect", "--no-tags",
                              "docker://quay.io/team/app:v1")
    assert json.loads(result.stdout)["Digest"] == image.digest
    await sandbox.run(skopeo, "--registries-conf", str(conf), "copy", "docker://quay.io/team/app:v1",
                      f"dir:{tmp_path / 'copy'}")
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == image.manifest
    for digest, data in image.blobs.items():
        assert (tmp_path / "copy" / digest.removeprefix("sha256:")).read_bytes() == data
    assert ("GET", "/v2/team/app/manifests/v1") in quay.requests
