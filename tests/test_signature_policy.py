"""The operator's signature policy: in the repositories it covers, an image is served only with a
valid cosign signature by one of its keys (under cosign's tag, or as an OCI referrer), or when a
signed index lists it; everything else is a 403 DENIED naming the policy. Verdicts are kept by
digest and survive a restart, offline included."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import SignaturePolicy
from tests.conftest import Counting, MirrorFactory
from tests.support.artifacts import read_referrers, write_referrers
from tests.support.cosign import make_key, public_pem, push_referrer_signature, push_signature
from tests.support.images import OCI_MANIFEST, PushedImage, push_image, push_index, random_layer
from tests.support.registry import LocalRegistry as Registry

ACCEPT = ", ".join([OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])


def policy(tmp_path: Path, key: Any, *, repositories: tuple[str, ...] = ("signed/*",)) -> SignaturePolicy:
    path = tmp_path / "release.pub"
    path.write_bytes(public_pem(key))
    return SignaturePolicy("release-signed", (path,), ("registry.test",), repositories)


def image(registry: Registry, name: str, tag: str = "v1") -> PushedImage:
    return push_image(registry.url, name, tag, layers=[random_layer(1024, len(name) * 7 + len(tag))])


async def get_manifest(client: aiohttp.ClientSession, base: str, name: str, reference: str
                       ) -> tuple[int, dict[str, Any] | bytes]:
    async with client.get(f"{base}/v2/registry.test/{name}/manifests/{reference}",
                          headers={"Accept": ACCEPT}) as response:
        body = await response.read()
        return response.status, (await response.json(content_type=None)) if response.status >= 400 else body


async def checks(client: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with client.get(f"{base}/metrics") as response:
        text = await response.text()
    return {s.labels["result"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "mirror_signature_checks_total"}


async def test_signed_served_unsigned_other_key_and_tampered_refused(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    key, other = make_key(), make_key("ecdsa-p256")
    signed, unsigned = image(registry, "signed/app"), image(registry, "signed/unsigned")
    by_other, tampered = image(registry, "signed/other"), image(registry, "signed/tampered")
    push_signature(registry.url, "signed/app", signed.digest, [key])
    push_signature(registry.url, "signed/other", by_other.digest, [other])
    push_signature(registry.url, "signed/tampered", tampered.digest, [key], tamper=True)
    free = image(registry, "free/app")
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url},
                               signature_policies=(policy(tmp_path, key),))

    status, body = await get_manifest(client, mirror.url, "signed/app", "v1")
    assert (status, body) == (200, signed.manifest)
    assert (await get_manifest(client, mirror.url, "signed/app", signed.digest))[0] == 200
    for name, pushed in (("signed/unsigned", unsigned), ("signed/other", by_other), ("signed/tampered", tampered)):
        status, error = await get_manifest(client, mirror.url, name, "v1")
        assert status == 403, name
        assert isinstance(error, dict)
        assert error["errors"][0]["code"] == "DENIED"
        assert "release-signed" in error["errors"][0]["message"]
        assert error["errors"][0]["detail"] == {"policy": "release-signed", "digest": pushed.digest}
    # A repository the policy does not cover is served as usual.
    assert await get_manifest(client, mirror.url, "free/app", "v1") == (200, free.manifest)
    # The signature itself (not a runnable image) is served, so clients can verify it too.
    assert (await get_manifest(client, mirror.url, "signed/app", f"sha256-{signed.digest[7:]}.sig"))[0] == 200

    counted = await checks(client, mirror.url)
    assert (counted["verified"], counted["refused"]) == (1, 3)
    # Asked again: the verdict is kept, no new signature download.
    asked = counting.count("GET", "blobs")
    assert (await get_manifest(client, mirror.url, "signed/app", "v1"))[0] == 200
    assert counting.count("GET", "blobs") == asked
    assert (await checks(client, mirror.url))["cached"] >= 1


async def test_a_signed_index_lets_its_images_through(make_mirror: MirrorFactory, registry: Registry,
                                                      counting: Counting, tmp_path: Path,
                                                      client: aiohttp.ClientSession) -> None:
    key = make_key()
    index = push_index(registry.url, "signed/multi", "v1", platforms=[("linux", "amd64"), ("linux", "arm64")])
    unsigned = push_index(registry.url, "signed/multi-unsigned", "v1", platforms=[("linux", "amd64")])
    push_signature(registry.url, "signed/multi", index.digest, [key])
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url},
                               signature_policies=(policy(tmp_path, key),))
    assert (await get_manifest(client, mirror.url, "signed/multi", "v1"))[0] == 200
    for child in index.children:
        assert await get_manifest(client, mirror.url, "signed/multi", child.digest) == (200, child.manifest)
    # An index is only pointers: served; the image it leads to is what is refused.
    assert (await get_manifest(client, mirror.url, "signed/multi-unsigned", "v1"))[0] == 200
    status, _ = await get_manifest(client, mirror.url, "signed/multi-unsigned", unsigned.children[0].digest)
    assert status == 403


async def test_a_signature_among_the_referrers_counts(make_mirror: MirrorFactory, registry: Registry,
                                                      counting: Counting, tmp_path: Path,
                                                      client: aiohttp.ClientSession) -> None:
    """cosign's OCI 1.1 mode: the signature is a referrer, listed under the fallback tag here."""
    key, other = make_key(), make_key()
    signed, by_other = image(registry, "signed/referred"), image(registry, "signed/referred-other")
    for pushed, signer in ((signed, key), (by_other, other)):
        descriptor = push_referrer_signature(registry.url, pushed.name, pushed.digest, [signer])
        write_referrers(registry.url, pushed.name, pushed.digest,
                        [*read_referrers(registry.url, pushed.name, pushed.digest), descriptor])
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url},
                               signature_policies=(policy(tmp_path, key),))
    assert (await get_manifest(client, mirror.url, "signed/referred", "v1"))[0] == 200
    assert (await get_manifest(client, mirror.url, "signed/referred-other", "v1"))[0] == 403


