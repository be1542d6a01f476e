"""The referrers API through the mirror: against CNCF distribution, which has no referrers API
(the mirror reads the spec's fallback tag), and against a scriptable upstream that has one (and
pages it). Freshness, stale-if-error, replacement, visibility, eviction and pinning."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import AccessRule, AuthConfig, EvictionConfig
from mirror.oci import OCI_INDEX, Digest, referrers_index
from tests.conftest import Captured, Counting, MirrorFactory
from tests.support.artifacts import artifact_manifest, descriptor_of, push_artifact, remove_referrer
from tests.support.fake_upstream import FakeUpstream, Forced
from tests.support.images import PushedImage, push_image, random_layer
from tests.support.pulls import ACCEPT, add_image, blob_url, manifest_url
from tests.support.registry import LocalRegistry as Registry
from tests.test_eviction import KB, cached, pull

SBOM = "application/spdx+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def image(registry: Registry, name: str) -> PushedImage:
    return push_image(registry.url, name, "v1", layers=[random_layer(2048, hash(name) & 0xFFFF)])


async def referrers(client: aiohttp.ClientSession, url: str, artifact_type: str | None = None
                    ) -> tuple[int, dict[str, Any], Any]:
    params = {"artifactType": artifact_type} if artifact_type is not None else None
    async with client.get(url, params=params) as response:
        body = await response.read()
        return response.status, dict(response.headers), json.loads(body) if body else None


async def test_fallback_tag_schema_through_the_mirror(make_mirror: MirrorFactory, registry: Registry,
                                                      counting: Counting, client: aiohttp.ClientSession) -> None:
    """distribution answers the referrers API with 404: the mirror lists what the fallback tag
    holds, filters it itself, and serves the artifacts like any manifest and blob."""
    subject = image(registry, "refs/app")
    sbom = push_artifact(registry.url, "refs/app", descriptor_of(subject), SBOM, b'{"spdxVersion":"SPDX-2.3"}')
    signature = push_artifact(registry.url, "refs/app", descriptor_of(subject), SIGNATURE, b"signature")
    sbom_signature = push_artifact(registry.url, "refs/app", sbom, SIGNATURE, b"signature of the sbom")
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url})
    base = f"{mirror.url}/v2/registry.test/refs/app"

    status, headers, index = await referrers(client, f"{base}/referrers/{subject.digest}")
    assert status == 200 and headers["Content-Type"] == OCI_INDEX
    assert index["mediaType"] == OCI_INDEX and index["schemaVersion"] == 2
    assert index["manifests"] == [sbom, signature]
    assert "OCI-Filters-Applied" not in headers and headers["X-Mirror-Cache"] == "MISS"
    # One request to learn the upstream has no API, one for the fallback tag.
    assert counting.count("GET", "referrers") == 1 and counting.count("GET", "manifests") == 1

    status, headers, index = await referrers(client, f"{base}/referrers/{subject.digest}", SBOM)
    assert (status, index["manifests"]) == (200, [sbom])
    assert headers["OCI-Filters-Applied"] == "artifactType" and headers["X-Mirror-Cache"] == "HIT"
    _, _, index = await referrers(client, f"{base}/referrers/{subject.digest}", "application/none")
    assert index["manifests"] == []

    # Signatures of the SBOM: referrers all the way down.
    _, _, index = await referrers(client, f"{base}/referrers/{sbom['digest']}")
    assert index["manifests"] == [sbom_signature]
    # The upstream was asked for the API once: the mirror remembers it has none.
    assert counting.count("GET", "referrers") == 1

    for descriptor in (sbom, signature, sbom_signature):
        async with client.get(f"{base}/manifests/{descriptor['digest']}",
                              headers={"Accept": str(descriptor["mediaType"])}) as response:
            assert response.status == 200 and response.headers["Docker-Content-Digest"] == descriptor["digest"]
            layer = (await response.json())["layers"][0]
        async with client.get(f"{base}/blobs/{layer['digest']}") as response:
            assert response.status == 200 and len(await response.read()) == layer["size"]

    # The cosign-style and fallback tags pass through and are cached like any tag.
    tag = f"sha256-{subject.digest.removeprefix('sha256:')}"
    for _ in range(2):
        async with client.get(f"{base}/manifests/{tag}", headers={"Accept": OCI_INDEX}) as response:
            assert response.status == 200
            assert [m["digest"] for m in (await response.json())["manifests"]] == [sbom["digest"],
                                                                                  signature["digest"]]
    assert response.headers["X-Mirror-Cache"] == "HIT"


async def test_ttl_then_replacement_then_stale_if_error(make_mirror: MirrorFactory, registry: Registry,
                                                        counting: Counting, client: aiohttp.ClientSession) -> None:
    """A list is served for referrers_ttl, then asked for again and replaced whole (a removed
    signature is gone); an upstream that fails then gets the last list served STALE."""
    clock = Clock()
    subject = image(registry, "refs/ttl")
    first = push_artifact(registry.url, "refs/ttl", descriptor_of(subject), SIGNATURE, b"first")
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url}, clock=clock,
                               referrers_ttl=300.0, referrers_negative_ttl=60.0)
    url = f"{mirror.url}/v2/registry.test/refs/ttl/referrers/{subject.digest}"
    assert (await referrers(client, url))[2]["manifests"] == [first]

    second = push_artifact(registry.url, "refs/ttl", descriptor_of(subject), SIGNATURE, b"second")
    clock.now += 299
    _, headers, index = await referrers(client, url)
    assert index["manifests"] == [first] and headers["X-Mirror-Cache"] == "HIT"

    clock.now += 2
    _, headers, index = await referrers(client, url)
    assert index["manifests"] == [first, second] and headers["X-Mirror-Cache"] == "REVALIDATED"

    # A revocation: the first signature is taken away upstream, and so from the list.
    remove_referrer(registry.url, "refs/ttl", subject.digest, str(first["digest"]))
    clock.now += 301
    _, headers, index = await referrers(client, url)
    assert index["manifests"] == [second]

    # The upstream fails: the last list, stale, for as long as it fails.
    counting.failing = 503
    clock.now += 301
    for _ in range(2):
        status, headers, index = await referrers(client, url)
        assert (status, index["manifests"], headers["X-Mirror-Cache"]) == (200, [second], "STALE")


async def test_upstream_down_and_nothing_cached_is_a_503_never_an_empty_list(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, client: aiohttp.ClientSession) -> None:
    subject = image(registry, "refs/down")
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url})
    counting.failing = 503
    status, headers, body = await referrers(client, f"{mirror.url}/v2/registry.test/refs/down/referrers/"
                                                    f"{subject.digest}")
    assert status == 503 and int(headers["Retry-After"]) > 0
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    # The upstream asked for time: it is spared meanwhile, and the answer is the same.
    asked = counting.count()
    status, headers, body = await referrers(client, f"{mirror.url}/v2/registry.test/refs/down/referrers/"
                                                    f"{subject.digest}")
    assert status == 503 and int(headers["Retry-After"]) > 0 and counting.count() == asked


async def test_an_empty_list_has_a_shorter_ttl(make_mirror: MirrorFactory, registry: Registry,
                                               counting: Counting, client: aiohttp.ClientSession) -> None:
    clock = Clock()
    subject = image(registry, "refs/empty")
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url}, clock=clock,
                               referrers_ttl=300.0, referrers_negative_ttl=60.0)
    url = f"{mirror.url}/v2/registry.test/refs/empty/referrers/{subject.digest}"
    status, _, index = await referrers(client, url)
    assert (status, index["manifests"]) == (200, [])
    signature = push_artifact(registry.url, "refs/empty", descriptor_of(subject), SIGNATURE, b"late")
    clock.now += 59
    assert (await referrers(client, url))[2]["manifests"] == []
    clock.now += 2
    assert (await referrers(client, url))[2]["manifests"] == [signature]


@pytest.mark.parametrize("bad", ["sha256:xyz", "md5:abc", "latest"])
async def test_a_malformed_subject_is_a_400(bad: str, make_mirror: MirrorFactory, counting: Counting,
                                            client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": counting.url})
    async with client.get(f"{mirror.url}/v2/library/app/referrers/{bad}") as response:
        assert response.status == 400
        assert (await response.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert counting.count() == 0


def subject_digest(seed: str) -> str:
    return hashed(seed.encode())


def hashed(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_the_api_path_follows_every_page(make_mirror: MirrorFactory, fake: FakeUpstream,
                                               client: aiohttp.ClientSession) -> None:
    """An upstream with the referrers API, paging by 2: the mirror follows its Link to the end,
    keeps the whole list and filters it itself."""
    fake.referrers_api, fake.referrers_page_size = True, 2
    subject = {"mediaType": OCI_INDEX, "digest": subject_digest("api"), "size": 100}
    listed = [fake.add_referrer("team/app", str(subject["digest"]),
                                artifact_manifest(subject, SBOM if n % 2 else SIGNATURE, f"payload {n}".encode()))
              for n in range(5)]
    mirror = await make_mirror({"docker.io": fake.url})
    url = f"{mirror.url}/v2/team/app/referrers/{subject['digest']}"
    status, headers, index = await referrers(client, url)
    assert (status, index["manifests"], headers["X-Mirror-Cache"]) == (200, listed, "MISS")
    assert fake.count("GET", "referrers") == 3 and fake.count("GET", "manifests") == 0

    status, headers, index = await referrers(client, url, SBOM)
    assert index["manifests"] == [listed[1], listed[3]] and headers["OCI-Filters-Applied"] == "artifactType"
    assert headers["X-Mirror-Cache"] == "HIT" and fake.count("GET", "referrers") == 3


async def test_an_upstream_that_ignores_the_filter_is_filtered_here(make_mirror: MirrorFactory,
                                                                    fake: FakeUpstream,
                                                                    client: aiohttp.ClientSession) -> None:
    fake.referrers_api, fake.referrers_filter = True, False
    subject = {"mediaType": OCI_INDEX, "digest": subject_digest("nofilter"), "size": 100}
    sbom = fake.add_referrer("team/app", str(subject["digest"]), artifact_manifest(subject, SBOM, b"sbom"))
    fake.add_referrer("team/app", str(subject["digest"]), artifact_manifest(subject, SIGNATURE, b"sig"))
    mirror = await make_mirror({"docker.io": fake.url})
    _, headers, index = await referrers(client, f"{mirror.url}/v2/team/app/referrers/{subject['digest']}", SBOM)
    assert index["manifests"] == [sbom] and headers["OCI-Filters-Applied"] == "artifactType"


@pytest.mark.parametrize(("forced", "status", "code"), [
    (Forced(500), 503, "UNAVAILABLE"),
    (Forced(429, {"Retry-After": "12"}), 429, "TOOMANYREQUESTS"),
    (Forced(0, drop=True, times=5), 503, "UNAVAILABLE"),
])
async def test_api_errors_reach_the_client_with_retry_after(forced: Forced, status: int, code: str,
                                                            make_mirror: MirrorFactory, fake: FakeUpstream,
                                                            client: aiohttp.ClientSession) -> None:
    fake.referrers_api = True
    subject = subject_digest(f"errors {status} {forced.drop}")
    fake.forced[f"/v2/team/app/referrers/{subject}"] = forced
    mirror = await make_mirror({"docker.io": fake.url})
    got, headers, body = await referrers(client, f"{mirror.url}/v2/team/app/referrers/{subject}")
    assert (got, body["errors"][0]["code"]) == (status, code)
    assert int(headers["Retry-After"]) > 0


async def test_a_page_link_to_another_host_is_not_followed(make_mirror: MirrorFactory, fake: FakeUpstream,
                                                           client: aiohttp.ClientSession) -> None:
    """The mirror's credentials go with every request it makes: a Link elsewhere is refused."""
    fake.referrers_api = True
    subject = subject_digest("elsewhere")
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    fake.forced[f"/v2/team/app/referrers/{subject}"] = Forced(
        200, {"Content-Type": OCI_INDEX, "Link": '<http://127.0.0.2:9/v2/team/app/referrers/x?page=2>; rel="next"'},
        body=body)
    mirror = await make_mirror({"docker.io": fake.url})
    status, _, error = await referrers(client, f"{mirror.url}/v2/team/app/referrers/{subject}")
    assert status == 503 and "another host" in error["errors"][0]["message"]


