"""Build real, reproducible images and push them to a registry over the HTTP API.

Tests need upstream content whose exact bytes and digests are known in advance
so they can assert that the mirror serves them unchanged. Everything here is
deterministic: the same call always produces the same blobs and manifests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import random
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Literal

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
RAW_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MAX_CHUNK = 64 * 1024 * 1024
"""Largest PATCH body sent by push_blob_stream, bounding memory for huge blobs."""

Flavour = Literal["oci", "docker"]
Platform = tuple[str, str]
"""(os, architecture), e.g. ("linux", "amd64")."""

_CREATED = "2024-01-01T00:00:00Z"
_TIMEOUT = 120.0

# Never route loopback test traffic through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class _MediaTypes:
    manifest: str
    index: str
    config: str
    layer: str


_FLAVOURS: dict[str, _MediaTypes] = {
    "oci": _MediaTypes(OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, OCI_LAYER),
    "docker": _MediaTypes(DOCKER_MANIFEST, DOCKER_LIST, DOCKER_CONFIG, DOCKER_LAYER),
}


@dataclass(frozen=True)
class PushedImage:
    """What was pushed, so tests can compare the mirror's answers byte for byte.

    ``tag`` is the reference the manifest was pushed under (the digest itself
    for index children). ``blobs`` maps digest -> bytes of every config and
    layer blob; for an index it is the union over ``children``.
    """

    name: str
    tag: str
    digest: str
    media_type: str
    manifest: bytes
    blobs: dict[str, bytes]
    children: list[PushedImage] = field(default_factory=list)


class RegistryError(RuntimeError):
    """The registry answered unexpectedly; status and body are kept to explain test failures."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        super().__init__(
            f"{method} {url} -> {status}: {body[:500].decode('utf-8', errors='replace')}"
        )
        self.status = status
        self.body = body


