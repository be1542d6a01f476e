"""The store's copy of a blob that lies in local files (what import uses): copied in the kernel,
hashed from the copy, published only when whole and matching."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
from pathlib import Path

import pytest

from mirror import spool
from mirror.errors import IntegrityError
from mirror.oci import Digest
from mirror.spool import Extent
from mirror.storage import DiskStore


def _digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


@pytest.fixture
async def store(tmp_path: Path) -> DiskStore:
    opened = DiskStore(tmp_path / "cache")
    await opened.open()
    return opened


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 4 KiB, so that a blob of a few hundred KiB takes many copy-while-hash rounds."""
    monkeypatch.setattr(spool, "COPY_STEP", 4096)


def _volume(tmp_path: Path, name: str, before: bytes, blob: bytes, after: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(before + blob + after)
    return path


@pytest.mark.usefixtures("small_steps")
async def test_a_blob_split_over_two_files_is_stored_whole(tmp_path: Path, store: DiskStore) -> None:
    blob = os.urandom(300_000)
    first = _volume(tmp_path, "a.tar", b"h" * 512, blob[:123_457], b"t" * 100)
    second = _volume(tmp_path, "b.tar", b"x" * 1024, blob[123_457:], b"")
    with open(first, "rb") as a, open(second, "rb") as b:
        await store.put_extents(_digest(blob), [Extent(a.fileno(), 512, 123_457),
                                                Extent(b.fileno(), 1024, len(blob) - 123_457)])
    assert store.path(_digest(blob)).read_bytes() == blob
    assert list((store.root / "tmp").iterdir()) == []


@pytest.mark.usefixtures("small_steps")
async def test_bytes_that_do_not_match_the_digest_are_not_published(tmp_path: Path, store: DiskStore) -> None:
    blob = os.urandom(50_000)
    source = _volume(tmp_path, "a.tar", b"", blob, b"")
    claimed = _digest(blob[:-1] + bytes([blob[-1] ^ 1]))
    with open(source, "rb") as a, pytest.raises(IntegrityError):
        await store.put_extents(claimed, [Extent(a.fileno(), 0, len(blob))])
    assert await store.size(claimed) is None
    assert list((store.root / "tmp").iterdir()) == []


async def test_a_source_shorter_than_it_claims_is_not_published(tmp_path: Path, store: DiskStore) -> None:
    blob = os.urandom(50_000)
    source = _volume(tmp_path, "a.tar", b"", blob[:40_000], b"")
    with open(source, "rb") as a, pytest.raises(IntegrityError, match="ended before"):
        await store.put_extents(_digest(blob), [Extent(a.fileno(), 0, len(blob))])
    assert await store.size(_digest(blob)) is None
    assert list((store.root / "tmp").iterdir()) == []


@pytest.mark.usefixtures("small_steps")
async def test_without_a_kernel_copy_the_bytes_are_copied_by_hand(
        tmp_path: Path, store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device copy")
    monkeypatch.setattr(os, "copy_file_range", refused)
    blob = os.urandom(100_000)
    source = _volume(tmp_path, "a.tar", b"h" * 7, blob, b"t")
    with open(source, "rb") as a:
        await store.put_extents(_digest(blob), [Extent(a.fileno(), 7, len(blob))])
    assert store.path(_digest(blob)).read_bytes() == blob


async def test_a_cancelled_receive_has_let_go_of_the_socket(store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller closes the socket once `receive` is over, and its number may be reused at
    once: nothing may still read it then, even when the receive was cancelled mid-step (a
    step made long here, so that the cancel surely comes while one waits on the socket)."""
    monkeypatch.setattr(spool, "STEP_WAIT", 0.5)
    blob = os.urandom(64 * 1024)
    ours, upstream = socket.socketpair()
    landed = asyncio.Event()
    writer = store.writer(_digest(blob), len(blob))
    try:
        upstream.sendall(blob[:1000])
        receiving = asyncio.create_task(writer.receive(ours.fileno(), len(blob), None, landed.set))
        await landed.wait()
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        upstream.sendall(b"meant for whoever reads the socket next")
        ours.settimeout(5)
        assert ours.recv(100) == b"meant for whoever reads the socket next"
    finally:
        await writer.discard()
        ours.close()
        upstream.close()
