"""Work in flight: one upstream fetch per key, shared by every request that wants it.

A download belongs to the mirror, not to a request: it runs as a tracked background task, and
requests only wait on it (through `asyncio.shield`), so a client that goes away stops only its
own reading. A blob `Fill` writes into the store's spool file; readers tail that file with
`sendfile` as it grows, so each client's first byte comes long before the download ends. Readers
are never given the last byte until size and digest are verified: if verification fails, every
client's connection ends one byte short and no client accepts bad content.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Hashable, Iterator
from typing import Any, BinaryIO, Generic, TypeVar

from mirror.errors import MirrorError, Unavailable
from mirror.oci import Digest
from mirror.spool import BlobWriter
from mirror.storage import BlobStore

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# The most one sendfile call is given, so that readers take turns.
WINDOW = 8 << 20


class Background:
    """Owns the mirror's background tasks so they can be awaited or cancelled at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, V], name: str) -> asyncio.Task[V]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background task %s failed: %r", task.get_name(), task.exception())

    async def join(self) -> None:
        """Wait until nothing is in flight (including work started while waiting)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.join()


async def run_to_end(work: Coroutine[Any, Any, V]) -> V:
    """Run `work` to its end even if the caller is cancelled meanwhile, then pass the
    cancellation on: for steps that must not stop half-way, such as publishing a blob (a rename
    in a thread, which cannot be stopped) and recording it in the index. The caller's task,
    tracked by `Background`, does not end before `work` does."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if (error := task.exception()) is not None:
            # The caller is gone and will not see it: said here, or nobody would know.
            log.warning("%s failed while its caller was being cancelled: %r", task.get_coro(), error)
        raise asyncio.CancelledError from task.exception()
    return task.result()


