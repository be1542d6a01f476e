"""podman and skopeo with a `policy.json` that requires a sigstore signature by one key, pulling
through the mirror (the README's registries.conf): the signature must reach them through the
mirror, online and offline, for a signed image to be let in and the others kept out.

Where the clients look (found from podman's debug log): the policy is looked up by the logical
reference (`docker.io/sigstore/...`, scope `docker.io/sigstore`), registries.d by the mirror's
(`127.0.0.1:PORT/docker.io/sigstore/...`), and the `sha256-<hex>.sig` attachment is read from the
mirror. The signatures claim the identity `docker.io/sigstore/<name>:v1`, the name users pull,
so `matchRepository` holds whatever mirror or upstream serves the bytes.

Debian's podman and skopeo (bookworm) have sigstore stubbed out: a policy requirement that
meets a signature is refused with "Debian-local change: sigstore disabled" whatever the
signature, though one without any is still refused as unsigned. There, the tests assert what
those clients can show, that the signature came through (the stub only speaks when there was
one), and check the signatures skopeo copied through the mirror with this test's own code
instead; with a containers/image that checks sigstore, they assert the policy's own verdicts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import CountingFactory, Mirror, MirrorFactory, Registry, require_binary
from tests.support.clients import Podman, Result, Sandbox
from tests.support.images import push_image, random_layer
from tests.support.sigstore import (
    SIGNATURE_ANNOTATION,
    SIGNATURE_MEDIA_TYPE,
    SIGNATURE_TYPE,
    KeyPair,
    make_key_pair,
    sign_in_place,
    verifies,
    write_registries_d,
)
from tests.support.snippets import snippet

SCOPE = "docker.io/sigstore"
NAMES = ("signed", "unsigned", "forged")
"""`signed` by the trusted key, `unsigned`, `forged`: signed, with the right identity, by another key."""

UNSIGNED = "A signature was required, but no signature exists"
FORGED = "cryptographic signature verification failed"
STUB = "Debian-local change: sigstore disabled"


@dataclass(frozen=True)
class Signed:
    """What the publisher did: the key it signed with, and which manifests are out there."""

    trusted: KeyPair
    digests: dict[str, str]
    """Manifest digest of each image, by name."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def signed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Signed:
    """The three images on the upstream, signed as a publisher would before anyone pulls."""
    keys = tmp_path_factory.mktemp("keys")
    trusted, other = make_key_pair(keys, "trusted"), make_key_pair(keys, "other")
    digests = {name: push_image(registry.url, f"sigstore/{name}", "v1", layers=[random_layer(4096, 300 + i)]).digest
               for i, name in enumerate(NAMES)}
    for name, key in (("signed", trusted), ("forged", other)):
        assert await sign_in_place(registry.url, f"sigstore/{name}", "v1", key,
                                   identity=f"{SCOPE}/{name}:v1") == digests[name]
    return Signed(trusted, digests)


class ContainersSandbox(Sandbox):
    """The sandbox with `etc` as its `/etc/containers`: podman has no flag for registries.d, and
    so both clients read policy.json and registries.d where a host's configuration lives."""

    def __init__(self, directory: Path, etc: Path) -> None:
        super().__init__(directory)
        self.etc = etc

    def command(self, *argv: str) -> list[str]:
        return super().command("sh", "-c", 'mount --bind "$0" /etc/containers && exec "$@"', str(self.etc), *argv)


@pytest.fixture
def containers(namespaces: None, signed: Signed, tmp_path: Path) -> ContainersSandbox:
    """A sandbox whose policy requires, for `docker.io/sigstore/*`, a sigstore signature by the
    trusted key naming the repository pulled."""
    etc = tmp_path / "etc-containers"
    etc.mkdir()
    requirement = {"type": "sigstoreSigned", "keyPath": str(signed.trusted.public),
                   "signedIdentity": {"type": "matchRepository"}}
    (etc / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}],
                                                 "transports": {"docker": {SCOPE: [requirement]}}}))
    return ContainersSandbox(tmp_path / "sandbox", etc)


def point_at(sandbox: ContainersSandbox, mirror: Mirror, tmp_path: Path) -> Path:
    """Clients go through `mirror` (the README's registries.conf, returned) and read sigstore
    attachments there: registries.d is looked up by the host actually asked, the mirror."""
    write_registries_d(sandbox.etc / "registries.d", [mirror.host])
    conf = tmp_path / f"registries-{mirror.server.port}.conf"
    conf.write_text(snippet("containers/registries.conf", mirror.host))
    return conf


Phase = Callable[[Mirror], Awaitable[None]]


@pytest.fixture
def online_then_offline(registry: Registry, make_counting: CountingFactory, make_mirror: MirrorFactory,
                        tmp_path: Path) -> Callable[[Phase], Awaitable[None]]:
    """Runs a test's checks against a mirror online, then against a mirror on the same cache with
    its upstream offline, which must not ask the upstream anything."""
    cache = tmp_path / "cache"

    async def run(checks: Phase) -> None:
        upstream = await make_counting(registry.url)
        online = await make_mirror({"docker.io": upstream.url}, cache_dir=cache)
        await checks(online)
        await online.services.background.join()
        await online.server.close()
        upstream.reset()
        await checks(await make_mirror({"docker.io": upstream.url}, cache_dir=cache, offline=True))
        assert upstream.count() == 0, f"the offline mirror asked its upstream: {dict(upstream.requests)}"

    return run