async def test_a_list_is_kept_per_repository(make_mirror: MirrorFactory, fake: FakeUpstream,
                                             client: aiohttp.ClientSession) -> None:
    """The same subject in two repositories: a referrer known in one is not listed for the other."""
    fake.referrers_api = True
    subject = {"mediaType": OCI_INDEX, "digest": subject_digest("shared"), "size": 100}
    private = fake.add_referrer("team/private", str(subject["digest"]), artifact_manifest(subject, SBOM, b"p"))
    mirror = await make_mirror({"docker.io": fake.url})
    assert (await referrers(client, f"{mirror.url}/v2/team/private/referrers/{subject['digest']}"))[2][
        "manifests"] == [private]
    assert (await referrers(client, f"{mirror.url}/v2/team/public/referrers/{subject['digest']}"))[2][
        "manifests"] == []
    async with client.get(f"{mirror.url}/v2/team/public/manifests/{private['digest']}") as response:
        assert response.status == 404, "the referrer is not served for a repository the upstream does not list it in"


async def test_concurrent_requests_for_one_list_cost_one_upstream_request(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    fake.referrers_api = True
    subject = subject_digest("busy")
    path = f"/v2/team/app/referrers/{subject}"
    fake.held[path] = gate = asyncio.Event()
    mirror = await make_mirror({"docker.io": fake.url})
    requests = [asyncio.create_task(referrers(client, f"{mirror.url}{path}")) for _ in range(10)]
    async with asyncio.timeout(10):
        while fake.count("GET", "referrers") == 0:
            await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*requests)
    assert {status for status, _, _ in results} == {200}
    assert fake.count("GET", "referrers") == 1
    assert sorted(h["X-Mirror-Cache"] for _, h, _ in results) == ["JOINED"] * 9 + ["MISS"]


