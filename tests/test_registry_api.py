"""The pull API against a real upstream (CNCF distribution), watched through a counting
pass-through so every test can say exactly what reached the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Counting, MirrorFactory, Registry
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    push_image,
    push_index,
    random_layer,
)

ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


async def get(client: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with client.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def error_code(response: aiohttp.ClientResponse) -> str:
    body = await response.json(content_type=None)
    return str(body["errors"][0]["code"])


async def test_base_endpoint_announces_registry_api(make_mirror: MirrorFactory, counting: Counting,
                                                    client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    status, headers, _ = await get(client, f"{mirror.url}/v2/")
    assert status == 200
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert counting.count() == 0


@pytest.mark.parametrize("label", ["single", "docker", "index", "list", "many"])
async def test_manifest_by_tag_is_upstream_bytes_then_cached(label: str, make_mirror: MirrorFactory,
                                                             registry: Registry, counting: Counting,
                                                             client: aiohttp.ClientSession) -> None:
    image = registry.images[label]
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.tag}"

    status, headers, body = await get(client, url, Accept=ACCEPT_ALL)
    assert status == 200
    assert body == image.manifest
    assert headers["Docker-Content-Digest"] == image.digest
    assert headers["Content-Type"] == image.media_type
    assert headers["X-Mirror-Cache"] == "MISS"

    counting.reset()
    status, headers, body = await get(client, url, Accept=ACCEPT_ALL)
    assert (status, body, headers["X-Mirror-Cache"]) == (200, image.manifest, "HIT")
    async with client.head(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(image.manifest))
        assert response.headers["Docker-Content-Digest"] == image.digest
    by_digest = f"{mirror.url}/v2/{image.name}/manifests/{image.digest}"
    status, headers, body = await get(client, by_digest, Accept=ACCEPT_ALL)
    assert (status, body) == (200, image.manifest)
    assert counting.count() == 0


async def test_bare_and_library_names_reach_the_same_image(make_mirror: MirrorFactory, registry: Registry,
                                                           counting: Counting,
                                                           client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]
    mirror = await make_mirror({"docker.io": counting.url})
    _, _, bare = await get(client, f"{mirror.url}/v2/alpine/manifests/3.19", Accept=ACCEPT_ALL)
    _, headers, library = await get(client, f"{mirror.url}/v2/library/alpine/manifests/3.19", Accept=ACCEPT_ALL)
    assert bare == library == image.manifest
    assert headers["X-Mirror-Cache"] == "HIT"
    assert counting.count("GET", "manifests") == 1


async def test_narrow_accept_gets_what_it_accepts_and_does_not_retag(make_mirror: MirrorFactory,
                                                                     registry: Registry, counting: Counting,
                                                                     client: aiohttp.ClientSession) -> None:
    """An old client that only takes Docker schema2 must not get a manifest list, and must not
    change what the tag means for everyone else."""
    image = registry.images["list"]
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.tag}"
    _, headers, body = await get(client, url, Accept=ACCEPT_ALL)
    assert headers["Content-Type"] == DOCKER_LIST

    _, headers, body = await get(client, url, Accept=DOCKER_MANIFEST)
    assert headers["Content-Type"] == DOCKER_MANIFEST
    assert json.loads(body)["mediaType"] == DOCKER_MANIFEST

    _, headers, body = await get(client, url, Accept=ACCEPT_ALL)
    assert (headers["Content-Type"], body) == (DOCKER_LIST, image.manifest)


async def test_narrow_accept_that_takes_the_tags_form_hits_the_cache(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]  # an OCI manifest
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.tag}"
    for cache in ("MISS", "HIT", "HIT"):
        status, headers, body = await get(client, url, Accept=OCI_MANIFEST)
        assert (status, headers["X-Mirror-Cache"], body) == (200, cache, image.manifest)
    assert counting.count("GET", "manifests") == 1


async def test_blob_miss_then_hit_with_ranges(make_mirror: MirrorFactory, registry: Registry,
                                              counting: Counting, client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]
    digest, data = next((d, b) for d, b in image.blobs.items() if len(b) > 300)
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/blobs/{digest}"

    async with client.head(url) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        assert response.headers["Docker-Content-Digest"] == digest
    assert counting.count("GET", "blobs") == 0, "HEAD of an uncached blob must not download it"

    status, headers, body = await get(client, url, Range="bytes=10-109")
    assert status == 206
    assert body == data[10:110]
    assert headers["Content-Range"] == f"bytes 10-109/{len(data)}"
    await mirror.services.background.join()

    status, headers, body = await get(client, url)
    assert (status, body, headers["X-Mirror-Cache"]) == (200, data, "HIT")
    assert hashlib.sha256(body).hexdigest() == digest.removeprefix("sha256:")
    status, headers, body = await get(client, url, Range="bytes=-50")
    assert (status, body) == (206, data[-50:])
    async with client.get(url, headers={"Range": f"bytes={len(data) + 10}-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"
        assert await error_code(response) == "RANGE_INVALID"
    assert counting.count("GET", "blobs") == 1


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
@pytest.mark.parametrize("header", ["bytes=abc", "bytes=50-10", "lines=1-2"])
async def test_malformed_range_is_ignored(cached: bool, header: str, make_mirror: MirrorFactory,
                                          registry: Registry, counting: Counting,
                                          client: aiohttp.ClientSession) -> None:
    """RFC 9110: a Range that cannot be parsed is ignored, and the whole blob is sent."""
    image = registry.images["docker"]
    digest, data = next(iter(image.blobs.items()))
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/blobs/{digest}"
    if cached:
        await get(client, url)
        await mirror.services.background.join()
    status, headers, body = await get(client, url, Range=header)
    assert (status, body) == (200, data)
    assert "Content-Range" not in headers
    assert headers["X-Mirror-Cache"] == ("HIT" if cached else "MISS")


async def test_tags_list_passes_through_with_paging(make_mirror: MirrorFactory, registry: Registry,
                                                    counting: Counting, client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    status, _, body = await get(client, f"{mirror.url}/v2/alpine/tags/list")
    assert status == 200
    assert json.loads(body) == {"name": "library/alpine", "tags": ["3.19"]}

    # distribution 2.8 does not paginate tag lists: paging is covered in test_tags.py.


async def test_concurrent_manifest_misses_share_one_upstream_fetch(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    image = registry.images["many"]
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.tag}"
    results = await asyncio.gather(*(get(client, url, Accept=ACCEPT_ALL) for _ in range(10)))
    assert all(body == image.manifest for _, _, body in results)
    assert counting.count("GET", "manifests") == 1


async def test_tag_ttl_revalidates_with_head_only(make_mirror: MirrorFactory, registry: Registry,
                                                  counting: Counting, client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]
    now = [1000.0]
    mirror = await make_mirror({"docker.io": counting.url}, tag_ttl=60, clock=lambda: now[0],
                               stale_while_revalidate=False)
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.tag}"
    await get(client, url, Accept=ACCEPT_ALL)
    counting.reset()

    now[0] += 59
    _, headers, _ = await get(client, url, Accept=ACCEPT_ALL)
    assert headers["X-Mirror-Cache"] == "HIT"
    assert counting.count() == 0, "a tag younger than its TTL is served without asking the upstream"

    now[0] += 2
    _, headers, body = await get(client, url, Accept=ACCEPT_ALL)
    assert (headers["X-Mirror-Cache"], body) == ("REVALIDATED", image.manifest)
    assert counting.count("HEAD", "manifests") == 1
    assert counting.count("GET") == 0

    _, headers, _ = await get(client, url, Accept=ACCEPT_ALL)
    assert headers["X-Mirror-Cache"] == "HIT", "revalidation restarts the TTL"


async def test_digests_are_never_revalidated(make_mirror: MirrorFactory, registry: Registry,
                                             counting: Counting, client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]
    mirror = await make_mirror({"docker.io": counting.url}, tag_ttl=0)
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.digest}"
    await get(client, url, Accept=ACCEPT_ALL)
    counting.reset()
    for _ in range(3):
        status, _, body = await get(client, url, Accept=ACCEPT_ALL)
        assert (status, body) == (200, image.manifest)
    assert counting.count() == 0


async def test_cached_blob_is_not_served_to_a_repository_that_does_not_have_it(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    """Design invariant 5: global de-duplication is not a way around upstream access control."""
    team = registry.images["team"]
    digest = next(iter(team.blobs))
    mirror = await make_mirror({"docker.io": counting.url})
    status, _, _ = await get(client, f"{mirror.url}/v2/team/app/blobs/{digest}")
    assert status == 200
    await mirror.services.background.join()

    async with client.get(f"{mirror.url}/v2/library/alpine/blobs/{digest}") as response:
        assert response.status == 404
        assert await error_code(response) == "BLOB_UNKNOWN"
    async with client.get(f"{mirror.url}/v2/team/app/manifests/{team.digest}",
                          headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
    async with client.get(f"{mirror.url}/v2/library/alpine/manifests/{team.digest}",
                          headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 404
        assert await error_code(response) == "MANIFEST_UNKNOWN"


async def test_stale_tag_served_when_upstream_is_gone(make_mirror: MirrorFactory, registry: Registry,
                                                      client: aiohttp.ClientSession) -> None:
    image = registry.images["docker"]
    now = [0.0]
    mirror = await make_mirror({"docker.io": registry.url, "other.example": "http://127.0.0.1:9"},
                               tag_ttl=10, clock=lambda: now[0])
    url = f"{mirror.url}/v2/{image.name}/manifests/{image.tag}"
    await get(client, url, Accept=ACCEPT_ALL)
    digest = next(iter(image.blobs))
    await get(client, f"{mirror.url}/v2/{image.name}/blobs/{digest}")
    await mirror.services.background.join()

    # Point the same cache at an upstream that is down.
    await mirror.server.close()
    down = await make_mirror({"docker.io": "http://127.0.0.1:9"}, tag_ttl=10, clock=lambda: now[0],
                             cache_dir=mirror.services.config.cache_dir, stale_while_revalidate=False)
    now[0] += 3600
    status, headers, body = await get(client, f"{down.url}/v2/{image.name}/manifests/{image.tag}", Accept=ACCEPT_ALL)
    assert (status, body, headers["X-Mirror-Cache"]) == (200, image.manifest, "STALE")
    status, _, blob = await get(client, f"{down.url}/v2/{image.name}/blobs/{digest}")
    assert (status, blob) == (200, image.blobs[digest])
    async with client.get(f"{down.url}/v2/{image.name}/manifests/never-cached") as response:
        assert response.status == 503
        assert await error_code(response) == "UNAVAILABLE"


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v2/Bad_Name/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/library/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/library/alpine/manifests/bad!tag", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/alpine/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    # A malformed name or an unconfigured registry is refused as such, whatever the reference.
    ("/v2/Bad_Name/manifests/.INVALID_MANIFEST_NAME", 400, "NAME_INVALID"),
    ("/v2/ghcr.io/owner/repo/manifests/.INVALID_MANIFEST_NAME", 403, "DENIED"),
    ("/v2/library/alpine/blobs/.INVALID_MANIFEST_NAME", 400, "DIGEST_INVALID"),
    ("/v2/library/alpine/tags/list?last=bad!tag", 400, "TAG_INVALID"),
    ("/v2/library/alpine/blobs/sha256:nothex", 400, "DIGEST_INVALID"),
    ("/v2/library/alpine/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"),
    ("/v2/library/alpine/blobs/latest", 400, "DIGEST_INVALID"),
    ("/v2/library/alpine/manifests/nope", 404, "MANIFEST_UNKNOWN"),
    ("/v2/library/nothere/tags/list", 404, "NAME_UNKNOWN"),
    (f"/v2/library/alpine/blobs/sha256:{'0' * 64}", 404, "BLOB_UNKNOWN"),
    ("/v2/ghcr.io/owner/repo/manifests/latest", 403, "DENIED"),
    ("/ghcr.io/v2/owner/repo/manifests/latest", 403, "DENIED"),
    ("/v2/library/alpine/manifests/latest?ns=quay.io", 403, "DENIED"),
    ("/v2/library/alpine/nonsense", 404, "NOT_FOUND"),
    ("/elsewhere/v2/library/alpine/manifests/latest", 404, "NOT_FOUND"),
    ("/docker.io/extra/v2/library/alpine/manifests/latest", 404, "NOT_FOUND"),
    ("/index.html", 404, "NOT_FOUND"),
])
async def test_errors_are_oci_json(path: str, status: int, code: str, make_mirror: MirrorFactory,
                                   counting: Counting, client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    # encoded=True: send the path as written, without the client resolving `..` first.
    async with client.get(URL(f"{mirror.url}{path}", encoded=True), headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert await error_code(response) == code


@pytest.mark.parametrize(("reference", "status", "code"), [
    (".INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),  # the OCI conformance suite's missing manifest
    ("t" * 129, 404, "MANIFEST_UNKNOWN"),  # one past the tag grammar's 128 characters
    ("t" * 200, 404, "MANIFEST_UNKNOWN"),
    ("-leading-dash", 404, "MANIFEST_UNKNOWN"),
    ("bad!tag", 404, "MANIFEST_UNKNOWN"),
    ("latest%00", 404, "MANIFEST_UNKNOWN"),
    ("%2e%2e", 404, "MANIFEST_UNKNOWN"),
    ("sha256:totallywrong", 400, "DIGEST_INVALID"),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_reference_no_manifest_can_have_is_refused_without_the_upstream_or_the_cache(
        method: str, reference: str, status: int, code: str, make_mirror: MirrorFactory, registry: Registry,
        counting: Counting, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    image = registry.images["single"]
    mirror = await make_mirror({"docker.io": counting.url}, cache_dir=tmp_path / "cache")
    before = sorted(tmp_path.rglob("*"))
    url = URL(f"{mirror.url}/v2/{image.name}/manifests/{reference}", encoded=True)
    async with client.request(method, url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        if method == "GET":
            error = (await response.json())["errors"][0]
            assert error["code"] == code
            if code == "MANIFEST_UNKNOWN":
                assert error["detail"] == {"reference": unquote(reference)[:100]}
    assert counting.count() == 0, "a reference no manifest can have reached the upstream"
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_writes_are_unsupported(method: str, make_mirror: MirrorFactory, counting: Counting,
                                      registry: Registry, client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]
    mirror = await make_mirror({"docker.io": counting.url})
    for path in (f"/v2/{image.name}/manifests/{image.tag}", f"/v2/{image.name}/blobs/uploads/",
                 f"/v2/{image.name}/blobs/{next(iter(image.blobs))}"):
        async with client.request(method, f"{mirror.url}{path}", data=b"x") as response:
            assert response.status == 405
            assert await error_code(response) == "UNSUPPORTED"
    assert counting.count() == 0


@pytest.mark.parametrize("path_prefix", ["", "/some/prefix"])
async def test_registry_host_prefix_and_ns_route_to_the_named_upstream(
        path_prefix: str, make_mirror: MirrorFactory, registry: Registry, counting: Counting,
        client: aiohttp.ClientSession) -> None:
    image = registry.images["team"]
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url},
                               path_prefix=path_prefix, aliases=("test",))
    for mount in {"", path_prefix}:
        for url in (f"{mirror.url}{mount}/v2/registry.test/{image.name}/manifests/{image.tag}",
                    f"{mirror.url}{mount}/v2/{image.name}/manifests/{image.tag}?ns=registry.test",
                    f"{mirror.url}{mount}/registry.test/v2/{image.name}/manifests/{image.tag}",
                    f"{mirror.url}{mount}/test/v2/{image.name}/manifests/{image.tag}",
                    # The client's ns wins over a prefix that only served to reach the mirror.
                    f"{mirror.url}{mount}/docker.io/v2/{image.name}/manifests/{image.tag}?ns=registry.test"):
            status, _, body = await get(client, url, Accept=ACCEPT_ALL)
            assert (status, body) == (200, image.manifest), url
        for base in (f"{mount}/v2/", f"{mount}/v2", f"{mount}/registry.test/v2/"):
            status, headers, _ = await get(client, f"{mirror.url}{base}")
            assert (status, headers["Docker-Distribution-API-Version"]) == (200, "registry/2.0"), base
    assert counting.count("GET", "manifests") == 1


async def test_moved_tag_is_checked_against_each_clients_accept(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    """A tag that moves from a Docker manifest to an OCI index must not reach a client that
    only takes Docker manifests as an index."""
    await asyncio.to_thread(push_image, registry.url, "library/moving", "1", layers=[random_layer(64, 8)],
                            media_type="docker")
    now = [0.0]
    mirror = await make_mirror({"docker.io": counting.url}, tag_ttl=10, clock=lambda: now[0],
                               stale_while_revalidate=False)
    url = f"{mirror.url}/v2/moving/manifests/1"
    status, headers, _ = await get(client, url, Accept=ACCEPT_ALL)
    assert (status, headers["Content-Type"]) == (200, DOCKER_MANIFEST)

    await asyncio.to_thread(push_index, registry.url, "library/moving", "1", platforms=[("linux", "amd64")])
    now[0] += 60
    async with client.get(url, headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 404 or response.headers["Content-Type"] == DOCKER_MANIFEST
    status, headers, _ = await get(client, url, Accept=ACCEPT_ALL)
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)


async def test_a_tag_deleted_upstream_is_dropped_and_a_missing_one_asked_once(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    """The real registry deletes a manifest (and so its tags): past the TTL the mirror drops
    the tag and says 404, keeps the content by digest, and remembers the 404 for negative_ttl."""
    await asyncio.to_thread(push_image, registry.url, "library/doomed", "1", layers=[random_layer(64, 9)],
                            media_type="oci")
    now = [0.0]
    mirror = await make_mirror({"docker.io": counting.url}, tag_ttl=10, clock=lambda: now[0],
                               stale_while_revalidate=False)
    url = f"{mirror.url}/v2/doomed/manifests/1"
    status, headers, body = await get(client, url, Accept=ACCEPT_ALL)
    assert status == 200
    digest = headers["Docker-Content-Digest"]
    async with client.delete(f"{registry.url}/v2/library/doomed/manifests/{digest}") as deleted:
        assert deleted.status == 202

    now[0] += 11
    counting.reset()
    for _ in range(5):
        async with client.get(url, headers={"Accept": ACCEPT_ALL}) as response:
            assert response.status == 404
            assert await error_code(response) == "MANIFEST_UNKNOWN"
        now[0] += 1
    assert counting.count(kind="manifests") == 1, "the 404 is remembered: one upstream request for five"
    assert await mirror.services.index.tag("docker.io", "library/doomed", "1") is None
    status, headers, cached = await get(client, f"{mirror.url}/v2/doomed/manifests/{digest}", Accept=ACCEPT_ALL)
    assert (status, cached, headers["X-Mirror-Cache"]) == (200, body, "HIT")
