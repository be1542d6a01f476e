"""Blobs in an S3-compatible bucket, shared by every replica (aiobotocore: the asyncio binding
of the AWS SDK, on the aiohttp the mirror already runs on, with the SDK's own endpoint and
credential settings).

    <prefix>/blobs/sha256/<hex>      complete content whose sha256 is <hex>

A fill is spooled locally (its readers tail the spool, as on disk) and sent on to the bucket
while it downloads, in a multipart upload whose part size grows with the blob, so that the
largest layer fits in S3's 10,000 parts. The mirror hashes the bytes itself (S3's checksums are
not OCI digests); the upload is completed only once size and digest verify, and aborted
otherwise, so an object under a digest key is always whole and correct. Where the store honours
`If-None-Match: *` (probed at start-up), two replicas racing to publish one digest write it once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirror.config import S3Config, S3Location
from mirror.errors import StorageError
from mirror.oci import Digest
from mirror.spool import BlobWriter, Extent, Spool
from mirror.storage import put_bytes, put_extents

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

# S3's limits: parts of 5 MiB at least (but the last), 10,000 parts at most.
_MIN_PART = 8 << 20
_MAX_PARTS = 10_000
# Parts sent at once per upload; a fill waits for the oldest beyond that (the spool holds the rest).
_PARTS_IN_FLIGHT = 2
_READ_CHUNK = 1 << 20
_FAILURES = (ClientError, BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def part_size(expected_size: int | None) -> int:
    """Parts big enough for the whole blob to fit in S3's part limit, in whole MiB; a blob of
    unknown size gets parts for up to 640 GiB."""
    if expected_size is None:
        return 64 << 20
    needed = math.ceil(expected_size / (_MAX_PARTS - 1))
    return max(_MIN_PART, math.ceil(needed / (1 << 20)) << 20)


def _status(error: BaseException) -> int | None:
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def _failed(what: str, error: BaseException) -> StorageError:
    if isinstance(error, ClientError):
        detail = error.response.get("Error", {})
        reason = f"{detail.get('Code', 'error')} ({_status(error)})"
    else:
        reason = type(error).__name__
    return StorageError(f"object storage: {what} failed: {reason}")


@contextmanager
def _answers(what: str) -> Iterator[None]:
    """S3's failures as the store's: a missing key is FileNotFoundError, anything else that
    fails (an answer, the network, a timeout) is StorageError."""
    try:
        yield
    except ClientError as exc:
        if _status(exc) == 404:
            raise FileNotFoundError(f"{what}: not in the bucket") from exc
        raise _failed(what, exc) from exc
    except _FAILURES as exc:
        raise _failed(what, exc) from exc


class S3Store:
    def __init__(self, location: S3Location, settings: S3Config, spool_dir: Path) -> None:
        self.spool = Spool(spool_dir)
        self.location = location
        self._settings = settings
        self._exit = AsyncExitStack()
        self._client: S3Client | None = None
        self.conditional_writes = False

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "S3Store.open() first"
        return self._client

    def key(self, digest: Digest) -> str:
        return f"{self._prefix}blobs/sha256/{digest.hex}"

    @property
    def _prefix(self) -> str:
        return f"{self.location.prefix}/" if self.location.prefix else ""

    async def open(self) -> int:
        settings = self._settings
        config = AioConfig(
            # Path-style addressing works with every S3-compatible store; virtual hosts need DNS.
            s3={"addressing_style": "path"}, signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=64, connect_timeout=10, read_timeout=60,
            # The mirror verifies sha256 itself; extra checksums are work some stores refuse.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        self._client = await self._exit.enter_async_context(get_session().create_client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region,
            aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
            config=config))
        try:
            await self.client.head_bucket(Bucket=self.location.bucket)
        except _FAILURES as exc:
            await self.close()
            raise _failed(f"reaching bucket {self.location.bucket}", exc) from exc
        self.conditional_writes = await self._probe_conditional_writes()
        log.info("blobs are stored in %s (conditional writes %s)", self.location,
                 "honoured" if self.conditional_writes else "not honoured: racing replicas may write a blob twice")
        return self.spool.sweep()

    async def _probe_conditional_writes(self) -> bool:
        """Whether a second `If-None-Match: *` write to one key is refused (412), as AWS S3 and
        recent MinIO and Ceph do; a store that ignores it overwrites (same bytes: harmless)."""
        key = f"{self._prefix}probes/{secrets.token_hex(8)}"
        try:
            for _ in range(2):
                await self.client.put_object(Bucket=self.location.bucket, Key=key, Body=b"", IfNoneMatch="*")
        except ClientError as exc:
            return _status(exc) == 412
        except _FAILURES:
            return False
        finally:
            with suppress(*_FAILURES):
                await self.client.delete_object(Bucket=self.location.bucket, Key=key)
        return False

    async def close(self) -> None:
        await self._exit.aclose()
        self._client = None

    async def check_writable(self) -> None:
        await asyncio.to_thread(self.spool.check_writable)
        with _answers(f"reaching bucket {self.location.bucket}"):
            await self.client.head_bucket(Bucket=self.location.bucket)

    async def scan(self) -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = {}
        start = f"{self._prefix}blobs/sha256/"
        try:
            async for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.location.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    hex_ = item["Key"][len(start):]
                    if len(hex_) == 64 and all(c in "0123456789abcdef" for c in hex_):
                        found[f"sha256:{hex_}"] = (item["Size"], item["LastModified"].timestamp())
        except _FAILURES as exc:
            raise _failed("listing the bucket", exc) from exc
        return found

    async def size(self, digest: Digest) -> int | None:
        try:
            with _answers(f"looking up {digest}"):
                head = await self.client.head_object(Bucket=self.location.bucket, Key=self.key(digest))
        except FileNotFoundError:
            return None
        return head["ContentLength"]

    def local_path(self, digest: Digest) -> Path | None:
        return None

    async def redirect(self, digest: Digest) -> str | None:
        if not self._settings.presign:
            return None
        return await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.location.bucket, "Key": self.key(digest)},
            ExpiresIn=int(self._settings.presign_ttl))

    async def chunks(self, digest: Digest, start: int, end: int) -> AsyncGenerator[bytes, None]:
        if start >= end:
            return
        with _answers(f"reading {digest}"):
            answer = await self.client.get_object(Bucket=self.location.bucket, Key=self.key(digest),
                                                  Range=f"bytes={start}-{end - 1}")
        async with answer["Body"] as body:
            sent = 0
            with _answers(f"reading {digest}"):
                while data := await body.read(_READ_CHUNK):
                    sent += len(data)
                    yield data
            if sent != end - start:
                raise _failed(f"reading {digest}", EOFError(f"{sent} of {end - start} bytes"))

    async def read(self, digest: Digest) -> bytes | None:
        try:
            with _answers(f"reading {digest}"):
                answer = await self.client.get_object(Bucket=self.location.bucket, Key=self.key(digest))
                async with answer["Body"] as body:
                    return await body.read()
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        return None

    async def remove(self, digest: Digest) -> None:
        try:
            await self.client.delete_object(Bucket=self.location.bucket, Key=self.key(digest))
        except _FAILURES as exc:
            raise _failed(f"deleting {digest}", exc) from exc

    def writer(self, digest: Digest, expected_size: int | None) -> BlobWriter:
        return self.spool.writer(digest, expected_size, _Upload(self, digest, expected_size))

    async def put(self, digest: Digest, data: bytes) -> None:
        await put_bytes(self, digest, data)

    async def put_extents(self, digest: Digest, extents: Sequence[Extent]) -> None:
        await put_extents(self, digest, extents)


class _Upload:
    """One blob on its way from the spool to the bucket: parts go while the fill grows; the
    upload is completed by `publish` (after verification) or aborted by `abandon`."""

    def __init__(self, store: S3Store, digest: Digest, expected_size: int | None) -> None:
        self._store = store
        self._key = store.key(digest)
        self._part_size = part_size(expected_size)
        self._upload_id: str | None = None
        self._sent = 0
        self._parts: list[asyncio.Task[dict[str, Any]]] = []

    @property
    def _bucket(self) -> str:
        return self._store.location.bucket

    async def grew(self, writer: BlobWriter) -> None:
        while writer.written - self._sent >= self._part_size:
            await self._send_part(writer, self._sent + self._part_size)

    async def _send_part(self, writer: BlobWriter, end: int) -> None:
        if self._upload_id is None:
            try:
                started = await self._store.client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            except _FAILURES as exc:
                raise _failed("starting an upload", exc) from exc
            self._upload_id = started["UploadId"]
        in_flight = [task for task in self._parts if not task.done()]
        if len(in_flight) >= _PARTS_IN_FLIGHT:
            await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in self._parts:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        number, start = len(self._parts) + 1, self._sent
        self._parts.append(asyncio.ensure_future(self._upload_part(writer.temp, number, start, end)))
        self._sent = end

    async def _upload_part(self, spool: Path, number: int, start: int, end: int) -> dict[str, Any]:
        body = await asyncio.to_thread(_read_range, spool, start, end)
        assert self._upload_id is not None
        try:
            answer = await self._store.client.upload_part(Bucket=self._bucket, Key=self._key,
                                                          UploadId=self._upload_id, PartNumber=number, Body=body)
        except _FAILURES as exc:
            raise _failed(f"uploading part {number}", exc) from exc
        return {"PartNumber": number, "ETag": answer["ETag"]}

    async def publish(self, writer: BlobWriter) -> None:
        # Where it is not honoured, the header is not sent: some stores refuse what they ignore.
        if_none_match = "*" if self._store.conditional_writes else ""
        client = self._store.client
        try:
            if self._upload_id is None:
                body = await asyncio.to_thread(_read_range, writer.temp, 0, writer.written)
                if if_none_match:
                    await client.put_object(Bucket=self._bucket, Key=self._key, Body=body, IfNoneMatch=if_none_match)
                else:
                    await client.put_object(Bucket=self._bucket, Key=self._key, Body=body)
                return
            if writer.written > self._sent or not self._parts:
                await self._send_part(writer, writer.written)
            parts: list[CompletedPartTypeDef] = [
                {"PartNumber": part["PartNumber"], "ETag": part["ETag"]} for part in await asyncio.gather(*self._parts)]
            if if_none_match:
                await client.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                       MultipartUpload={"Parts": parts}, IfNoneMatch=if_none_match)
            else:
                await client.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                       MultipartUpload={"Parts": parts})
            self._upload_id = None
        except ClientError as exc:
            if _status(exc) == 412:
                # Another replica published this digest first: the same bytes are there.
                await self.abandon()
                return
            raise _failed("publishing", exc) from exc
        except _FAILURES as exc:
            raise _failed("publishing", exc) from exc

    async def abandon(self) -> None:
        for task in self._parts:
            task.cancel()
        await asyncio.gather(*self._parts, return_exceptions=True)
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                await self._store.client.abort_multipart_upload(Bucket=self._bucket, Key=self._key,
                                                                UploadId=upload_id)
            except _FAILURES as exc:
                # The bucket's lifecycle rule for incomplete uploads is the backstop.
                log.warning("could not abort the upload of %s: %s", self._key, _failed("aborting", exc).message)


def _read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb", buffering=0) as spool:
        data = os.pread(spool.fileno(), end - start, start)
    if len(data) != end - start:
        raise OSError(f"{path}: {len(data)} of {end - start} bytes could be read")
    return data
