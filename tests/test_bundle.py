"""Air-gapped sites end to end: `mirror export` from the real registry (a directory, a tar,
volumes), carried over, `mirror import` into a new cache, `mirror serve --offline`, and real
clients pulling with the source registry's digests while no upstream exists; interoperability
with skopeo's and containerd's OCI layouts; resume after kill -9; shipping only what the far
side lacks; and every kind of bad bundle refused by name, with nothing unverified cached."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Counting, Registry, require_binary
from tests.support.clients import Containerd, DockerDaemon, Podman, Sandbox
from tests.support.disks import mount_tmpfs, resize_tmpfs, unmount
from tests.support.images import (
    OCI_MANIFEST,
    PushedImage,
    digest_of,
    host_architecture,
    push_blob,
    push_manifest,
    push_raw_image,
)
from tests.support.pulls import ACCEPT
from tests.support.served import Served
from tests.support.skopeo import copy, skopeo_run
from tests.support.snippets import snippet

MiB = 1 << 20
LIST = """
images:
  - alpine:3.19
  - ref: multi:1.0
    platforms: [{arch}]
  - dockerlist:1.0
  - busybox:1.36
  - bundle/big:v1
"""


def mirror(*args: str | Path, upstream: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    extra = ["--upstream", f"docker.io={upstream}"] if upstream else []
    run = subprocess.run([sys.executable, "-m", "mirror", *map(str, args), *extra], capture_output=True, text=True,
                         timeout=300, check=False)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def big(registry: Registry) -> PushedImage:
    """An image with a 3 MiB layer: larger than a 1 MiB volume, so it travels in parts."""
    return push_raw_image(registry.url, "bundle/big", "v1", [random.Random("big").randbytes(3 * MiB)])


def image_list(tmp_path: Path) -> Path:
    path = tmp_path / "images.yaml"
    path.write_text(LIST.format(arch=f"linux/{host_architecture()}"))
    return path


async def fetch(client: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, Any] | None]:
    async with client.get(url, headers={"Accept": ACCEPT}) as response:
        body = await response.read()
        error = json.loads(body)["errors"][0] if response.status >= 400 else None
        return response.status, body, error


async def test_export_carry_import_and_serve_offline_with_the_source_digests(
        registry: Registry, counting: Counting, big: PushedImage, skopeo: str, tmp_path: Path,
        client: aiohttp.ClientSession) -> None:
    listing = image_list(tmp_path)
    bundle = tmp_path / "usb" / "bundle"
    # In a thread: the counting window onto the registry is served by this test's event loop.
    exported = await asyncio.to_thread(mirror, "export", "-f", listing, "-o", bundle, "--volume-size", "1MiB",
                                       "--cache-dir", tmp_path / "connected", "--json", upstream=counting.url)
    manifest = json.loads(exported.stdout)
    volumes = sorted(bundle.glob("volume-*.tar"))
    assert len(volumes) >= 4 and len(manifest["volumes"]) == len(volumes)
    assert all(v["sha256"] == hashlib.sha256((bundle / v["file"]).read_bytes()).hexdigest()
               for v in manifest["volumes"])
    layer = next(d for d in big.blobs if len(big.blobs[d]) == 3 * MiB)
    assert len(manifest["blobs"][layer]["parts"]) >= 3, "a blob larger than a volume travels in parts"
    multi = next(i for i in manifest["images"] if i["reference"] == "docker.io/library/multi:1.0")
    assert multi["platforms_present"] == [f"linux/{host_architecture()}"] and multi["digest"] == \
        registry.images["index"].digest

    # The far side: volumes given one by one, in any order, with the bundle manifest beside them.
    far = tmp_path / "far"
    imported = mirror("import", *reversed(volumes), bundle / "mirror-bundle.json", "--cache-dir", far, "--json")
    result = json.loads(imported.stdout)
    assert sorted(result["images"]) == sorted(i["reference"] for i in manifest["images"])
    assert (result["incomplete"], result["problems"]) == ([], [])

    counting.reset()
    async with await Served.start("--cache-dir", far, "--upstream", f"docker.io={counting.url}",
                                  "--offline") as offline:
        for label, image in (("single", registry.images["single"]), ("index", registry.images["index"]),
                             ("list", registry.images["list"]), ("docker", registry.images["docker"])):
            status, body, _ = await fetch(client, f"{offline.url}/v2/{image.name}/manifests/{image.tag}")
            assert (status, hashlib.sha256(body).hexdigest()) == (200, image.digest.removeprefix("sha256:")), label
        status, body, _ = await fetch(client, f"{offline.url}/v2/{big.name}/blobs/{layer}")
        assert (status, body) == (200, big.blobs[layer]), "the blob that travelled in parts is whole"
        # skopeo pulls through it, digests unchanged.
        target = tmp_path / "pulled"
        await copy(skopeo, f"{offline.host}/library/alpine:3.19", target, False)
        assert hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest() == \
            registry.images["single"].digest.removeprefix("sha256:")
        # A platform that was not shipped: a clear 404 that names it, never a rewritten index.
        shipped = {d["digest"] for d in json.loads(registry.images["index"].manifest)["manifests"]
                   if d["platform"]["architecture"] == host_architecture()}
        other = next(d for d in json.loads(registry.images["index"].manifest)["manifests"]
                     if d["digest"] not in shipped)
        status, _, error = await fetch(client, f"{offline.url}/v2/library/multi/manifests/{other['digest']}")
        assert status == 404 and error is not None and error["code"] == "MANIFEST_UNKNOWN"
        assert error["detail"]["platform"] == f"linux/{other['platform']['architecture']}"
    assert counting.count() == 0, f"the offline mirror asked its upstream: {dict(counting.requests)}"


async def test_skopeo_and_containerd_read_what_export_writes(
        registry: Registry, skopeo: str, sandbox: Sandbox, tmp_path: Path) -> None:
    require_binary("ctr")
    listing = tmp_path / "images.yaml"
    arch = f"linux/{host_architecture()}"
    listing.write_text(f"images:\n  - alpine:3.19\n  - busybox:1.36\n  - ref: multi:1.0\n    platforms: [{arch}]\n")
    layout = tmp_path / "layout"
    mirror("export", "-f", listing, "-o", layout, "--cache-dir", tmp_path / "cache", upstream=registry.url)
    # By the OCI manifest's name: skopeo before 1.19 (containers/image 5.35) skips index.json
    # descriptors of Docker media types when it looks a name up, so busybox is checked by containerd below.
    copied = tmp_path / "copied"
    await skopeo_run(skopeo, "copy", "--preserve-digests", f"oci:{layout}:docker.io/library/alpine:3.19",
                     f"dir:{copied}")
    assert digest_of((copied / "manifest.json").read_bytes()) == registry.images["single"].digest

    archive = tmp_path / "images.tar"
    mirror("export", "-f", listing, "-o", archive, "--cache-dir", tmp_path / "cache", upstream=registry.url)
    async with Containerd(sandbox, tmp_path / "containerd") as containerd:
        # multi:1.0 is a sparse index (only this platform's child shipped): --all-platforms would
        # ask for every child, so the far side imports the platform it runs, as `ctr` does by default.
        await containerd.ctr("images", "import", "--platform", arch, str(archive))
        listed = (await containerd.ctr("images", "ls")).stdout
    for image in (registry.images["single"], registry.images["docker"], registry.images["index"]):
        assert any(image.digest in line and line.startswith(f"docker.io/{image.name}:{image.tag}")
                   for line in listed.splitlines()), listed


async def test_import_takes_a_layout_written_by_skopeo(
        registry: Registry, skopeo: str, tmp_path: Path, client: aiohttp.ClientSession) -> None:
    layout = tmp_path / "skopeo-layout"
    index = registry.images["index"]
    await skopeo_run(skopeo, "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                     f"docker://{registry.host}/{index.name}:{index.tag}", f"oci:{layout}:{index.tag}")
    refused = mirror("import", layout, "--cache-dir", tmp_path / "cache", check=False)
    assert refused.returncode == 2 and "--name" in refused.stderr, "a bare tag names no repository"
    mirror("import", layout, "--name", "docker.io/library/multi", "--cache-dir", tmp_path / "cache")
    async with await Served.start("--cache-dir", tmp_path / "cache", "--upstream", "docker.io=http://127.0.0.1:9",
                                  "--offline") as offline:
        status, body, _ = await fetch(client, f"{offline.url}/v2/library/multi/manifests/1.0")
        assert (status, body) == (200, index.manifest)
        for child in index.children:
            for digest, data in child.blobs.items():
                assert (await fetch(client, f"{offline.url}/v2/library/multi/blobs/{digest}"))[:2] == (200, data)


async def test_a_second_export_with_have_ships_only_what_the_far_side_lacks(
        registry: Registry, tmp_path: Path) -> None:
    first = tmp_path / "first.txt"
    first.write_text("alpine:3.19\n")
    mirror("export", "-f", first, "-o", tmp_path / "b1", "--cache-dir", tmp_path / "near", upstream=registry.url)
    mirror("import", tmp_path / "b1", "--cache-dir", tmp_path / "far")
    have = tmp_path / "have.json"
    have.write_text(mirror("inventory", "--cache-dir", tmp_path / "far").stdout)

    second = tmp_path / "second.txt"
    second.write_text("alpine:3.19\nbusybox:1.36\n")
    manifest = json.loads(mirror("export", "-f", second, "-o", tmp_path / "b2", "--have", have, "--json",
                                 "--cache-dir", tmp_path / "near", upstream=registry.url).stdout)
    alpine = registry.images["single"]
    assert set(manifest["omitted"]) == {alpine.digest, *alpine.blobs}
    written = {f"sha256:{p.name}" for p in (tmp_path / "b2" / "blobs" / "sha256").iterdir()}
    assert written == {registry.images["docker"].digest, *registry.images["docker"].blobs}
    result = json.loads(mirror("import", tmp_path / "b2", "--cache-dir", tmp_path / "far", "--json").stdout)
    assert sorted(result["images"]) == ["docker.io/library/alpine:3.19", "docker.io/library/busybox:1.36"]


async def kill_when(process: asyncio.subprocess.Process, ready: Any) -> None:
    """SIGKILL `process` as soon as `ready()` holds (polled on the event loop, bounded)."""
    async with asyncio.timeout(60):
        while not ready() and process.returncode is None:
            await asyncio.sleep(0.002)
    if process.returncode is None:
        process.send_signal(signal.SIGKILL)
    await process.wait()


async def test_export_and_import_resume_after_kill_9(registry: Registry, big: PushedImage, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("bundle/big:v1\nalpine:3.19\n")
    bundle = tmp_path / "bundle"
    command = [sys.executable, "-m", "mirror", "export", "-f", str(listing), "-o", str(bundle), "--volume-size",
               "1MiB", "--cache-dir", str(tmp_path / "cache"), "--upstream", f"docker.io={registry.url}"]
    mirror(*command[3:])  # fills the cache; the bundle is then written again from scratch
    for leftover in bundle.iterdir():
        leftover.unlink()
    done_before: dict[str, int] = {}
    # Killed twice, further along each time, with three or more volumes still to write.
    for volume in ("volume-0001.tar", "volume-0002.tar"):
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.DEVNULL)
        await kill_when(process, lambda volume=volume: (bundle / volume).exists())
        assert not (bundle / "mirror-bundle.json").exists(), "an interrupted export is not a bundle"
        whole = {p.name: p.stat().st_ino for p in bundle.glob("volume-*.tar")}
        assert all(whole[name] == inode for name, inode in done_before.items()), "a finished volume was rewritten"
        done_before = whole
    assert done_before
    mirror(*command[3:])
    after = {p.name: p.stat().st_ino for p in bundle.glob("volume-*.tar")}
    assert len(after) >= 4, "the kills came with volumes still to write"
    assert all(after[name] == inode for name, inode in done_before.items()), "a finished volume was written again"
    assert not list(bundle.glob(".*.partial"))
    mirror(*command[3:])
    again = {p.name: p.stat().st_ino for p in bundle.glob("volume-*.tar")}
    assert again == after, "a finished bundle was written again"

    far = tmp_path / "far"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "import", str(bundle), "--cache-dir", str(far),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    blobs = far / "blobs" / "sha256"
    await kill_when(process, lambda: blobs.exists() and len(list(blobs.glob("*/*"))) >= 2)
    result = json.loads(mirror("import", bundle, "--cache-dir", far, "--json").stdout)
    assert sorted(result["images"]) == ["docker.io/bundle/big:v1", "docker.io/library/alpine:3.19"]
    assert result["blobs_present"] >= 1, "what the killed import wrote was kept, not written again"


@pytest.fixture
def exported(registry: Registry, tmp_path: Path) -> Path:
    listing = tmp_path / "images.txt"
    listing.write_text("alpine:3.19\nbusybox:1.36\n")
    bundle = tmp_path / "bundle"
    mirror("export", "-f", listing, "-o", bundle, "--volume-size", "1MiB", "--cache-dir", tmp_path / "near",
           upstream=registry.url)
    return bundle


def cache_files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "emptied"])
def test_a_corrupted_volume_is_named_and_the_rest_still_imports(exported: Path, registry: Registry,
                                                               tmp_path: Path, damage: str) -> None:
    volumes = sorted(exported.glob("volume-*.tar"))
    manifest = json.loads((exported / "mirror-bundle.json").read_text())
    busybox = registry.images["docker"]
    bad = next(v for v in volumes if any(manifest["blobs"][d].get("volume") == int(v.stem[-4:])
                                         for d in busybox.blobs))
    data = bytearray(bad.read_bytes())
    if damage == "flipped":
        data[len(data) // 3] ^= 0xFF
    else:
        del data[len(data) // 2 if damage == "truncated" else 0:]
    bad.write_bytes(bytes(data))
    run = mirror("import", exported, "--cache-dir", tmp_path / "far", "--json", check=False)
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert any(bad.name in problem and "checksum" in problem for problem in result["problems"])
    assert "docker.io/library/busybox:1.36" in result["incomplete"]
    if "docker.io/library/alpine:3.19" not in result["incomplete"]:
        assert "docker.io/library/alpine:3.19" in result["images"]
    db = sqlite_tags(tmp_path / "far")
    assert ("library/busybox", "1.36") not in db, "a tag never names missing content"


def sqlite_tags(cache: Path) -> set[tuple[str, str]]:
    db = sqlite3.connect(cache / "index.db")
    try:
        return {(n, t) for n, t in db.execute("SELECT name, tag FROM tags")}
    finally:
        db.close()


def evil_tar(path: Path, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"evil") -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(("name", "kind"), [
    ("/etc/evil", tarfile.REGTYPE), ("../../evil", tarfile.REGTYPE), ("blobs/sha256/../../../evil", tarfile.REGTYPE),
    (f"blobs/sha256/{'a' * 64}", tarfile.SYMTYPE), ("dev", tarfile.CHRTYPE), ("index.json", tarfile.LNKTYPE),
])
def test_hostile_tar_entries_are_refused_by_name(name: str, kind: bytes, tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    evil_tar(archive, name, kind)
    run = mirror("import", archive, "--cache-dir", tmp_path / "cache", check=False)
    assert run.returncode == 2 and repr(name) in run.stderr and "refused" in run.stderr
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()
    assert not {f for f in cache_files(tmp_path / "cache") if f.startswith("blobs")}


def test_blobs_that_lie_are_not_imported(exported: Path, tmp_path: Path) -> None:
    """A bundle manifest that lies about a size, and a blob whose bytes are not its digest."""
    manifest = json.loads((exported / "mirror-bundle.json").read_text())
    victim = max(manifest["blobs"], key=lambda d: manifest["blobs"][d]["size"])
    manifest["blobs"][victim]["size"] += 1
    (exported / "mirror-bundle.json").write_text(json.dumps(manifest))
    run = mirror("import", exported, "--cache-dir", tmp_path / "far", "--json", check=False)
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert any(victim in p and "bundle says" in p for p in result["problems"])
    assert f"blobs/sha256/{victim[7:9]}/{victim[7:]}" not in cache_files(tmp_path / "far")

    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    wrong = layout / "blobs" / "sha256" / ("f" * 64)
    wrong.write_bytes(b"not what the name says")
    run = mirror("import", layout, "--cache-dir", tmp_path / "other", "--json", check=False)
    assert run.returncode == 1 and "digest" in run.stdout
    assert not {f for f in cache_files(tmp_path / "other") if f.startswith("blobs/sha256/ff")}


def test_a_missing_volume_is_named(exported: Path, tmp_path: Path) -> None:
    volumes = sorted(exported.glob("volume-*.tar"))
    os.unlink(volumes[-1])
    run = mirror("import", exported, "--cache-dir", tmp_path / "far", "--json", check=False)
    assert run.returncode == 1
    assert any(volumes[-1].name in p and "missing" in p for p in json.loads(run.stdout)["problems"])


async def test_docker_containerd_and_podman_pull_an_imported_bundle_from_an_offline_mirror(
        registry: Registry, counting: Counting, sandbox: Sandbox, tmp_path: Path) -> None:
    """The far side has no upstream at all: the clients get every shipped image, for their
    platform, with the source registry's digests."""
    for binary in ("dockerd", "docker", "containerd", "ctr", "podman"):
        require_binary(binary)
    listing = tmp_path / "images.yaml"
    listing.write_text(LIST.format(arch=f"linux/{host_architecture()}").replace("  - bundle/big:v1\n", "")
                       + "  - quay.io/team/app:v1\n")
    bundle = tmp_path / "bundle"
    mirror("export", "-f", listing, "-o", bundle, "--volume-size", "1MiB", "--cache-dir", tmp_path / "near",
           "--upstream", f"quay.io={registry.url}", upstream=registry.url)
    far = tmp_path / "far"
    mirror("import", bundle, "--cache-dir", far)
    pulls = [("docker.io/library/alpine:3.19", "single"), ("docker.io/library/multi:1.0", "index"),
             ("docker.io/library/dockerlist:1.0", "list"), ("docker.io/library/busybox:1.36", "docker"),
             ("quay.io/team/app:v1", "team")]
    async with await Served.start("--cache-dir", far, "--upstream", f"docker.io={counting.url}",
                                  "--upstream", f"quay.io={counting.url}", "--offline") as offline:
        async with DockerDaemon(sandbox, tmp_path / "docker", snippet("docker/daemon.json", offline.host)) as docker:
            for reference, label in pulls[:4]:
                await docker.docker("pull", reference)
                digests = (await docker.inspect(reference))["RepoDigests"]
                assert isinstance(digests, list) and any(d.endswith(f"@{registry.images[label].digest}")
                                                         for d in digests), (reference, digests)
        hosts = tmp_path / "certs.d"
        for host in ("docker.io", "quay.io"):
            (hosts / host).mkdir(parents=True)
            (hosts / host / "hosts.toml").write_text(snippet(f"containerd/{host}/hosts.toml", offline.host))
        async with Containerd(sandbox, tmp_path / "containerd") as containerd:
            for reference, _ in pulls:
                await containerd.pull(reference, hosts)
            listed = (await containerd.ctr("images", "ls")).stdout.splitlines()
        for reference, label in pulls:
            assert any(line.split()[:1] == [reference] and registry.images[label].digest in line
                       for line in listed), (reference, listed)
        conf = tmp_path / "registries.conf"
        conf.write_text(snippet("containers/registries.conf", offline.host))
        async with Podman(sandbox, tmp_path / "podman", conf) as podman:
            for reference, label in pulls:
                await podman.podman("pull", reference)
                assert (await podman.inspect(reference))["Digest"] == registry.images[label].digest
    assert counting.count() == 0, f"the offline mirror asked an upstream: {dict(counting.requests)}"


