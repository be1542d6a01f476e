"""How tests talk to a mirror over HTTP, and the images they give the fake upstream: shared by
the fault, eviction, observability, credential and serve tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDictProxy

from mirror.oci import MANIFEST_MEDIA_TYPES, OCI_MANIFEST
from tests.support.fake_upstream import FakeUpstream

if TYPE_CHECKING:
    from tests.conftest import Mirror

NAME = "team/app"
OTHER = "team/other"
ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
CACHE = "X-Mirror-Cache"
# Upper bound for any single wait; the whole file runs in a few seconds.
TIMEOUT = 30.0


@dataclass
class Clock:
    """A clock the test moves: for TTLs, backoffs and credential lifetimes."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Image:
    name: str
    tag: str
    manifest: bytes
    digest: str
    config: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def error_code(self) -> str:
        document = json.loads(self.body)
        assert isinstance(document, dict), self.body[:200]
        code = document["errors"][0]["code"]
        assert isinstance(code, str)
        return code


def add_image(fake: FakeUpstream, name: str = NAME, tag: str = "latest", layers: Sequence[bytes] = (),
              seed: int = 0, pad: int = 0) -> Image:
    """A config blob, the given layers and an OCI manifest naming them, served by the fake."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    config_digest = fake.add_blob(config)
    layer_digests = tuple(fake.add_blob(layer) for layer in layers)
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                    "size": len(fake.blobs[d])} for d in layer_digests],
    }
    if pad:
        document["annotations"] = {"padding": "x" * pad}
    body = json.dumps(document, indent=2).encode()
    digest = fake.add_manifest(name, tag, body, OCI_MANIFEST)
    return Image(name, tag, body, digest, config_digest, layer_digests)


def manifest_url(mirror: Mirror, name: str, reference: str) -> str:
    return f"{mirror.url}/v2/{name}/manifests/{reference}"


def blob_url(mirror: Mirror, name: str, digest: str) -> str:
    return f"{mirror.url}/v2/{name}/blobs/{digest}"


async def fetch(client: aiohttp.ClientSession, url: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> Fetched:
    async with asyncio.timeout(TIMEOUT), client.request(method, url, headers=headers) as response:
        return Fetched(response.status, response.headers, await response.read())


async def pull_manifest(client: aiohttp.ClientSession, mirror: Mirror, name: str, reference: str) -> Fetched:
    return await fetch(client, manifest_url(mirror, name, reference), headers={"Accept": ACCEPT})


async def pull_blob(client: aiohttp.ClientSession, mirror: Mirror, name: str, digest: str) -> Fetched:
    return await fetch(client, blob_url(mirror, name, digest))


async def exchange(host: str, request: bytes) -> bytes:
    """Send raw bytes; everything the server answers until it closes (or a reset: b"")."""
    address, _, port = host.rpartition(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
