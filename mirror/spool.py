"""The local side of every write: a spool directory where a blob is streamed, hashed and tailed
by its readers before a store publishes it (renamed into the disk store, or uploaded to a
bucket). The spool is always on a local disk, whatever the store: readers tail a file.

    <cache dir>/lock                   flocked by the one process using this directory
    <cache dir>/tmp/<hex>.<random>.part  a write in progress; anything left here at start-up is
                                       swept, since no process can still own it
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import secrets
import select
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mirror.errors import CacheBusy, CacheWriteError, IntegrityError, Unavailable
from mirror.oci import Digest

V = TypeVar("V")

# Free space a write leaves for the index and for writes already under way: below it, a new
# download is refused before its client is sent a header, and readiness fails.
RESERVE = 1 << 20
# How much of a local file one step of `BlobWriter.copy` moves: the hashing of one step runs
# while the next is copied.
COPY_STEP = 64 << 20
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
# At most this much of a socket is moved by one step of `BlobWriter.receive` (one worker-thread
# hand-off) before readers hear of it; a step ends sooner when the socket has nothing more yet.
RECEIVE_STEP = 8 << 20
# The pipe a socket is spliced through: Linux's limit for an unprivileged pipe.
PIPE_SIZE = 1 << 20
# How long a step waits, in its thread, for more of a socket that has nothing right now: long
# enough to make steps large while bytes flow, short enough that a thread is never held by a
# slow upstream (waits longer than this are the event loop's).
STEP_WAIT = 0.002
# Read-back buffer for hashing what the kernel wrote.
HASH_BUFFER = 4 << 20


@dataclass(frozen=True)
class Extent:
    """Bytes of an open local file: where a blob, or a part of one, lies in a bundle."""

    fd: int
    offset: int
    size: int

    def steps(self) -> Iterator[Extent]:
        for start in range(0, self.size, COPY_STEP):
            yield Extent(self.fd, self.offset + start, min(COPY_STEP, self.size - start))


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._lock_fd = -1

    def lock(self) -> None:
        """Take the directory for this process alone (an flock on `lock`, released when the
        process ends, however it ends). Two mirrors on one cache would evict from under each
        other, and sweep each other's writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheBusy(f"another mirror process is using the cache in {self.root}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def sweep(self) -> int:
        """Create the directory and remove abandoned writes; returns how many were removed."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        swept = 0
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
            swept += 1
        return swept

    def check_writable(self) -> None:
        """Raises OSError unless a download could start now (for the readiness probe)."""
        self.check_space(0)
        with tempfile.NamedTemporaryFile(dir=self._tmp, prefix="ready-", suffix=".part"):
            pass

    def ensure_room(self, size: int = 0) -> None:
        """Raise CacheWriteError unless `size` bytes fit: asked before the upstream is, so that a
        full disk costs no upstream pull (Docker Hub counts manifest GETs) that could not be kept."""
        try:
            self.check_space(size)
        except OSError as exc:
            raise CacheWriteError.of(exc) from exc

    def free_space(self) -> int:
        stat = os.statvfs(self._tmp)
        return stat.f_bavail * stat.f_frsize

    def check_space(self, size: int) -> None:
        """Raise ENOSPC unless `size` bytes fit with the reserve to spare: a full disk is found
        out before a client is promised a blob, not half-way through sending it."""
        free = self.free_space()
        if free < size + RESERVE:
            raise OSError(errno.ENOSPC, f"{free} bytes free, {size + RESERVE} needed")

    def writer(self, digest: Digest, expected_size: int | None, destination: Destination) -> BlobWriter:
        temp = self._tmp / f"{digest.hex}.{secrets.token_hex(8)}.part"
        try:
            self.check_space(expected_size or 0)
            return BlobWriter(digest, expected_size, temp, destination)
        except OSError as exc:
            raise CacheWriteError.of(exc) from exc


class Destination(Protocol):
    """Where a verified write is published: a store's side of a `BlobWriter`."""

    async def grew(self, writer: BlobWriter) -> None:
        """More of the blob is in the spool (a store may start sending it on)."""

    async def publish(self, writer: BlobWriter) -> None:
        """Make the verified blob durable and visible under its digest. Must run to its end:
        the writer shields it."""

    async def abandon(self) -> None:
        """The write will not be published: let go of whatever `grew` started."""


