"""`mirror serve` in its own process, as a user or an orchestrator runs it: started, signalled,
killed. Its log is drained as it comes, so a test can wait for a line instead of sleeping."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.registry import free_port

MIRROR = [sys.executable, "-m", "mirror"]
TIMEOUT = 30.0


class Served:
    def __init__(self, process: asyncio.subprocess.Process, host: str) -> None:
        self.process = process
        self.host = host
        self.url = f"http://{host}"
        self.log: list[str] = []
        self._waiters: list[tuple[str, asyncio.Future[str]]] = []
        self._ended = False
        self._drain = asyncio.ensure_future(self._read_log())

    @classmethod
    async def start(cls, *args: str | Path, host: str | None = None) -> Served:
        """`mirror serve --listen HOST ARGS...`, once it says it is listening."""
        host = host or f"127.0.0.1:{free_port()}"
        process = await asyncio.create_subprocess_exec(
            *MIRROR, "serve", "--listen", host, *map(str, args),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        served = cls(process, host)
        try:
            await served.wait_for("listening on", timeout=20)
        except BaseException:
            await served.kill()
            raise
        return served

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.log.append(line)
            for text, waiter in self._waiters:
                if text in line and not waiter.done():
                    waiter.set_result(line)
        self._ended = True
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(EOFError())

    async def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        """The first log line containing `text`, past or future."""
        for line in self.log:
            if text in line:
                return line
        if self._ended:
            pytest.fail(f"mirror serve ended without logging {text!r}:\n{self.tail()}")
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((text, waiter))
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except (TimeoutError, EOFError):
            pytest.fail(f"mirror serve did not log {text!r}:\n{self.tail()}")
        finally:
            self._waiters.remove((text, waiter))

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    async def terminate(self) -> int:
        """SIGTERM, as an orchestrator stops a pod; the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        async with asyncio.timeout(TIMEOUT):
            status = await self.process.wait()
            await self._drain
        return status

    async def __aenter__(self) -> Served:
        return self

    async def __aexit__(self, *_: object) -> None:
        """Whatever the test did, no process is left holding the port and the cache lock."""
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or cleaned up."""
        if self.process.returncode is None:
            self.process.kill()
        await self.wait()