def push_artifact(base_url: str, name: str, tag: str, payload: bytes, artifact_type: str,
                  subject: dict[str, Any] | None = None) -> tuple[str, bytes]:
    """An OCI artifact (a signature, an SBOM) pushed under `tag`: its digest and manifest."""
    config = b"{}"
    push_blob(base_url, name, config)
    push_blob(base_url, name, payload)
    document: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2, "digest": digest_of(config)},
        "layers": [{"mediaType": artifact_type, "size": len(payload), "digest": digest_of(payload)}]}
    if subject is not None:
        document["subject"] = subject
    manifest = json.dumps(document).encode()
    return push_manifest(base_url, name, tag, manifest, OCI_MANIFEST), manifest


async def test_referrers_travel_with_their_image_and_are_served_offline_by_their_tags(
        registry: Registry, tmp_path: Path, client: aiohttp.ClientSession) -> None:
    """A cosign signature (`sha256-<hex>.sig`), an SBOM listed in the fallback referrers index
    (`sha256-<hex>`), and the SBOM's own signature: seeded, exported, imported and served
    offline under the tags clients look them up by."""
    image = push_raw_image(registry.url, "bundle/signed", "v1", [random.Random("signed").randbytes(4096)])
    image_hex = image.digest.removeprefix("sha256:")
    signature, signature_body = push_artifact(registry.url, image.name, f"sha256-{image_hex}.sig",
                                              b'{"critical": "simple signing"}',
                                              "application/vnd.dev.cosign.simplesigning.v1+json")
    sbom, sbom_body = push_artifact(registry.url, image.name, "sbom", b'{"spdxVersion": "SPDX-2.3"}',
                                    "application/spdx+json",
                                    {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)})
    referrers_index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                  "manifests": [{"mediaType": OCI_MANIFEST, "digest": sbom, "size": len(sbom_body),
                                                 "artifactType": "application/spdx+json"}]}).encode()
    push_manifest(registry.url, image.name, f"sha256-{image_hex}", referrers_index,
                  "application/vnd.oci.image.index.v1+json")
    sbom_signature, _ = push_artifact(registry.url, image.name, f"sha256-{sbom.removeprefix('sha256:')}.sig",
                                      b'{"critical": "signs the sbom"}',
                                      "application/vnd.dev.cosign.simplesigning.v1+json")
    listing = tmp_path / "images.yaml"
    listing.write_text("images:\n  - {ref: 'bundle/signed:v1', referrers: true}\n")
    manifest = json.loads(mirror("export", "-f", listing, "-o", tmp_path / "bundle", "--json", "--cache-dir",
                                 tmp_path / "near", upstream=registry.url).stdout)
    assert set(manifest["images"][0]["referrers"]) == {signature, sbom, sbom_signature}
    mirror("import", tmp_path / "bundle", "--cache-dir", tmp_path / "far")
    async with await Served.start("--cache-dir", tmp_path / "far", "--upstream", "docker.io=http://127.0.0.1:9",
                                  "--offline") as offline:
        base = f"{offline.url}/v2/{image.name}/manifests"
        assert (await fetch(client, f"{base}/sha256-{image_hex}.sig"))[:2] == (200, signature_body)
        status, body, _ = await fetch(client, f"{base}/sha256-{image_hex}")
        assert (status, body) == (200, referrers_index)
        assert (await fetch(client, f"{base}/{sbom}"))[:2] == (200, sbom_body)
        status, _, _ = await fetch(client, f"{base}/sha256-{sbom.removeprefix('sha256:')}.sig")
        assert status == 200, "the signature of the SBOM came along too"
        # The referrers API answers from the snapshot, the SBOM's (empty) list included.
        referrers = f"{offline.url}/v2/{image.name}/referrers"
        status, body, _ = await fetch(client, f"{referrers}/{image.digest}")
        assert (status, json.loads(body)["manifests"]) == (200, json.loads(referrers_index)["manifests"])
        status, body, _ = await fetch(client, f"{referrers}/{sbom}")
        assert (status, json.loads(body)["manifests"]) == (200, [])
        status, _, _ = await fetch(client, f"{referrers}/sha256:{'0' * 64}")
        assert status == 503, "never an empty list for a subject the snapshot knows nothing of"


