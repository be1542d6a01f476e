"""A graceful stop is bounded and leaves a consistent cache: the process exits once
`shutdown_grace` is over (not twice that, which is past what an orchestrator waits), and a blob
published while downloads are being stopped has its index row."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from mirror.index import INDEX_FILE
from mirror.spool import BlobWriter
from mirror.storage import _Rename
from tests.conftest import MirrorFactory
from tests.support.fake_upstream import FakeUpstream
from tests.support.pulls import NAME, TIMEOUT, pull_blob
from tests.support.registry import free_port
from tests.support.served import Served

MiB = 1 << 20


async def test_sigterm_with_a_slow_reader_exits_once_the_grace_is_over(
        fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    digest = fake.add_blob(random.Random(5).randbytes(32 * MiB))
    grace = 2.0
    cache = tmp_path / "cache"
    # Two listeners, as in production: the ops one must not add a grace of its own.
    served = await Served.start("--cache-dir", cache, "--upstream", f"docker.io={fake.url}",
                                "--metrics-listen", f"127.0.0.1:{free_port()}", "--shutdown-grace", f"{grace}s")
    async with served, asyncio.timeout(TIMEOUT), client.get(f"{served.url}/v2/{NAME}/blobs/{digest}") as response:
        assert response.status == 200
        # A slow reader: it takes the first bytes and no more, so the socket buffers fill and
        # the response stays under way (32 MiB is far more than they hold).
        received = len(await response.content.readany())
        stopped = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        status = await served.wait()
        took = time.monotonic() - stopped
        await served.wait_for(f"shutting down: responses under way have {grace:g}s to finish")
        with pytest.raises(aiohttp.ClientPayloadError):
            received += len(await response.read())
    assert status == 0
    assert grace <= took < grace + 1.5, f"exited {took:.2f}s after SIGTERM with a {grace:g}s grace"
    assert 0 < received < 32 * MiB
    assert list((cache / "tmp").iterdir()) == [], "no temporary file left behind"


async def test_a_blob_published_while_downloads_are_stopped_is_indexed(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(6).randbytes(MiB)
    digest = fake.add_blob(data)
    mirror = await make_mirror({"docker.io": fake.url})
    loop = asyncio.get_running_loop()
    publishing = asyncio.Event()
    release = threading.Event()
    publish = _Rename._publish

    def held(self: _Rename, writer: BlobWriter) -> None:
        """The publishing thread (fsync, rename), held until the stop has begun."""
        loop.call_soon_threadsafe(publishing.set)
        assert release.wait(TIMEOUT)
        publish(self, writer)
    monkeypatch.setattr(_Rename, "_publish", held)

    # A reader has the whole blob once it is verified, before it is published.
    assert (await pull_blob(client, mirror, NAME, digest)).body == data
    async with asyncio.timeout(TIMEOUT):
        await publishing.wait()
        # close() cancels the fill at once, while its file is being published; the thread goes
        # on once close() waits for the fill, and a thread cannot be stopped: the file lands.
        loop.call_soon(release.set)
        await mirror.services.background.close()
    await mirror.server.close()  # closes the index, as shutdown does next

    cache = mirror.services.config.cache_dir
    published = {f"sha256:{path.name}" for path in (cache / "blobs" / "sha256").rglob("*/*")}
    with sqlite3.connect(cache / INDEX_FILE) as db:
        indexed = {row[0] for row in db.execute("SELECT digest FROM blobs")}
    assert published == {digest}
    assert indexed == published, "every published blob has its index row"