def digest_of(data: bytes) -> str:
    """The ``sha256:<hex>`` content digest used throughout the distribution API."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(document: object) -> bytes:
    """Compact, key-sorted JSON: the exact bytes pushed are what the digest covers."""
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _request(
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    expect: tuple[int, ...] = (200,),
) -> tuple[int, Message, bytes]:
    """Send one request and return (status, headers, body); non-2xx answers are not exceptions here."""
    request = urllib.request.Request(
        url, data=data, method=method, headers=dict(headers or {})
    )
    try:
        with _OPENER.open(request, timeout=_TIMEOUT) as response:
            status: int = response.status
            reply: Message = response.headers
            body: bytes = response.read()
    except urllib.error.HTTPError as err:
        status, reply, body = err.code, err.headers, err.read()
    if status not in expect:
        raise RegistryError(method, url, status, body)
    return status, reply, body


def _blob_exists(base_url: str, name: str, digest: str) -> bool:
    status, _, _ = _request(
        "HEAD", f"{base_url}/v2/{name}/blobs/{digest}", expect=(200, 404)
    )
    return status == 200


def _start_upload(base_url: str, name: str) -> str:
    """Open an upload session and return its absolute URL."""
    url = f"{base_url}/v2/{name}/blobs/uploads/"
    _, headers, _ = _request("POST", url, expect=(202,))
    return _follow(url, headers)


def _follow(request_url: str, headers: Message) -> str:
    """Resolve a (possibly relative) Location header against the URL that returned it."""
    location = headers.get("Location")
    if not location:
        raise RuntimeError("registry response carries no Location header")
    return urllib.parse.urljoin(request_url, location)


def _with_digest(upload_url: str, digest: str) -> str:
    """Append ``digest=`` to an upload URL that may already carry a query string (state tokens)."""
    separator = "&" if urllib.parse.urlsplit(upload_url).query else "?"
    return f"{upload_url}{separator}{urllib.parse.urlencode({'digest': digest})}"


def _finish_upload(upload_url: str, digest: str, data: bytes) -> None:
    """Close an upload session, letting the registry verify the digest."""
    _, headers, _ = _request(
        "PUT",
        _with_digest(upload_url, digest),
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        expect=(201,),
    )
    if headers.get("Docker-Content-Digest") != digest:
        raise RuntimeError(
            f"registry stored {headers.get('Docker-Content-Digest')}, expected {digest}"
        )


def push_blob(base_url: str, name: str, data: bytes) -> str:
    """Monolithic upload (POST then PUT with the whole body); returns the digest."""
    digest = digest_of(data)
    if not _blob_exists(base_url, name, digest):
        _finish_upload(_start_upload(base_url, name), digest, data)
    return digest


def _regroup(chunks: Iterable[bytes], max_chunk: int) -> Iterator[bytes]:
    """Coalesce or split arbitrary input pieces into parts of at most ``max_chunk`` bytes."""
    buffer = bytearray()
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            take = max_chunk - len(buffer)
            buffer += view[:take]
            view = view[take:]
            if len(buffer) == max_chunk:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def push_blob_stream(
    base_url: str,
    name: str,
    chunks: Iterable[bytes],
    digest: str,
    size: int,
    *,
    max_chunk: int = MAX_CHUNK,
) -> None:
    """Chunked upload (POST, PATCH per part, PUT) so multi-GiB blobs never sit in memory whole.

    ``digest`` and ``size`` must describe the concatenated ``chunks``; the
    registry rejects a wrong digest and a wrong size raises ValueError.
    """
    if max_chunk <= 0:
        raise ValueError("max_chunk must be positive")
    if _blob_exists(base_url, name, digest):
        return
    upload_url = _start_upload(base_url, name)
    offset = 0
    for part in _regroup(chunks, max_chunk):
        _, headers, _ = _request(
            "PATCH",
            upload_url,
            data=part,
            headers={
                # urllib would otherwise send x-www-form-urlencoded, which distribution rejects.
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(part) - 1}",
                "Content-Length": str(len(part)),
            },
            expect=(202,),
        )
        upload_url = _follow(upload_url, headers)
        offset += len(part)
    if offset != size:
        raise ValueError(f"chunks held {offset} bytes, expected {size}")
    _finish_upload(upload_url, digest, b"")


def push_manifest(
    base_url: str, name: str, reference: str, body: bytes, media_type: str
) -> str:
    """PUT a manifest under a tag or digest; returns the sha256 of the exact bytes."""
    digest = digest_of(body)
    _, headers, _ = _request(
        "PUT",
        f"{base_url}/v2/{name}/manifests/{reference}",
        data=body,
        headers={"Content-Type": media_type},
        expect=(201,),
    )
    if headers.get("Docker-Content-Digest") != digest:
        raise RuntimeError(
            f"registry stored manifest {headers.get('Docker-Content-Digest')}, expected {digest}"
        )
    return digest


def make_layer(files: dict[str, bytes]) -> bytes:
    """A gzip-compressed tar a real runtime could unpack, byte-identical on every run.

    Parent directories are added explicitly; entries are sorted and carry
    mtime 0 and uid/gid 0 so only ``files`` determines the digest.
    """
    normalised = {path.strip("/"): data for path, data in files.items()}
    directories = {
        "/".join(parts[:depth])
        for parts in (path.split("/") for path in normalised)
        for depth in range(1, len(parts))
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(directories | normalised.keys()):
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if path in normalised:
                info.mode = 0o644
                info.size = len(normalised[path])
                tar.addfile(info, io.BytesIO(normalised[path]))
            else:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
    return gzip.compress(raw.getvalue(), mtime=0)


def random_layer(size: int, seed: int) -> bytes:
    """A layer with one file of reproducible pseudo-random (incompressible) bytes, distinct per seed."""
    return make_layer({f"data/random-{seed}.bin": random.Random(seed).randbytes(size)})


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "size": len(data), "digest": digest_of(data)}


def _config(layers: list[bytes], platform: Platform) -> bytes:
    """Image config whose diff_ids are the digests of the uncompressed layer tars, as runtimes check."""
    os_name, architecture = platform
    return _dumps(
        {
            "architecture": architecture,
            "os": os_name,
            "created": _CREATED,
            "config": {
                "Cmd": ["/bin/sh"],
                "Env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                ],
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": [digest_of(gzip.decompress(layer)) for layer in layers],
            },
        }
    )


def _push_single(
    base_url: str,
    name: str,
    reference: str | None,
    layers: list[bytes],
    media_type: Flavour,
    platform: Platform,
) -> PushedImage:
    """Push blobs and manifest; ``reference=None`` pushes by digest only, as index children are."""
    types = _FLAVOURS[media_type]
    config = _config(layers, platform)
    blobs = {push_blob(base_url, name, blob): blob for blob in [*layers, config]}
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": types.manifest,
            "config": _descriptor(types.config, config),
            "layers": [_descriptor(types.layer, layer) for layer in layers],
        }
    )
    target = reference if reference is not None else digest_of(manifest)
    digest = push_manifest(base_url, name, target, manifest, types.manifest)
    return PushedImage(name, target, digest, types.manifest, manifest, blobs)


def push_image(
    base_url: str,
    name: str,
    tag: str,
    *,
    layers: list[bytes],
    media_type: Flavour = "oci",
    platform: Platform = ("linux", "amd64"),
) -> PushedImage:
    """Push a single-platform image (layers, config, manifest) under ``tag``."""
    return _push_single(base_url, name, tag, layers, media_type, platform)


def _seed(*parts: str) -> int:
    """Stable integer seed from strings (unlike hash(), independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big")


def push_index(
    base_url: str,
    name: str,
    tag: str,
    *,
    platforms: list[Platform],
    media_type: Flavour = "oci",
    layers_per_image: int = 1,
) -> PushedImage:
    """Push one image per platform by digest, then an OCI index / Docker manifest list under ``tag``."""
    types = _FLAVOURS[media_type]
    children = [
        _push_single(
            base_url,
            name,
            None,
            [
                random_layer(4096, _seed(name, tag, os_name, arch, str(i)))
                for i in range(layers_per_image)
            ],
            media_type,
            (os_name, arch),
        )
        for os_name, arch in platforms
    ]
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": types.index,
            "manifests": [
                {
                    **_descriptor(child.media_type, child.manifest),
                    "platform": {"architecture": arch, "os": os_name},
                }
                for child, (os_name, arch) in zip(children, platforms, strict=True)
            ],
        }
    )
    digest = push_manifest(base_url, name, tag, manifest, types.index)
    blobs = {d: b for child in children for d, b in child.blobs.items()}
    return PushedImage(name, tag, digest, types.index, manifest, blobs, children)


