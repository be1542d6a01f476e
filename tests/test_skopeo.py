"""A real client, skopeo, pulling through the mirror from a real upstream registry."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path

import pytest

from tests.conftest import Counting, MirrorFactory, Registry
from tests.support.images import for_platform, host_architecture, push_index
from tests.support.skopeo import assert_same_tree, copy, skopeo_run
from tests.support.snippets import snippet


@pytest.mark.parametrize(("label", "all_images"), [
    ("single", False), ("docker", False), ("many", False), ("index", True), ("list", True),
])
async def test_copy_through_mirror_is_identical_and_second_copy_is_free(
        label: str, all_images: bool, skopeo: str, registry: Registry, counting: Counting,
        make_mirror: MirrorFactory, tmp_path: Path) -> None:
    image = registry.images[label]
    short = image.name.removeprefix("library/")
    mirror = await make_mirror({"docker.io": counting.url})

    await copy(skopeo, f"{registry.host}/{image.name}:{image.tag}", tmp_path / "direct", all_images)
    await copy(skopeo, f"{mirror.host}/{short}:{image.tag}", tmp_path / "first", all_images)
    assert_same_tree(tmp_path / "direct", tmp_path / "first")
    assert counting.count("GET", "blobs") == len(image.blobs), "each blob is downloaded exactly once"
    await mirror.services.background.join()

    counting.reset()
    await copy(skopeo, f"{mirror.host}/{image.name}:{image.tag}", tmp_path / "second", all_images)
    assert_same_tree(tmp_path / "direct", tmp_path / "second")
    assert counting.count() == 0, f"second copy reached the upstream: {dict(counting.requests)}"


async def test_inspect_through_mirror(skopeo: str, registry: Registry, counting: Counting,
                                      make_mirror: MirrorFactory) -> None:
    image = registry.images["list"]
    mirror = await make_mirror({"docker.io": counting.url})
    raw = await skopeo_run(skopeo, "inspect", "--raw", "--tls-verify=false",
                           f"docker://{mirror.host}/dockerlist:{image.tag}")
    assert raw.encode() == image.manifest
    info = json.loads(await skopeo_run(skopeo, "inspect", "--tls-verify=false",
                                       f"docker://{mirror.host}/dockerlist:{image.tag}"))
    assert info["Architecture"] == host_architecture()
    resolved = for_platform(image, host_architecture())
    assert info["Layers"] == [layer["digest"] for layer in json.loads(resolved.manifest)["layers"]]


async def test_readme_skopeo_commands(skopeo: str, registry: Registry, make_mirror: MirrorFactory,
                                      tmp_path: Path) -> None:
    prometheus = await asyncio.to_thread(push_index, registry.url, "prometheus/prometheus", "v2.53.0",
                                         platforms=[("linux", "amd64"), ("linux", "arm64")])
    mirror = await make_mirror({"docker.io": registry.url, "quay.io": registry.url})
    for line in snippet("skopeo/copy.sh", mirror.host).splitlines():
        argv = shlex.split(line)
        assert argv[0] == "skopeo"
        process = await asyncio.create_subprocess_exec(skopeo, *argv[1:], cwd=tmp_path, stderr=asyncio.subprocess.PIPE)
        _, err = await process.communicate()
        assert process.returncode == 0, f"{line}: {err.decode()}"
    alpine = registry.images["single"]
    assert (tmp_path / "alpine" / "manifest.json").read_bytes() == alpine.manifest
    assert (tmp_path / "prometheus" / "manifest.json").read_bytes() == prometheus.manifest
    copied = tmp_path / "prometheus"
    for child in prometheus.children:  # --all copies every platform
        assert (copied / f"{child.digest.removeprefix('sha256:')}.manifest.json").read_bytes() == child.manifest
    for digest, data in prometheus.blobs.items():
        assert (copied / digest.removeprefix("sha256:")).read_bytes() == data