class BlobWriter:
    """One streamed write of one blob into a spool file that readers may tail. `write` hashes
    and appends in a worker thread (both release the GIL), so the event loop keeps serving while
    large chunks land; the destination publishes only what `verify` accepted."""

    def __init__(self, digest: Digest, expected_size: int | None, temp: Path, destination: Destination) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self.temp = temp
        self._destination = destination
        self._hash = hashlib.sha256()
        self._fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.written = 0
        self.committed = False
        self.publishing = True
        """False while another replica downloads and publishes the same blob: this write is
        then verified for its own readers, and published nowhere."""
        self._pending: asyncio.Future[Any] | None = None
        self._broken: OSError | None = None
        self._reader = -1
        self._buffer: bytearray | None = None
        self._hashed = 0
        self._pipe: tuple[int, int] | None = None

    @property
    def fd(self) -> int:
        """The spool file, open for writing (for a destination's fsync)."""
        return self._fd

    def open_reader(self) -> int:
        """A read-only descriptor on the growing file, for readers that tail it with pread.
        It stays valid across the final rename."""
        return os.open(self.temp, os.O_RDONLY | os.O_CLOEXEC)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.expected_size is not None and self.written + len(data) > self.expected_size:
            raise IntegrityError(f"upstream sent more than the {self.expected_size} bytes of {self.digest}")
        await self._in_threads(functools.partial(self._absorb, data))
        self.written += len(data)
        if self.publishing:
            await self._destination.grew(self)

    async def copy(self, extents: Sequence[Extent]) -> None:
        """Append local file bytes, copied in the kernel (copy_file_range, as `cp` does) while the
        step before is hashed from the copy itself: what is published is what was hashed."""
        hashed = self.written
        for extent in extents:
            for step in extent.steps():
                start = self.written
                await self._in_threads(functools.partial(self._copy_in, step),
                                       functools.partial(self._hash_range, hashed, start))
                hashed = start
                self.written += step.size
                if self.publishing:
                    await self._destination.grew(self)
        await self._in_threads(functools.partial(self._hash_range, hashed, self.written))

    async def receive(self, sock: int, count: int, timeout: float | None, progress: Callable[[], None]) -> None:
        """Append `count` bytes read from the socket `sock`, spliced into the spool file by the
        kernel: none of them is copied through Python on the way in. `progress` is told of each
        step as it lands (readers may send it: the last byte is held until `verify` anyway), and
        a step is hashed from the file while the next one is spliced. Raises Unavailable when the
        socket ends or fails first (what arrived stays: a resume goes on from it), TimeoutError
        when it stays silent for `timeout` s."""
        if self.expected_size is not None and self.written + count > self.expected_size:
            raise IntegrityError(f"upstream sent more than the {self.expected_size} bytes of {self.digest}")
        self._hashed = self.written
        try:
            while count:
                moved, _ = await self._in_threads(
                    functools.partial(self._receive_step, sock, min(count, RECEIVE_STEP)),
                    functools.partial(self._hash_to, self.written))
                if not moved:
                    await _readable(sock, timeout)
                    continue
                assert isinstance(moved, int)
                count -= moved
                self.written += moved
                if self.publishing:
                    await self._destination.grew(self)
                progress()
        finally:
            # The caller closes `sock` once this is over, and its number may be reused at once:
            # a step still under way (this receive was cancelled) is waited for. What landed is
            # hashed whatever happened next: a resume appends to it.
            if self._pending is not None:
                await asyncio.wait([self._pending])
            if self._broken is None and self._hashed < self.written:
                await self._in_threads(functools.partial(self._hash_to, self.written))

    def _hash_to(self, end: int) -> None:
        """Hash what `receive` spliced, up to `end`."""
        self._hash_range(self._hashed, end)
        self._hashed = end

    def _receive_step(self, sock: int, limit: int) -> int:
        """Splice up to `limit` bytes from `sock` to the end of the file; returns how many moved
        (fewer, or none, once the socket has had nothing more for STEP_WAIT)."""
        if self._pipe is None:
            self._pipe = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a smaller pipe only means more steps
                fcntl.fcntl(self._pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        pipe_out, pipe_in = self._pipe
        moved = 0
        deadline = time.monotonic() + STEP_WAIT
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while moved < limit:
            try:
                got = os.splice(sock, pipe_in, min(limit - moved, PIPE_SIZE),
                                flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    break
                continue
            except OSError as exc:
                raise Unavailable(f"upstream connection failed: {exc.strerror}") from None
            if got == 0:
                if moved:
                    break
                raise Unavailable(f"upstream connection ended after {self.written} bytes")
            while got:
                # Into the file: a failure here is the cache's (OSError marks the writer broken).
                put = os.splice(pipe_out, self._fd, got, flags=os.SPLICE_F_MOVE)
                got -= put
                moved += put
        return moved

    async def _in_threads(self, *works: Callable[[], object]) -> list[object]:
        """Blocking file work in worker threads. A thread cannot be cancelled, so the work is
        shielded and remembered: `discard` waits for it before closing the descriptor it uses."""
        if self._broken is not None:
            raise CacheWriteError.of(self._broken)
        outcomes = await self._guarded(
            asyncio.gather(*(asyncio.to_thread(work) for work in works), return_exceptions=True))
        for outcome in outcomes:
            if isinstance(outcome, OSError):
                # A failed write may have landed in part, and the hash has seen all of it: this
                # writer can never produce a whole blob again.
                self._broken = outcome
                raise CacheWriteError.of(outcome) from outcome
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    async def _guarded(self, work: Awaitable[V]) -> V:
        """`work` shielded from the caller's cancellation, and remembered for `discard`."""
        pending = self._pending = asyncio.ensure_future(work)
        return await asyncio.shield(pending)

    def _absorb(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        _write_all(self._fd, data)

    def _copy_in(self, source: Extent) -> None:
        short = IntegrityError(f"{self.digest}: its source ended before {source.size} bytes")
        copied = 0
        try:
            while copied < source.size:
                moved = os.copy_file_range(source.fd, self._fd, source.size - copied, source.offset + copied)
                if moved == 0:
                    raise short
                copied += moved
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            while copied < source.size:
                data = os.pread(source.fd, min(source.size - copied, 4 << 20), source.offset + copied)
                if not data:
                    raise short from None
                _write_all(self._fd, data)
                copied += len(data)

    def _hash_range(self, start: int, end: int) -> None:
        """Hash bytes [start, end) of the file, read back through the page cache (where the
        kernel just wrote them) into one reused buffer."""
        if start == end:
            return
        if self._reader < 0:
            self._reader = os.open(self.temp, os.O_RDONLY | os.O_CLOEXEC)
        if self._buffer is None:
            self._buffer = bytearray(HASH_BUFFER)
        view = memoryview(self._buffer)
        while start < end:
            got = os.preadv(self._reader, [view[:end - start]], start)
            if got == 0:
                raise IntegrityError(f"{self.digest}: the file ended at {start} bytes")
            self._hash.update(view[:got])
            start += got

    def verify(self) -> None:
        """Raise IntegrityError unless exactly the expected bytes arrived."""
        if self.expected_size is not None and self.written != self.expected_size:
            raise IntegrityError(f"upstream sent {self.written} of {self.expected_size} bytes of {self.digest}")
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            raise IntegrityError(f"upstream content for {self.digest} has digest sha256:{actual}")

    async def commit(self) -> None:
        """Verify, make durable, publish: nothing is published on a mismatch."""
        self.verify()
        await self.publish()

    async def publish(self) -> None:
        """Make durable and publish what `verify` accepted."""
        if self._broken is not None:
            raise CacheWriteError.of(self._broken)
        if not self.publishing:
            self.committed = True
            return
        try:
            await self._guarded(self._destination.publish(self))
        except OSError as exc:
            raise CacheWriteError.of(exc) from exc
        self.committed = True

    async def discard(self) -> None:
        """Close the descriptor once no thread uses it; remove the spool file (readers that
        opened it keep reading) and let the destination drop an unpublished write."""
        if self._pending is not None:
            await asyncio.wait([self._pending])
            if not self._pending.cancelled():
                self._pending.exception()  # seen here if its caller was cancelled
        for fd in (self._reader, *(self._pipe or ())):
            if fd >= 0:
                os.close(fd)
        self._reader, self._pipe = -1, None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.temp.unlink(missing_ok=True)
            if not self.committed:
                await self._destination.abandon()


async def _readable(sock: int, timeout: float | None) -> None:
    """Until `sock` has bytes (or its end) to read, on the event loop; TimeoutError after
    `timeout` s of silence."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    def wake() -> None:
        if not ready.done():
            ready.set_result(None)
    loop.add_reader(sock, wake)
    try:
        async with asyncio.timeout(timeout):
            await ready
    except TimeoutError:
        raise TimeoutError(f"upstream silent for {timeout} s") from None
    finally:
        loop.remove_reader(sock)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