def small_disk(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if (reason := mount_tmpfs(path, str(size))) is not None:
        pytest.skip(f"no small filesystem to fill here: {reason}")


async def test_a_disk_too_small_is_said_up_front_and_a_disk_full_mid_way_resumes(
        registry: Registry, big: PushedImage, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("bundle/big:v1\nalpine:3.19\n")
    usb = tmp_path / "usb"
    small_disk(usb, 2 * MiB)
    try:
        export: list[str | Path] = ["export", "-f", listing, "-o", usb / "bundle", "--volume-size", "1MiB",
                  "--cache-dir", tmp_path / "near"]
        refused = mirror(*export, upstream=registry.url, check=False)
        assert refused.returncode == 1 and "bytes free; the bundle needs" in refused.stderr, refused.stderr
        assert not list((usb / "bundle").glob("volume-*")), "nothing written when it cannot fit"

        # Room for the blobs, not for the volumes' own bytes: it runs out of disk part-way.
        shipped = sum(len(b) for b in big.blobs.values()) + len(big.manifest) + sum(
            len(b) for b in registry.images["single"].blobs.values()) + len(registry.images["single"].manifest)
        resize_tmpfs(usb, str(shipped + 16 * 1024))
        full = mirror(*export, upstream=registry.url, check=False)
        assert full.returncode == 1 and "No space left" in full.stderr, full.stderr
        written = {p.name: p.stat().st_ino for p in (usb / "bundle").glob("volume-*.tar")}
        assert written, "it ran out part-way, after some volumes were whole"
        assert not list((usb / "bundle").glob(".*.partial")), "no partial volume is left behind"
        assert not (usb / "bundle" / "mirror-bundle.json").exists()

        resize_tmpfs(usb, str(8 * MiB))
        mirror(*export, upstream=registry.url)
        after = {p.name: p.stat().st_ino for p in (usb / "bundle").glob("volume-*.tar")}
        assert all(after[name] == inode for name, inode in written.items()), "a finished volume was rewritten"
        result = json.loads(mirror("import", usb / "bundle", "--cache-dir", tmp_path / "far", "--json").stdout)
        assert sorted(result["images"]) == ["docker.io/bundle/big:v1", "docker.io/library/alpine:3.19"]
    finally:
        unmount(usb)


async def test_volumes_can_be_imported_one_at_a_time_as_they_arrive(
        registry: Registry, big: PushedImage, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("bundle/big:v1\n")
    bundle = tmp_path / "bundle"
    mirror("export", "-f", listing, "-o", bundle, "--volume-size", "1MiB", "--cache-dir", tmp_path / "near",
           upstream=registry.url)
    volumes = sorted(bundle.glob("volume-*.tar"))
    assert len(volumes) >= 3
    far = tmp_path / "far"
    manifest = json.loads((bundle / "mirror-bundle.json").read_text())
    layer = next(d for d in big.blobs if len(big.blobs[d]) == 3 * MiB)
    with_parts = {f"volume-{part['volume']:04d}.tar" for part in manifest["blobs"][layer]["parts"]}
    # The other volumes first; then those holding parts of the layer, last to first, so that
    # the layer is whole only with the last one.
    volumes = [*(v for v in volumes if v.name not in with_parts),
               *sorted((v for v in volumes if v.name in with_parts), reverse=True)]
    for n, volume in enumerate(volumes, 1):
        run = mirror("import", volume, bundle / "mirror-bundle.json", "--cache-dir", far, "--json", check=False)
        result = json.loads(run.stdout)
        if n < len(volumes):
            assert run.returncode == 1 and result["images"] == []
            assert any("kept until the volumes with the others are imported" in p for p in result["problems"])
        else:
            assert run.returncode == 0, result
            assert result["images"] == ["docker.io/bundle/big:v1"]
    assert (far / "blobs" / "sha256" / layer[7:9] / layer[7:]).read_bytes() == big.blobs[layer]
    assert not (far / "import-parts").exists() or not any((far / "import-parts").rglob("*.*")), "parts cleared"


def rewrite_manifest(bundle: Path, change: Any) -> None:
    path = bundle / "mirror-bundle.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.fixture
def directory_bundle(registry: Registry, tmp_path: Path) -> Path:
    listing = tmp_path / "images.txt"
    listing.write_text("alpine:3.19\nbusybox:1.36\n")
    bundle = tmp_path / "dir-bundle"
    mirror("export", "-f", listing, "-o", bundle, "--cache-dir", tmp_path / "near", upstream=registry.url)
    return bundle


def test_a_bundle_whose_tags_name_what_it_does_not_ship_tags_nothing(
        directory_bundle: Path, registry: Registry, tmp_path: Path) -> None:
    busybox = registry.images["docker"]
    layer = next(d for d in busybox.blobs if d != json.loads(busybox.manifest)["config"]["digest"])

    def lie(document: dict[str, Any]) -> None:
        alpine = next(i for i in document["images"] if "alpine" in i["reference"])
        alpine["manifests"] = []  # its tag would name a manifest the bundle does not list
        alpine["upstream"], alpine["name"] = "evil.example", "../../weird"  # ignored: the reference says
    rewrite_manifest(directory_bundle, lie)
    (directory_bundle / "blobs" / "sha256" / layer.removeprefix("sha256:")).unlink()
    run = mirror("import", directory_bundle, "--cache-dir", tmp_path / "far", "--json", check=False)
    assert run.returncode == 1
    result = json.loads(run.stdout)
    assert sorted(result["incomplete"]) == ["docker.io/library/alpine:3.19", "docker.io/library/busybox:1.36"]
    assert sqlite_tags(tmp_path / "far") == set(), "no tag names content that is not all here"


@pytest.mark.parametrize("field", ["digest", "manifests", "referrer_tags", "reference"])
def test_a_malformed_bundle_manifest_is_refused_by_name_without_a_traceback(
        field: str, directory_bundle: Path, tmp_path: Path) -> None:
    bad = {"digest": "sha256:zz", "manifests": ["sha512:" + "a" * 128], "referrer_tags": {"bad tag!": "x"},
           "reference": "Not A Reference::"}[field]
    rewrite_manifest(directory_bundle, lambda document: document["images"][0].__setitem__(field, bad))
    run = mirror("import", directory_bundle, "--cache-dir", tmp_path / "far", check=False)
    assert run.returncode == 2 and "mirror-bundle.json" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_links_and_pipes_in_a_bundle_directory_are_not_followed(directory_bundle: Path, tmp_path: Path) -> None:
    blobs = sorted((directory_bundle / "blobs" / "sha256").iterdir())
    secret = tmp_path / "outside"
    secret.write_bytes(b"not part of the bundle")
    linked = f"sha256:{hashlib.sha256(secret.read_bytes()).hexdigest()}"
    os.symlink(secret, directory_bundle / "blobs" / "sha256" / linked.removeprefix("sha256:"))
    blobs[0].unlink()
    os.mkfifo(blobs[0])
    run = mirror("import", directory_bundle, "--cache-dir", tmp_path / "far", "--json", check=False)
    problems = json.loads(run.stdout)["problems"]
    assert any(blobs[0].name in p and "not a regular file" in p for p in problems), problems
    assert any(linked.removeprefix("sha256:") in p and "cannot be read" in p for p in problems), problems
    assert f"blobs/sha256/{linked[7:9]}/{linked[7:]}" not in cache_files(tmp_path / "far")

    manifest = directory_bundle / "mirror-bundle.json"
    manifest.unlink()
    os.mkfifo(manifest)
    refused = mirror("import", directory_bundle, "--cache-dir", tmp_path / "other", check=False)
    assert refused.returncode == 2 and "not a regular file" in refused.stderr


async def test_ctrl_c_stops_an_export_between_two_files_and_the_same_command_finishes(
        registry: Registry, big: PushedImage, tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("bundle/big:v1\nalpine:3.19\n")
    bundle = tmp_path / "bundle"
    command = ["export", "-f", str(listing), "-o", str(bundle), "--volume-size", "1MiB", "--cache-dir",
               str(tmp_path / "cache"), "--upstream", f"docker.io={registry.url}"]
    mirror(*command)  # fills the cache; the bundle is then written again from scratch
    planned = len(list(bundle.glob("volume-*.tar")))
    for leftover in bundle.iterdir():
        leftover.unlink()
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "mirror", *command,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        while not (bundle / "volume-0001.tar").exists() and process.returncode is None:
            await asyncio.sleep(0.002)
        process.send_signal(signal.SIGINT)
        _, err = await process.communicate()
    assert process.returncode == 130, err.decode()[-2000:]
    assert "run the same command again" in err.decode()
    assert not (bundle / "mirror-bundle.json").exists()
    stopped = {p.name: p.stat().st_ino for p in bundle.glob("volume-*.tar")}
    assert 1 <= len(stopped) < planned, "it stopped at the next file, not at the end"
    assert not list(bundle.glob(".*.partial"))
    mirror(*command)
    assert all((bundle / name).stat().st_ino == inode for name, inode in stopped.items())
    assert (bundle / "mirror-bundle.json").exists()


def test_a_layout_tarred_by_another_tool_imports(directory_bundle: Path, tmp_path: Path) -> None:
    """GNU tar writes `./` before every name and an entry for every directory."""
    archive = tmp_path / "layout.tar"
    subprocess.run(["tar", "-C", str(directory_bundle), "-cf", str(archive), "."], check=True)
    assert "./blobs/sha256/" in subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True,
                                               check=True).stdout
    result = json.loads(mirror("import", archive, "--cache-dir", tmp_path / "far", "--json").stdout)
    assert sorted(result["images"]) == ["docker.io/library/alpine:3.19", "docker.io/library/busybox:1.36"]