def populate(base_url: str) -> dict[str, PushedImage]:
    """Push the standard upstream test set (about 200 KiB) and return it keyed by short label."""
    amd64_arm64: list[Platform] = [("linux", "amd64"), ("linux", "arm64")]
    return {
        "single": push_image(
            base_url,
            "library/alpine",
            "3.19",
            layers=[
                make_layer(
                    {"etc/os-release": b'NAME="Alpine Linux"\nVERSION_ID=3.19.0\n'}
                ),
                random_layer(16 * 1024, 1),
            ],
        ),
        "docker": push_image(
            base_url,
            "library/busybox",
            "1.36",
            layers=[random_layer(32 * 1024, 2)],
            media_type="docker",
        ),
        "index": push_index(base_url, "library/multi", "1.0", platforms=amd64_arm64),
        "list": push_index(
            base_url,
            "library/dockerlist",
            "1.0",
            platforms=amd64_arm64,
            media_type="docker",
        ),
        "many": push_image(
            base_url,
            "library/manylayers",
            "1.0",
            layers=[random_layer(8 * 1024, 100 + i) for i in range(12)],
        ),
        "team": push_image(
            base_url, "team/app", "v1", layers=[random_layer(8 * 1024, 200)]
        ),
    }


def host_architecture() -> str:
    """The OCI architecture a client on this machine resolves a multi-platform image to."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def for_platform(image: PushedImage, architecture: str) -> PushedImage:
    """The single-platform image a client on `architecture` gets for `image`."""
    if not image.children:
        return image
    for child in image.children:
        config = json.loads(child.blobs[json.loads(child.manifest)["config"]["digest"]])
        if config["architecture"] == architecture:
            return child
    raise LookupError(f"{image.name}:{image.tag} has no {architecture} image")


def config_of(image: PushedImage) -> tuple[str, dict[str, Any]]:
    """A single-platform image's config digest and document."""
    digest: str = json.loads(image.manifest)["config"]["digest"]
    return digest, json.loads(image.blobs[digest])


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The snapshot keys a runtime gives an image's unpacked layers (the OCI image spec's ChainID)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(diff_id if not chain else digest_of(f"{chain[-1]} {diff_id}".encode()))
    return chain


def push_raw_image(base_url: str, name: str, tag: str, layers: list[bytes]) -> PushedImage:
    """An OCI image whose layers are opaque bytes (no gzip to spend time on): the mirror and
    skopeo's dir: transport only care about digests."""
    config = _dumps({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]}})
    blobs = {push_blob(base_url, name, blob): blob for blob in [*layers, config]}
    manifest = _dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": digest_of(config)},
        "layers": [{"mediaType": RAW_LAYER, "size": len(layer), "digest": digest_of(layer)} for layer in layers],
    })
    digest = push_manifest(base_url, name, tag, manifest, OCI_MANIFEST)
    return PushedImage(name, tag, digest, OCI_MANIFEST, manifest, blobs)