async def test_verdicts_and_signatures_survive_a_restart_offline(
        make_mirror: MirrorFactory, registry: Registry, counting: Counting, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    key, other = make_key(), make_key()
    signed, unsigned, by_other = (image(registry, f"signed/{n}") for n in ("kept", "kept-unsigned", "kept-other"))
    push_signature(registry.url, "signed/kept", signed.digest, [key])
    push_signature(registry.url, "signed/kept-other", by_other.digest, [other])
    rules = (policy(tmp_path, key),)
    cache = tmp_path / "cache"
    online = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url}, cache_dir=cache,
                               signature_policies=rules)
    assert (await get_manifest(client, online.url, "signed/kept", "v1"))[0] == 200
    assert (await get_manifest(client, online.url, "signed/kept-unsigned", "v1"))[0] == 403
    assert (await get_manifest(client, online.url, "signed/kept-other", "v1"))[0] == 403
    await online.server.close()

    offline = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url},
                                cache_dir=cache, signature_policies=rules, offline=True)
    counting.reset()
    assert await get_manifest(client, offline.url, "signed/kept", "v1") == (200, signed.manifest)
    status, error = await get_manifest(client, offline.url, "signed/kept-unsigned", "v1")
    assert status == 403 and isinstance(error, dict) and error["errors"][0]["detail"]["digest"] == unsigned.digest
    assert (await get_manifest(client, offline.url, "signed/kept-other", "v1"))[0] == 403
    assert counting.count() == 0
    counted = await checks(client, offline.url)
    assert counted.get("verified", 0) == 0 and counted["cached"] == 1, "the verdict was kept, not computed again"


async def test_concurrent_pulls_of_a_signed_image_all_pass(make_mirror: MirrorFactory, registry: Registry,
                                                          counting: Counting, tmp_path: Path,
                                                          client: aiohttp.ClientSession) -> None:
    key = make_key()
    signed = image(registry, "signed/busy")
    push_signature(registry.url, "signed/busy", signed.digest, [key])
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": counting.url},
                               signature_policies=(policy(tmp_path, key),))
    results = await asyncio.gather(*(get_manifest(client, mirror.url, "signed/busy", "v1") for _ in range(10)))
    assert {status for status, _ in results} == {200}
    assert counting.count("GET", "blobs") == 1, "the signature's payload was downloaded once"
