"""The kubelet's pulls: containerd's CRI plugin, with `config_path` pointing at the README's
hosts.toml files, pulling through the mirror when called as the kubelet calls it (CRI
`ImageService.PullImage` over gRPC), not through `ctr`.

Every registry name resolves to loopback inside the sandbox, where nothing listens on 443: an
image reaches the node through the mirror or not at all."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest

from mirror.config import AuthConfig
from tests.conftest import Captured, Counting, CountingFactory, MirrorFactory, Registry, require_binary
from tests.support.clients import CRI_NAMESPACE, Containerd, Sandbox
from tests.support.cri import Image, ImageService, Pod
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    config_of,
    for_platform,
    host_architecture,
)
from tests.support.snippets import snippet
from tests.test_auth import PASSWORDS, basic, write_htpasswd
from tests.test_containerd import expected_content, expected_snapshots, hosts_dir

POD = Pod(name="web-0", uid="6f1c2a9e-0000-4000-8000-000000000001", namespace="default",
          annotations={"kubernetes.io/config.source": "api", "example.com/owner": "team"})
"""The pod the kubelet pulls for: its name and annotations go with each pull."""

# The hosts.toml files of a node whose pods use images from Docker Hub and quay.io.
HOSTS = {"docker.io": "containerd/docker.io/hosts.toml", "quay.io": "containerd/quay.io/hosts.toml"}


@pytest.fixture(scope="module", autouse=True)
def containerd_binaries() -> None:
    require_binary("containerd")
    require_binary("ctr")


@contextlib.asynccontextmanager
async def kubelet_node(sandbox: Sandbox, directory: Path,
                       hosts: Path) -> AsyncIterator[tuple[Containerd, ImageService]]:
    """containerd with its CRI plugin reading `hosts`, and the kubelet's gRPC client to it,
    once the plugin answers."""
    async with Containerd(sandbox, directory, cri_hosts_dir=hosts) as containerd, \
            ImageService(containerd.address) as images:
        await images.wait_ready()
        yield containerd, images


async def upstream_digest(client: aiohttp.ClientSession, registry: Registry, repository: str, tag: str) -> str:
    """The digest the upstream registry itself gives the tag."""
    accept = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
    async with client.head(f"{registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}) as reply:
        assert reply.status == 200, reply.status
        return reply.headers["Docker-Content-Digest"]


def image_id(image: PushedImage) -> str:
    """What CRI reports as the image's ID (and the kubelet as the container's imageID): the
    digest of the config of the platform this node runs."""
    return config_of(for_platform(image, host_architecture()))[0]


def stored_size(image: PushedImage) -> int:
    """The size CRI reports (`crictl images`): every manifest and blob the node stored for it."""
    target = for_platform(image, host_architecture())
    return sum(len(data) for data in {image.digest: image.manifest, target.digest: target.manifest,
                                      **target.blobs}.values())


def served_blobs(captured: Captured, namespace: str) -> dict[str, list[tuple[int, str | None, str]]]:
    """Blob GETs the mirror answered for containerd's `?ns=` registry: digest -> [(status, cache, agent)]."""
    served: dict[str, list[tuple[int, str | None, str]]] = {}
    for entry in captured.access():
        path, status, cache = entry["path"], entry["status"], entry["cache"]
        assert isinstance(path, str) and isinstance(status, int) and (cache is None or isinstance(cache, str))
        if entry["method"] == "GET" and "/blobs/sha256:" in path and path.endswith(f"?ns={namespace}"):
            digest = path.split("/blobs/")[1].split("?")[0]
            served.setdefault(digest, []).append((status, cache, str(entry["user_agent"])))
    return served


