"""Blobs in a shared bucket (a real SeaweedFS): published whole and verified or not at all,
served back with Range, and shared by mirrors that share the bucket."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.config import S3Config, S3Location
from mirror.errors import IntegrityError
from mirror.oci import Digest
from mirror.s3store import S3Store, part_size
from tests.conftest import Counting, MirrorFactory, Registry
from tests.support.images import push_raw_image
from tests.support.pulls import fetch, pull_blob, pull_manifest
from tests.support.seaweedfs import SeaweedFS

MiB = 1 << 20
CACHE = "X-Mirror-Cache"


def settings(seaweedfs: SeaweedFS) -> S3Config:
    return S3Config(endpoint=seaweedfs.endpoint, region=seaweedfs.region, access_key_id=seaweedfs.access_key,
                    secret_access_key=seaweedfs.secret_key)


async def objects(seaweedfs: SeaweedFS, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, with its bytes."""
    found: dict[str, bytes] = {}
    async with seaweedfs.client() as s3:
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                answer = await s3.get_object(Bucket=bucket, Key=item["Key"])
                async with answer["Body"] as body:
                    found[item["Key"]] = await body.read()
    return found


async def pending_uploads(seaweedfs: SeaweedFS, bucket: str) -> list[str]:
    async with seaweedfs.client() as s3:
        listing = await s3.list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in listing.get("Uploads", [])]


@pytest.fixture
async def store(seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path) -> AsyncIterator[S3Store]:
    opened = S3Store(S3Location(s3_bucket, "team/cache"), settings(seaweedfs), tmp_path / "spool")
    opened.spool.lock()
    await opened.open()
    yield opened
    await opened.close()
    opened.spool.unlock()


def digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


def test_parts_grow_so_the_largest_layer_fits_in_ten_thousand() -> None:
    assert part_size(1 * MiB) == 8 * MiB
    for size in (50 << 30, 200 << 30, 1 << 40):
        assert size / part_size(size) < 10_000
    assert part_size(None) * 10_000 >= 600 << 30


