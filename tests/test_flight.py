"""The fill's promise to its readers, checked directly: the last byte of a blob is offered only
after the store has verified the whole, so no client can receive a complete but wrong blob."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from mirror.errors import IntegrityError
from mirror.flight import Fill
from mirror.oci import Digest
from mirror.storage import DiskStore

DATA = b"0123456789" * 1000


async def offered(fill: Fill) -> tuple[asyncio.Task[tuple[int, int]], list[int]]:
    """A reader that records how many bytes it was offered; its first window is taken before
    returning, the rest as the fill allows."""
    counts: list[int] = []
    file = fill.reader()
    assert file is not None
    windows = fill.windows(file, 0, len(DATA))
    first = await anext(windows)
    counts.append(first[2])

    async def rest() -> tuple[int, int]:
        async for _, _, count in windows:
            counts.append(count)
        return len(counts), sum(counts)
    return asyncio.create_task(rest()), counts


@pytest.mark.parametrize("good", [True, False], ids=["verified", "wrong-digest"])
async def test_last_byte_waits_for_verification(tmp_path: Path, good: bool) -> None:
    store = DiskStore(tmp_path)
    await store.open()
    content = DATA if good else DATA[:-1] + b"!"
    fill = Fill(Digest(hashlib.sha256(DATA).hexdigest()), store)
    fill.begin(len(DATA))
    await fill.write(content)

    reader, counts = await offered(fill)
    assert sum(counts) == len(DATA) - 1, "everything but the last byte, before verification"
    assert not reader.done()

    if good:
        await fill.commit()
        assert await reader == (2, len(DATA))
        assert store.path(fill.digest).read_bytes() == DATA
    else:
        with pytest.raises(IntegrityError):
            await fill.commit()
        fill.fail(IntegrityError("bad"))
        with pytest.raises(IntegrityError):
            await reader
        assert sum(counts) == len(DATA) - 1
        assert await store.size(fill.digest) is None
    await fill.close()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(("start", "end"), [(0, 100), (10, 11), (0, 0)], ids=["prefix", "one-byte", "empty"])
async def test_window_inside_the_blob_waits_for_verification_too(tmp_path: Path, start: int, end: int) -> None:
    """A Range that ends before the blob does, or an empty one, is not complete until the whole
    blob is verified: its last byte waits, whatever the bytes before it."""
    store = DiskStore(tmp_path)
    await store.open()
    fill = Fill(Digest(hashlib.sha256(DATA).hexdigest()), store)
    fill.begin(len(DATA))
    await fill.write(DATA[:5000])

    counts: list[int] = []
    file = fill.reader()
    assert file is not None
    windows = fill.windows(file, start, end)

    async def read_all() -> None:
        async for _, _, count in windows:
            counts.append(count)
    reader = asyncio.create_task(read_all())
    await fill.write(DATA[5000:])  # a write wakes the reader: it takes all it may take
    assert sum(counts) == max(end - start - 1, 0)
    assert not reader.done()

    await fill.commit()
    await reader
    assert sum(counts) == end - start
    await fill.close()
