"""The S3 and Redis test servers work, and SeaweedFS behaves as the S3 blob store will rely on:
conditional writes (`If-None-Match: *`), multipart uploads invisible until completed, missing
buckets refused, objects kept across a crash; Redis leases with SET NX PX, lost on restart."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import TYPE_CHECKING

import pytest
import redis.asyncio
import redis.exceptions
from botocore.exceptions import ClientError
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedFS

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedMultipartUploadTypeDef

MiB = 1 << 20


def status(error: ClientError) -> int:
    return int(error.response["ResponseMetadata"]["HTTPStatusCode"])


def code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code"))


async def read(s3: S3Client, bucket: str, key: str) -> bytes:
    response = await s3.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as body:
        return await body.read()


async def upload_parts(s3: S3Client, bucket: str, key: str, parts: list[bytes]) -> tuple[str, list[str]]:
    """Start a multipart upload and send every part; returns the upload id and the part ETags."""
    upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
    etags = []
    for number, part in enumerate(parts, start=1):
        sent = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=part)
        etags.append(sent["ETag"])
    return upload["UploadId"], etags


def connect(server: RedisServer) -> redis.asyncio.Redis:
    """A client that reconnects when Redis comes back. Observed with redis-py 8.2: a client from
    `redis.asyncio.from_url(url)` alone has no retry, so after a Redis restart the first command
    on each pooled connection fails with "Connection closed by server"."""
    return redis.asyncio.from_url(server.url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), 3))


def completed(etags: list[str]) -> CompletedMultipartUploadTypeDef:
    return {"Parts": [{"ETag": etag, "PartNumber": n} for n, etag in enumerate(etags, start=1)]}


async def test_put_and_get_object(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    body = random.Random(1).randbytes(100_000)
    async with seaweedfs.client() as s3:
        await s3.put_object(Bucket=s3_bucket, Key="blobs/one", Body=body)
        assert await read(s3, s3_bucket, "blobs/one") == body
        head = await s3.head_object(Bucket=s3_bucket, Key="blobs/one")
        assert head["ContentLength"] == len(body)


async def test_multipart_upload_is_invisible_until_completed(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    parts = [random.Random(n).randbytes(5 * MiB) for n in range(3)]
    async with seaweedfs.client() as s3:
        upload_id, etags = await upload_parts(s3, s3_bucket, "big", parts)
        with pytest.raises(ClientError) as missing:
            await s3.head_object(Bucket=s3_bucket, Key="big")
        assert status(missing.value) == 404
        done = await s3.complete_multipart_upload(Bucket=s3_bucket, Key="big", UploadId=upload_id,
                                                  MultipartUpload=completed(etags))
        assert done["ETag"].strip('"').endswith("-3")  # S3's multipart ETag, not a digest of the bytes
        data = await read(s3, s3_bucket, "big")
        assert len(data) == 15 * MiB
        assert hashlib.sha256(data).digest() == hashlib.sha256(b"".join(parts)).digest()


async def test_conditional_put_refuses_an_existing_key(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    """Observed with SeaweedFS 4.48: PutObject with `If-None-Match: *` answers 412
    PreconditionFailed when the key exists, and leaves the object as it was."""
    async with seaweedfs.client() as s3:
        await s3.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
        with pytest.raises(ClientError) as refused:
            await s3.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*")
        assert (status(refused.value), code(refused.value)) == (412, "PreconditionFailed")
        assert await read(s3, s3_bucket, "k") == b"first"


async def test_conditional_complete_multipart_refuses_an_existing_key(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    """Observed with SeaweedFS 4.48: CompleteMultipartUpload with `If-None-Match: *` succeeds
    for a new key and answers 412 PreconditionFailed once the key exists, leaving the object as
    it was; the refused upload can still be aborted."""
    first, second = b"a" * (5 * MiB), b"b" * (5 * MiB)
    async with seaweedfs.client() as s3:
        upload_id, etags = await upload_parts(s3, s3_bucket, "blob", [first])
        await s3.complete_multipart_upload(Bucket=s3_bucket, Key="blob", UploadId=upload_id,
                                           MultipartUpload=completed(etags),
                                           IfNoneMatch="*")
        upload_id, etags = await upload_parts(s3, s3_bucket, "blob", [second])
        with pytest.raises(ClientError) as refused:
            await s3.complete_multipart_upload(Bucket=s3_bucket, Key="blob", UploadId=upload_id,
                                               MultipartUpload=completed(etags),
                                               IfNoneMatch="*")
        assert (status(refused.value), code(refused.value)) == (412, "PreconditionFailed")
        assert await read(s3, s3_bucket, "blob") == first
        await s3.abort_multipart_upload(Bucket=s3_bucket, Key="blob", UploadId=upload_id)


async def test_missing_bucket_is_refused(seaweedfs: SeaweedFS) -> None:
    """Started with -s3.autoCreateBucket=false, so a typo in a bucket name fails as on real S3."""
    async with seaweedfs.client() as s3:
        with pytest.raises(ClientError) as refused:
            await s3.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x")
        assert code(refused.value) == "NoSuchBucket"


async def test_objects_survive_a_crash_and_restart(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    body = random.Random(2).randbytes(3 * MiB)
    endpoint = seaweedfs.endpoint
    async with seaweedfs.client() as s3:
        await s3.put_object(Bucket=s3_bucket, Key="kept", Body=body)
        seaweedfs.kill()
        seaweedfs.start()
        assert seaweedfs.endpoint == endpoint
        # The same client: its pooled connections died with the server, and botocore retries.
        assert await read(s3, s3_bucket, "kept") == body


async def test_set_nx_px_lease(redis_server: RedisServer) -> None:
    async with connect(redis_server) as client:
        assert await client.set("lease:sha256:abc", "replica-1", nx=True, px=300) is True
        assert await client.set("lease:sha256:abc", "replica-2", nx=True, px=300) is None
        assert await client.get("lease:sha256:abc") == b"replica-1"
        assert 0 < await client.pttl("lease:sha256:abc") <= 300
        deadline = time.monotonic() + 5.0
        while await client.exists("lease:sha256:abc"):
            assert time.monotonic() < deadline, "the lease did not expire"
            await asyncio.sleep(0.02)
        assert await client.set("lease:sha256:abc", "replica-2", nx=True, px=300) is True


async def test_redis_flush_and_restart(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with connect(redis_server) as client:
        await client.set("a", "1")
        redis_server.flush()
        assert await client.get("a") is None
        await client.set("b", "2")
        redis_server.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        redis_server.start()
        assert redis_server.url == url
        # Same port, so the client reconnects; nothing was persisted, so the key is gone.
        assert await client.ping() is True
        assert await client.get("b") is None
        redis_server.restart()
        assert await client.ping() is True