async def test_kubelet_pulls_by_tag_through_the_mirror(
        sandbox: Sandbox, registry: Registry, make_counting: CountingFactory, make_mirror: MirrorFactory,
        captured: Captured, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    hub, quay = await make_counting(registry.url), await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": hub.url, "quay.io": quay.url})
    hosts = hosts_dir(tmp_path / "certs.d", mirror.host, HOSTS)
    # (what a pod spec says, the name CRI gives it, the image, its repository upstream, its tag)
    pulls = [("quay.io/team/app:v1", "quay.io/team/app:v1", registry.images["team"], "team/app", "v1"),
             ("alpine:3.19", "docker.io/library/alpine:3.19", registry.images["single"], "library/alpine", "3.19"),
             ("docker.io/library/multi:1.0", "docker.io/library/multi:1.0", registry.images["index"],
              "library/multi", "1.0")]

    async with kubelet_node(sandbox, tmp_path / "node", hosts) as (containerd, images):
        for spec, name, image, repository, tag in pulls:
            assert await images.pull(spec, pod=POD) == image_id(image)
            status = await images.status(spec)
            assert status is not None, f"{spec} was pulled but the node does not have it"
            digest = await upstream_digest(client, registry, repository, tag)
            repository_name = name.rsplit(":", 1)[0]
            assert status == Image(id=image_id(image), repo_tags=[name], repo_digests=[f"{repository_name}@{digest}"],
                                   size=stored_size(image), pinned=False)
        assert {i.id for i in await images.list()} == {image_id(image) for _, _, image, _, _ in pulls}
        # Everything the node needs to run the pods is there: the content, and the layers unpacked
        # (containerd checks each against the config's diff_ids on the way).
        assert await containerd.content(CRI_NAMESPACE) == set().union(*(expected_content(i) for _, _, i, _, _ in pulls))
        assert await containerd.snapshots(CRI_NAMESPACE) == set().union(
            *(expected_snapshots(i) for _, _, i, _, _ in pulls))

    # Each registry's images went to its own upstream, through the mirror, each blob once.
    assert ("GET", "/v2/team/app/manifests/v1") in quay.requests
    assert not any("team/app" in path for (_, path) in hub.requests), "quay.io's image was routed to docker.io"
    assert not any("library/" in path for (_, path) in quay.requests), "docker.io's images were routed to quay.io"
    blobs = {d for _, _, image, _, _ in pulls for d in for_platform(image, host_architecture()).blobs}
    assert hub.count("GET", "blobs") + quay.count("GET", "blobs") == len(blobs)
    team = for_platform(registry.images["team"], host_architecture()).blobs
    served = served_blobs(captured, "quay.io")
    assert set(served) == set(team), "the mirror did not serve quay.io's blobs to containerd"
    assert all(answers == [(200, "MISS", answers[0][2])] and answers[0][2].startswith("containerd/")
               for answers in served.values()), served


async def test_kubelet_pulls_by_digest_through_the_mirror(
        sandbox: Sandbox, registry: Registry, make_counting: CountingFactory, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A pod spec that pins its images by digest, as a deployment tool writes them."""
    hub, quay = await make_counting(registry.url), await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": hub.url, "quay.io": quay.url})
    hosts = hosts_dir(tmp_path / "certs.d", mirror.host, HOSTS)
    team, dockerlist = registry.images["team"], registry.images["list"]
    pinned = {f"quay.io/team/app@{await upstream_digest(client, registry, 'team/app', 'v1')}": team,
              f"docker.io/library/dockerlist@{await upstream_digest(client, registry, 'library/dockerlist', '1.0')}":
                  dockerlist}

    async with kubelet_node(sandbox, tmp_path / "node", hosts) as (containerd, images):
        for reference, image in pinned.items():
            assert await images.pull(reference, pod=POD) == image_id(image)
            status = await images.status(reference)
            assert status is not None, f"{reference} was pulled but the node does not have it"
            assert (status.id, status.repo_tags, status.repo_digests) == (image_id(image), [], [reference])
        assert await containerd.snapshots(CRI_NAMESPACE) == expected_snapshots(team) | expected_snapshots(dockerlist)

    assert quay.requests[("GET", f"/v2/team/app/manifests/{team.digest}")] == 1
    assert hub.requests[("GET", f"/v2/library/dockerlist/manifests/{dockerlist.digest}")] == 1
    asked = [path for (_, path) in [*hub.requests, *quay.requests] if "/manifests/" in path]
    assert all("/manifests/sha256:" in path for path in asked), f"a pull by digest asked for a tag: {asked}"


async def test_a_removed_image_comes_back_from_the_mirror_cache(
        sandbox: Sandbox, registry: Registry, counting: Counting, make_mirror: MirrorFactory, captured: Captured,
        tmp_path: Path) -> None:
    """The kubelet's image GC removes an image; the next pod that needs it pulls it again, and
    that pull is the mirror's cache's alone."""
    mirror = await make_mirror({"docker.io": counting.url, "quay.io": counting.url})
    hosts = hosts_dir(tmp_path / "certs.d", mirror.host, HOSTS)
    pulls = {"quay.io/team/app:v1": registry.images["team"], "docker.io/library/multi:1.0": registry.images["index"]}
    blobs = {d for image in pulls.values() for d in for_platform(image, host_architecture()).blobs}

    async with kubelet_node(sandbox, tmp_path / "node", hosts) as (containerd, images):
        first = {reference: await images.pull(reference, pod=POD) for reference in pulls}
        before = {reference: await images.status(reference) for reference in pulls}
        assert counting.count("GET", "blobs") == len(blobs)
        await mirror.services.background.join()

        for reference in pulls:
            await images.remove(reference)
            assert await images.status(reference) is None
        assert await images.list() == []
        assert await containerd.content(CRI_NAMESPACE) == set(), "the node kept the content: nothing to pull again"

        counting.reset()
        captured.records.clear()
        again = {reference: await images.pull(reference, pod=POD) for reference in pulls}
        assert again == first
        assert {reference: await images.status(reference) for reference in pulls} == before
        assert await containerd.content(CRI_NAMESPACE) == set().union(*(expected_content(i) for i in pulls.values()))

    assert counting.count() == 0, f"the second pull reached the upstream: {counting.requests}"
    served = {**served_blobs(captured, "quay.io"), **served_blobs(captured, "docker.io")}
    assert set(served) == blobs, "containerd did not fetch the blobs again"
    assert all(status == 200 and cache == "HIT" for answers in served.values() for status, cache, _ in answers), served


async def test_kubelet_pulls_with_the_account_in_hosts_toml(
        sandbox: Sandbox, registry: Registry, counting: Counting, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    """What the README says of the credentials hosts.toml: the account is there for the kubelet's
    pulls too (CRI reads the hosts directory at each pull)."""
    mirror = await make_mirror({"quay.io": counting.url},
                               auth=AuthConfig(htpasswd=write_htpasswd(tmp_path / "htpasswd")))
    hosts = hosts_dir(tmp_path / "certs.d", mirror.host, {"quay.io": "containerd/quay.io/hosts.toml"})
    team = registry.images["team"]

    async with kubelet_node(sandbox, tmp_path / "node", hosts) as (_, images):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await images.pull("quay.io/team/app:v1", pod=POD)
        assert refused.value.code() == grpc.StatusCode.UNKNOWN
        assert "401 Unauthorized" in str(refused.value.details()), refused.value.details()
        assert await images.status("quay.io/team/app:v1") is None
        assert counting.count() == 0, "an anonymous pull reached the upstream"

        credentials = snippet("containerd/credentials/hosts.toml", mirror.host)
        assert basic("alice", PASSWORDS["alice"]) in credentials
        (hosts / "quay.io" / "hosts.toml").write_text(credentials)
        assert await images.pull("quay.io/team/app:v1", pod=POD) == image_id(team)
        status = await images.status("quay.io/team/app:v1")
        assert status is not None and status.repo_digests == [f"quay.io/team/app@{team.digest}"]
