"""Where verified blobs live: the `BlobStore` seam, and its local-disk implementation.

A store publishes content that a `BlobWriter` (mirror.spool) has verified, and gives it back
for reading; the handlers and the proxy never know which store they talk to. The disk store is
the embedded default; mirror.s3store keeps blobs in a bucket shared by replicas.

Disk layout under the cache directory (beside the spool's `tmp/` and `lock`):

    blobs/sha256/<hex[:2]>/<hex>     complete content whose sha256 is <hex>: layers, configs and
                                     manifests alike. A file here is always whole and verified.
    index.db                         the index (mirror.index)

A write streams into the spool, hashing as it goes; only when size and digest match is the file
fsynced and renamed into `blobs/` (same filesystem, so the rename is atomic), then the directory
is fsynced so the name survives a power cut. Nothing here knows HTTP or the index.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from mirror.oci import Digest
from mirror.spool import BlobWriter, Extent, Spool

_HEX = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1 << 20


class BlobStore(Protocol):
    """Content-addressed, verified blobs (manifests are blobs too)."""

    spool: Spool
    """The local directory where writes are streamed and tailed before they are published."""

    async def open(self) -> int:
        """Get ready to serve (layout, probes); returns how many abandoned writes were swept."""

    async def close(self) -> None:
        """Let go of connections (the spool's lock is the caller's)."""

    async def check_writable(self) -> None:
        """Raises OSError (the spool's disk) or StorageError (a bucket) unless a download could be
        published now (for readiness)."""

    async def scan(self) -> dict[str, tuple[int, float]]:
        """Every published blob, as {digest: (size, mtime)}: what an index is rebuilt from."""

    async def size(self, digest: Digest) -> int | None:
        """The size of a stored blob, or None if it is not stored."""

    def local_path(self, digest: Digest) -> Path | None:
        """The blob as a local file, to send with sendfile, where the store keeps blobs on this
        machine's disk; None where it does not (then `chunks` streams it)."""

    async def redirect(self, digest: Digest) -> str | None:
        """A URL the client may fetch a stored blob from itself (a presigned object URL), where
        the store is set to hand them out; None to have the mirror send it."""

    def chunks(self, digest: Digest, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of a stored blob. Raises FileNotFoundError if it is not stored."""

    async def read(self, digest: Digest) -> bytes | None:
        """A small stored blob (a manifest) in full, or None if it is not stored."""

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        """A stored blob as a local file to read with blocking calls (for commands, or a worker
        thread), or None if it is not stored or not on this machine."""

    async def remove(self, digest: Digest) -> None:
        """Delete a published blob. A client already reading it keeps reading."""

    def writer(self, digest: Digest, expected_size: int | None) -> BlobWriter:
        """A write of `digest` into the spool, published here once verified."""

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store bytes already in memory (manifests), with the same checks as a streamed write."""

    async def put_extents(self, digest: Digest, extents: Sequence[Extent]) -> None:
        """Store a blob that lies in local files (an import), with the same checks as a streamed
        write; IntegrityError if its bytes do not match `digest`."""


async def put_bytes(store: BlobStore, digest: Digest, data: bytes) -> None:
    writer = store.writer(digest, len(data))
    try:
        await writer.write(data)
        await writer.commit()
    finally:
        await writer.discard()


async def put_extents(store: BlobStore, digest: Digest, extents: Sequence[Extent]) -> None:
    writer = store.writer(digest, sum(extent.size for extent in extents))
    try:
        await writer.copy(extents)
        await writer.commit()
    finally:
        await writer.discard()


class DiskStore:
    """Blobs as files under the cache directory: hits go out with sendfile."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = Spool(root)
        self._blobs = root / "blobs" / "sha256"

    async def open(self) -> int:
        self._blobs.mkdir(parents=True, exist_ok=True)
        return self.spool.sweep()

    async def close(self) -> None:
        pass

    async def check_writable(self) -> None:
        await asyncio.to_thread(self.spool.check_writable)

    async def scan(self) -> dict[str, tuple[int, float]]:
        return await asyncio.to_thread(self._scan)

    def _scan(self) -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = {}
        for shard in os.scandir(self._blobs):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                if _HEX.fullmatch(entry.name):
                    stat = entry.stat()
                    found[f"sha256:{entry.name}"] = (stat.st_size, stat.st_mtime)
        return found

    def path(self, digest: Digest) -> Path:
        return self._blobs / digest.hex[:2] / digest.hex

    async def size(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def local_path(self, digest: Digest) -> Path | None:
        return self.path(digest)

    async def redirect(self, digest: Digest) -> str | None:
        return None

    async def chunks(self, digest: Digest, start: int, end: int) -> AsyncGenerator[bytes, None]:
        with open(self.path(digest), "rb", buffering=0) as source:
            while start < end:
                data = await asyncio.to_thread(os.pread, source.fileno(), min(_READ_CHUNK, end - start), start)
                if not data:
                    raise FileNotFoundError(f"{digest} ended at {start} bytes")
                start += len(data)
                yield data

    async def read(self, digest: Digest) -> bytes | None:
        try:
            return await asyncio.to_thread(self.path(digest).read_bytes)
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest) -> BinaryIO | None:
        try:
            return open(self.path(digest), "rb", buffering=0)
        except FileNotFoundError:
            return None

    async def remove(self, digest: Digest) -> None:
        self.path(digest).unlink(missing_ok=True)

    def writer(self, digest: Digest, expected_size: int | None) -> BlobWriter:
        return self.spool.writer(digest, expected_size, _Rename(self.path(digest)))

    async def put(self, digest: Digest, data: bytes) -> None:
        await put_bytes(self, digest, data)

    async def put_extents(self, digest: Digest, extents: Sequence[Extent]) -> None:
        await put_extents(self, digest, extents)


class _Rename:
    """Publishing on the disk store: fsync, rename into the blob tree, fsync the directory."""

    def __init__(self, final: Path) -> None:
        self._final = final

    async def grew(self, writer: BlobWriter) -> None:
        pass

    async def publish(self, writer: BlobWriter) -> None:
        await asyncio.to_thread(self._publish, writer)

    def _publish(self, writer: BlobWriter) -> None:
        os.fsync(writer.fd)
        self._final.parent.mkdir(exist_ok=True)
        os.rename(writer.temp, self._final)
        directory = os.open(self._final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def abandon(self) -> None:
        pass