class Coalescer(Generic[K, V]):
    """Single-flight for small results (manifests): concurrent callers with the same key share
    one call."""

    def __init__(self, background: Background) -> None:
        self._background = background
        self._inflight: dict[K, asyncio.Task[V]] = {}

    def running(self, key: K) -> bool:
        return key in self._inflight

    async def run(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> V:
        return await asyncio.shield(self.start(key, call))

    def start(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The call under way for `key`, started if there is none; awaiting it is up to the
        caller (through `asyncio.shield`, so that a caller's cancellation cannot stop it)."""
        task = self._inflight.get(key)
        if task is None:
            task = self._background.spawn(call(), name=f"fetch {key}")
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return task


class Fill:
    """One blob on its way from the upstream into the store."""

    def __init__(self, digest: Digest, store: BlobStore, origin: tuple[str, str] = ("", "")) -> None:
        self.digest = digest
        self.origin = origin
        """The upstream and repository it is downloaded for."""
        self.started_at = time.time()
        self.readers = 0
        """Client responses streaming from it right now."""
        self._store = store
        self._writer: BlobWriter | None = None
        self._publishing = True
        self._read_fd = -1
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[int | None] = loop.create_future()
        self._verified: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[None] = loop.create_future()
        self._progress = asyncio.Event()

    # The producer side, driven by the download.

    @property
    def begun(self) -> bool:
        return self._writer is not None

    @property
    def written(self) -> int:
        return self._writer.written if self._writer else 0

    @property
    def size(self) -> int | None:
        return self._writer.expected_size if self._writer else None

    def begin(self, size: int | None) -> None:
        """The upstream has answered: readers may now send headers and start tailing."""
        self._writer = self._store.writer(self.digest, size)
        self._writer.publishing = self._publishing
        self._read_fd = self._writer.open_reader()
        self._started.set_result(size)

    def lead(self) -> None:
        """This replica downloads from the upstream, and publishes (from the first byte, where
        it took over from another)."""
        self._set_publishing(True)

    def follow(self) -> None:
        """Another replica downloads and publishes: this fill only feeds its own readers."""
        self._set_publishing(False)

    def _set_publishing(self, publishing: bool) -> None:
        self._publishing = publishing
        if self._writer is not None:
            self._writer.publishing = publishing

    async def write(self, data: bytes | bytearray) -> None:
        assert self._writer is not None
        await self._writer.write(data)
        self._notify()

    async def receive(self, sock: int, count: int, timeout: float | None) -> None:
        assert self._writer is not None
        await self._writer.receive(sock, count, timeout, self._notify)

    async def commit(self) -> None:
        """Verify, release the last byte to readers, then publish. Readers need not wait for
        the fsync: what they were given is proven correct whether or not it lands on disk."""
        assert self._writer is not None
        self._writer.verify()
        self._verified.set_result(None)
        self._notify()
        await self._writer.publish()
        self._done.set_result(None)

    def fail(self, error: BaseException) -> None:
        for future in (self._started, self._verified, self._done):
            if not future.done():
                future.set_exception(error)
                future.exception()  # marked retrieved: readers may all be gone
        self._notify()

    async def close(self) -> None:
        if not self._done.done():
            self.fail(Unavailable(f"download of {self.digest} ended without publishing"))
        if self._writer is not None:
            await self._writer.discard()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # The reader side, one per client request.

    async def started(self) -> int | None:
        """The blob's size once the upstream has answered (None if it did not say); raises the
        upstream's error if it refused."""
        return await asyncio.shield(self._started)

    async def verified(self) -> None:
        """Once the whole blob is verified; raises if it failed."""
        await asyncio.shield(self._verified)

    async def published(self) -> None:
        """Once the blob is in the store; raises if it will not be."""
        await asyncio.shield(self._done)

    def reader(self) -> BinaryIO | None:
        """The spool file, for one reader of its own to tail (a duplicate descriptor: it stays
        readable after the fill is over and its file gone, whatever the store); None once the
        fill is closed and the blob is in the store. Raises the fill's error if it failed."""
        if self._read_fd >= 0:
            return open(os.dup(self._read_fd), "rb", buffering=0)
        if self._done.done() and (error := self._done.exception()) is not None:
            raise error
        return None

    async def windows(self, file: BinaryIO, start: int, end: int | None
                      ) -> AsyncGenerator[tuple[BinaryIO, int, int], None]:
        """Bytes [start, end) of `file` (from `reader`) as they land, as (file, offset, count)
        for sendfile; end=None means to the end of the blob. The last byte of the window (even
        of a window that ends before the blob does, or is empty) is only offered once the whole
        blob is verified."""
        await self.started()
        position = start
        self.readers += 1
        try:
            while True:
                verified = self._verified.done()
                if verified and (error := self._verified.exception()) is not None:
                    raise error
                limit = self.written if end is None else min(self.written, end)
                if not verified:
                    limit -= 1
                if position < limit:
                    count = min(limit - position, WINDOW)
                    yield file, position, count
                    position += count
                elif verified:
                    return
                else:
                    await self._progress.wait()
        finally:
            self.readers -= 1


class Fills:
    """The blob downloads in flight, by digest: at most one per digest."""

    def __init__(self, store: BlobStore, background: Background) -> None:
        self._store = store
        self._background = background
        self._fills: dict[Digest, Fill] = {}

    def __len__(self) -> int:
        return len(self._fills)

    def active(self, digest: Digest) -> Fill | None:
        return self._fills.get(digest)

    def __iter__(self) -> Iterator[Fill]:
        return iter(list(self._fills.values()))

    def start(self, digest: Digest, download: Callable[[Fill], Awaitable[None]],
              origin: tuple[str, str] = ("", "")) -> Fill:
        fill = Fill(digest, self._store, origin)
        self._fills[digest] = fill
        self._background.spawn(self._run(fill, download), name=f"fill {digest}")
        return fill

    async def _run(self, fill: Fill, download: Callable[[Fill], Awaitable[None]]) -> None:
        try:
            await download(fill)
        except asyncio.CancelledError:
            fill.fail(Unavailable("the mirror is shutting down"))
            raise
        except MirrorError as exc:
            log.warning("download of %s failed: %s", fill.digest, exc.message)
            fill.fail(exc)
        except Exception as exc:
            # A bug, not an upstream fault: readers still get a clean error, the log the detail.
            log.exception("download of %s failed", fill.digest)
            fill.fail(Unavailable(f"download of {fill.digest} failed: {type(exc).__name__}"))
        finally:
            del self._fills[fill.digest]
            await fill.close()