async def test_a_streamed_blob_is_uploaded_in_parts_and_published_under_its_digest(
        store: S3Store, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    data = random.Random(1).randbytes(19 * MiB + 123)
    writer = store.writer(digest(data), len(data))
    try:
        for start in range(0, len(data), 3 * MiB):
            await writer.write(data[start:start + 3 * MiB])
        assert await pending_uploads(seaweedfs, s3_bucket), "parts go while the blob downloads"
        assert await store.size(digest(data)) is None, "nothing is visible before it is verified"
        await writer.commit()
    finally:
        await writer.discard()
    assert await objects(seaweedfs, s3_bucket) == {f"team/cache/blobs/sha256/{digest(data).hex}": data}
    assert await pending_uploads(seaweedfs, s3_bucket) == []
    assert await store.size(digest(data)) == len(data)
    assert b"".join([c async for c in store.chunks(digest(data), 5, 10 * MiB)]) == data[5:10 * MiB]
    assert {d: size for d, (size, _) in (await store.scan()).items()} == {str(digest(data)): len(data)}
    assert list((store.spool.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("size", [1 * MiB, 17 * MiB], ids=["one-put", "multipart"])
async def test_bytes_that_do_not_match_their_digest_never_become_an_object(
        store: S3Store, seaweedfs: SeaweedFS, s3_bucket: str, size: int) -> None:
    data = random.Random(2).randbytes(size)
    claimed = digest(data[:-1] + b"!")
    writer = store.writer(claimed, len(data))
    try:
        await writer.write(data)
        with pytest.raises(IntegrityError):
            await writer.commit()
    finally:
        await writer.discard()
    assert await objects(seaweedfs, s3_bucket) == {}
    assert await pending_uploads(seaweedfs, s3_bucket) == [], "the upload was aborted"


async def test_a_blob_published_twice_is_one_object(store: S3Store, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    """Two replicas racing on one digest: both publish, one object (the same bytes) is left."""
    data = random.Random(3).randbytes(9 * MiB)
    writers = [store.writer(digest(data), len(data)) for _ in range(2)]
    try:
        for writer in writers:
            await writer.write(data)
        for writer in writers:
            await writer.commit()
    finally:
        for writer in writers:
            await writer.discard()
    assert list((await objects(seaweedfs, s3_bucket)).values()) == [data]
    assert await pending_uploads(seaweedfs, s3_bucket) == []


async def test_a_mirror_on_s3_serves_hits_from_the_bucket_with_ranges(
        registry_with_image: tuple[str, bytes, str], counting: Counting, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path) -> None:
    name, layer, layer_digest = registry_with_image
    mirror = await make_mirror({"docker.io": counting.url}, storage=S3Location(s3_bucket, "mirror"),
                               s3=settings(seaweedfs))
    first = await pull_blob(client, mirror, name, layer_digest)
    assert (first.status, first.headers[CACHE]) == (200, "MISS") and first.body == layer
    await mirror.services.background.join()
    hit = await pull_blob(client, mirror, name, layer_digest)
    assert (hit.status, hit.headers[CACHE], hit.body) == (200, "HIT", layer)
    ranged = await fetch(client, f"{mirror.url}/v2/{name}/blobs/{layer_digest}", headers={"Range": "bytes=100-4195"})
    assert ranged.status == 206 and ranged.body == layer[100:4196]
    assert ranged.headers["Content-Range"] == f"bytes 100-4195/{len(layer)}"
    outside = await fetch(client, f"{mirror.url}/v2/{name}/blobs/{layer_digest}",
                          headers={"Range": f"bytes={len(layer)}-"})
    assert outside.status == 416
    assert counting.count("GET", "blobs") == 1
    stored = await objects(seaweedfs, s3_bucket)
    assert stored[f"mirror/blobs/sha256/{layer_digest.removeprefix('sha256:')}"] == layer
    assert not (mirror.services.config.cache_dir / "blobs").exists(), "nothing is kept on the local disk"


async def test_mirrors_sharing_a_bucket_fetch_a_blob_once(
        registry_with_image: tuple[str, bytes, str], counting: Counting, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    name, layer, layer_digest = registry_with_image
    first, second = [await make_mirror({"docker.io": counting.url}, storage=S3Location(s3_bucket, "shared"),
                                       s3=settings(seaweedfs)) for _ in range(2)]
    assert (await pull_manifest(client, first, name, "v1")).status == 200
    assert (await pull_blob(client, first, name, layer_digest)).body == layer
    await first.services.background.join()
    counting.reset()
    again = await pull_blob(client, second, name, layer_digest)
    assert (again.status, again.headers[CACHE], again.body) == (200, "HIT", layer)
    assert counting.count("GET") == 0, "the second mirror found the blob in the bucket"


async def test_a_bucket_that_stops_answering_fails_reads_cleanly_and_writes_nothing(
        registry_with_image: tuple[str, bytes, str], counting: Counting, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    name, layer, layer_digest = registry_with_image
    mirror = await make_mirror({"docker.io": counting.url}, storage=S3Location(s3_bucket, "down"),
                               s3=settings(seaweedfs))
    assert (await pull_blob(client, mirror, name, layer_digest)).body == layer
    await mirror.services.background.join()
    seaweedfs.kill()
    try:
        failed = await pull_blob(client, mirror, name, layer_digest)
        assert failed.status == 503
        assert failed.error_code() == "UNAVAILABLE"
        assert b"object storage" in failed.body
        ready = await fetch(client, f"{mirror.url}/readyz")
        assert ready.status == 503 and f"reaching bucket {s3_bucket}" in ready.body.decode()
    finally:
        seaweedfs.start()
    assert (await pull_blob(client, mirror, name, layer_digest)).body == layer


@pytest.fixture
def registry_with_image(registry: Registry) -> tuple[str, bytes, str]:
    layer = random.Random("s3").randbytes(3 * MiB + 7)
    image = push_raw_image(registry.url, "s3/app", "v1", [layer])
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert layer_digest in image.blobs
    return image.name, layer, layer_digest


async def test_hits_can_be_redirected_to_the_bucket(
        registry_with_image: tuple[str, bytes, str], counting: Counting, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    """With presign on, a hit is a 307 to a short-lived URL of the object: clients that can reach
    the bucket fetch the bytes there (a Range too), and a miss still streams through the mirror."""
    name, layer, layer_digest = registry_with_image
    presigned = dataclasses.replace(settings(seaweedfs), presign=True, presign_ttl=60.0)
    mirror = await make_mirror({"docker.io": counting.url}, storage=S3Location(s3_bucket, "direct"), s3=presigned)
    miss = await pull_blob(client, mirror, name, layer_digest)
    assert (miss.status, miss.headers[CACHE], miss.body) == (200, "MISS", layer)
    await mirror.services.background.join()
    url = f"{mirror.url}/v2/{name}/blobs/{layer_digest}"
    redirected = await fetch(client, url)
    assert redirected.body == layer, "followed to the bucket"
    async with client.get(url, allow_redirects=False) as response:
        assert response.status == 307 and response.headers["X-Mirror-Cache"] == "HIT"
        location = response.headers["Location"]
    assert location.startswith(f"{seaweedfs.endpoint}/{s3_bucket}/direct/blobs/sha256/")
    assert "X-Amz-Expires=60" in location, "signed (SigV4) for a minute"
    ranged = await fetch(client, url, headers={"Range": "bytes=10-19"})
    assert (ranged.status, ranged.body) == (206, layer[10:20])


@dataclasses.dataclass
class FailingS3:
    """A pass-through in front of SeaweedFS that answers 500 to part uploads while `failing`."""

    url: str = ""
    failing: int = 0
    refused: int = 0


@pytest.fixture
async def failing_s3(seaweedfs: SeaweedFS) -> AsyncIterator[FailingS3]:
    state = FailingS3()
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async def forward(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            if request.method == "PUT" and "partNumber" in request.query and state.failing > 0:
                state.failing -= 1
                state.refused += 1
                return web.Response(status=500, body=b"<Error><Code>InternalError</Code></Error>")
            # The Host header is passed on as it came: it is part of what the client signed.
            async with session.request(request.method, f"{seaweedfs.endpoint}{request.rel_url}", data=body,
                                       headers=request.headers, allow_redirects=False) as reply:
                payload = await reply.read()
                headers = {k: v for k, v in reply.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "content-encoding")}
                return web.Response(status=reply.status, body=payload, headers=headers)

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{path:.*}", forward)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        state.url = str(server.make_url("")).rstrip("/")
        yield state
        await server.close()


async def test_an_object_store_failing_mid_upload_publishes_nothing_and_the_next_pull_works(
        registry: Registry, counting: Counting, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        seaweedfs: SeaweedFS, s3_bucket: str, failing_s3: FailingS3) -> None:
    layer = random.Random("s3-5xx").randbytes(20 * MiB)
    image = push_raw_image(registry.url, "s3/faulty", "v1", [layer])
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert layer_digest in image.blobs
    through = dataclasses.replace(settings(seaweedfs), endpoint=failing_s3.url)
    mirror = await make_mirror({"docker.io": counting.url}, storage=S3Location(s3_bucket, "faulty"), s3=through)
    failing_s3.failing = 1000
    # The client may well get the whole blob: its bytes are verified before they are published.
    # What it never gets is a wrong byte, or a short body that looks whole.
    outcome = await pull_blob_outcome(client, f"{mirror.url}/v2/{image.name}/blobs/{layer_digest}", layer)
    assert outcome in ("whole", "cut", "error status"), outcome
    await mirror.services.background.join()
    assert failing_s3.refused >= 1
    assert await objects(seaweedfs, s3_bucket) == {}, "nothing partial is ever visible"
    assert await pending_uploads(seaweedfs, s3_bucket) == [], "the upload was aborted"
    failing_s3.failing = 0
    again = await pull_blob(client, mirror, image.name, layer_digest)
    assert (again.status, again.body) == (200, layer)
    await mirror.services.background.join()
    assert list((await objects(seaweedfs, s3_bucket)).values()) == [layer]


async def pull_blob_outcome(client: aiohttp.ClientSession, url: str, expected: bytes) -> str:
    """How a pull ends: an OCI error, a cut whose bytes up to it are right, or the whole blob."""
    got = b""
    try:
        async with client.get(url) as response:
            if response.status >= 400:
                return "error status"
            async for chunk in response.content.iter_any():
                got += chunk
                assert expected.startswith(got), "wrong bytes before the cut"
    except aiohttp.ClientPayloadError:
        return "cut"
    return "whole" if got == expected else f"short ({len(got)} bytes) without a cut"