async def test_evicting_an_image_takes_its_referrers_and_signatures_and_pinning_keeps_them(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    """An image and what hangs from it (its referrers list, the referrers, cosign's .sig tag and
    their blobs) are one unit for eviction: never an image without its signature."""
    fake.referrers_api = True
    images = {name: add_image(fake, f"team/{name}", layers=[random.Random(seed).randbytes(100 * KB)], seed=seed)
              for seed, name in enumerate(("a", "b", "c", "d"), 1)}

    def attach(name: str) -> list[str]:
        """An SBOM referrer and a cosign .sig tag for team/<name>; the digests that go with them."""
        pushed = images[name]
        subject = {"mediaType": OCI_INDEX, "digest": pushed.digest, "size": len(pushed.manifest)}
        payload = random.Random(name).randbytes(10 * KB)
        fake.add_blob(payload)
        sbom = artifact_manifest(subject, SBOM, payload)
        fake.add_referrer(f"team/{name}", pushed.digest, sbom)
        signature = artifact_manifest(subject, SIGNATURE, name.encode() * 100)
        fake.add_blob(name.encode() * 100)
        fake.add_manifest(f"team/{name}", f"sha256-{pushed.digest[7:]}.sig", signature,
                          "application/vnd.oci.image.manifest.v1+json")
        return [hashed(sbom), hashed(payload), hashed(signature), hashed(name.encode() * 100)]

    attached = {name: attach(name) for name in ("a", "b")}
    now = [1.0]
    mirror = await make_mirror({"docker.io": fake.url}, clock=lambda: now[0],
                               eviction=EvictionConfig(max_size=400 * KB, high_watermark=0.9, low_watermark=0.7))

    async def pull_all(name: str) -> str:
        """The image, its referrers and everything they name; the digest of its referrers list."""
        pushed = images[name]
        await pull(client, mirror, f"team/{name}", (pushed.config, *pushed.layers))
        _, _, listing = await referrers(client, f"{mirror.url}/v2/team/{name}/referrers/{pushed.digest}")
        for reference in [d["digest"] for d in listing["manifests"]] + [f"sha256-{pushed.digest[7:]}.sig"]:
            async with client.get(manifest_url(mirror, f"team/{name}", reference), headers={"Accept": ACCEPT}) as got:
                assert got.status == 200
                for layer in (await got.json())["layers"]:
                    async with client.get(blob_url(mirror, f"team/{name}", layer["digest"])) as blob:
                        assert blob.status == 200
                        await blob.read()
        await mirror.services.background.join()
        return hashed(referrers_index(listing["manifests"]))

    lists = {}
    for t, name in enumerate(("a", "b"), 1):
        now[0] = float(t)
        lists[name] = await pull_all(name)
    assert await mirror.services.index.pin(Digest.parse(images["b"].digest))
    for t, name in enumerate(("c", "d"), 3):
        now[0] = float(t)
        await pull(client, mirror, f"team/{name}", (images[name].config, *images[name].layers))

    a, b = images["a"], images["b"]
    assert not any(cached(mirror, d) for d in (a.digest, *a.layers, lists["a"], *attached["a"])), \
        "a went, and everything that hangs from it with it"
    assert all(cached(mirror, d) for d in (b.digest, *b.layers, lists["b"], *attached["b"])), \
        "b is pinned: its referrers and signature stay with it"


async def test_access_rules_metrics_and_the_access_log_cover_referrers(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession, captured: Captured) -> None:
    fake.referrers_api = True
    subject = {"mediaType": OCI_INDEX, "digest": subject_digest("watched"), "size": 100}
    fake.add_referrer("team/app", str(subject["digest"]), artifact_manifest(subject, SBOM, b"sbom"))
    fake.add_referrer("team/app", str(subject["digest"]), artifact_manifest(subject, SIGNATURE, b"sig"))
    mirror = await make_mirror({"docker.io": fake.url}, auth=AuthConfig(
        rules=(AccessRule(("anonymous",), True, ("docker.io/team/app",)),)))
    async with client.get(f"{mirror.url}/v2/team/secret/referrers/{subject['digest']}") as response:
        assert response.status == 403
    assert fake.count("GET", "referrers") == 0, "refused before the upstream"
    for _ in range(2):
        assert (await referrers(client, f"{mirror.url}/v2/team/app/referrers/{subject['digest']}"))[0] == 200

    async with client.get(f"{mirror.url}/metrics") as response:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(await response.text()) for s in family.samples}
    assert samples[("mirror_referrers_requests_total", (("result", "miss"),))] == 1
    assert samples[("mirror_referrers_requests_total", (("result", "hit"),))] == 1
    assert samples[("mirror_referrers_fetched_total", (("source", "api"),))] == 1
    assert samples[("mirror_referrers_listed_total", (("kind", "sbom"),))] == 2
    assert samples[("mirror_referrers_listed_total", (("kind", "signature"),))] == 2
    assert samples[("mirror_http_requests_total", (("method", "GET"), ("route", "referrers"), ("status", "200")))] == 2
    assert samples[("mirror_http_requests_total", (("method", "GET"), ("route", "referrers"), ("status", "403")))] == 1
    logged = [entry for entry in captured.access() if "/referrers/" in str(entry["path"])]
    assert [(entry["status"], entry.get("cache")) for entry in logged] == [(403, None), (200, "MISS"), (200, "HIT")]