def refused(result: Result, why: str) -> None:
    """The client kept the image out, by the policy (not by some failure to reach it), for `why`."""
    assert result.returncode != 0, f"let in:\n{result.stderr}"
    assert f"Source image rejected: {why}" in result.stderr, result.stderr


def judged(result: Result, digest: str | None) -> bool:
    """Whether this containers/image could check the signature it found; if it could, it let the
    image in (`digest` is that of the signed image) or refused it as forged (`digest` None)."""
    if STUB in result.stderr:
        refused(result, STUB)
        return False
    if digest is None:
        refused(result, FORGED)
    else:
        assert result.returncode == 0, result.stderr
    return True


async def test_podman_lets_in_only_what_the_trusted_key_signed_online_and_offline(
        containers: ContainersSandbox, signed: Signed, online_then_offline: Callable[[Phase], Awaitable[None]],
        tmp_path: Path) -> None:
    require_binary("podman")
    verdicts: list[bool] = []

    async def checks(mirror: Mirror) -> None:
        conf = point_at(containers, mirror, tmp_path)
        async with Podman(containers, tmp_path / f"podman-{mirror.server.port}", conf) as podman:
            refused(await podman.podman("pull", f"{SCOPE}/unsigned:v1", check=False), UNSIGNED)
            verdicts.append(judged(await podman.podman("pull", f"{SCOPE}/forged:v1", check=False), None))
            verdicts.append(judged(await podman.podman("pull", f"{SCOPE}/signed:v1", check=False),
                                   signed.digests["signed"]))
            images = (await podman.podman("images", "--digests", "--format", "{{.Repository}} {{.Digest}}")).stdout
        expected = f"{SCOPE}/signed {signed.digests['signed']}\n" if all(verdicts) else ""
        assert images == expected

    await online_then_offline(checks)
    assert len(set(verdicts)) == 1, "podman judged some signatures and not others"


async def test_skopeo_copies_the_signatures_through_the_mirror_online_and_offline(
        containers: ContainersSandbox, signed: Signed, skopeo: str,
        online_then_offline: Callable[[Phase], Awaitable[None]], tmp_path: Path) -> None:

    async def checks(mirror: Mirror) -> None:
        conf = point_at(containers, mirror, tmp_path)
        copied = tmp_path / f"copied-{mirror.server.port}"
        copied.mkdir()

        async def copy(name: str, *options: str) -> Result:
            return await containers.run(skopeo, "--registries-conf", str(conf), *options, "copy",
                                        f"docker://{SCOPE}/{name}:v1", f"dir:{copied / name}", check=False)

        refused(await copy("unsigned"), UNSIGNED)
        judged(await copy("forged"), None)
        judged(await copy("signed"), signed.digests["signed"])
        # What the clients got through the mirror, checked here as the policy would check it.
        for name in NAMES:
            result = await copy(name, "--insecure-policy")
            assert result.returncode == 0, result.stderr
            assert (copied / name / "manifest.json").exists()
        assert accepted(copied / "unsigned", signed.trusted, "unsigned", signed.digests["unsigned"]) is None
        assert accepted(copied / "forged", signed.trusted, "forged", signed.digests["forged"]) is False
        assert accepted(copied / "signed", signed.trusted, "signed", signed.digests["signed"]) is True

    await online_then_offline(checks)


def accepted(copy: Path, key: KeyPair, name: str, digest: str) -> bool | None:
    """The verdict of the policy's `sigstoreSigned` with `matchRepository` on the sigstore signatures
    skopeo copied into the `dir:` layout `copy`: None when there are none."""
    signatures = [_sigstore(path.read_bytes()) for path in sorted(copy.glob("signature-*"))]
    if not signatures:
        return None
    for media_type, payload, notes in signatures:
        assert media_type == SIGNATURE_MEDIA_TYPE
        if not verifies(key.public, payload, notes[SIGNATURE_ANNOTATION]):
            continue
        critical = json.loads(payload)["critical"]
        assert critical["type"] == SIGNATURE_TYPE
        assert critical["image"]["docker-manifest-digest"] == digest
        assert critical["identity"]["docker-reference"].rpartition(":")[0] == f"{SCOPE}/{name}"
        return True
    return False


def _sigstore(blob: bytes) -> tuple[str, bytes, dict[str, str]]:
    """containers/image's stored form of a sigstore signature: NUL, `sigstore-json`, newline, JSON."""
    header, _, body = blob.partition(b"\n")
    assert header == b"\0sigstore-json", blob[:40]
    stored = json.loads(body)
    return stored["mimeType"], base64.b64decode(stored["payload"]), stored["annotations"]
