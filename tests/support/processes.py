"""Real server processes on loopback for tests and benchmarks: ports, start-up, log, stop.

The registry, Redis and SeaweedFS are all started the same way: pick free ports, launch the binary
with its output in a log file, poll until it answers, and on failure report the log's tail, retrying
when another process took a port in the meantime. `ServerProcess` holds that loop once; each server
keeps only its command line, readiness check and extras.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self

PORT_ATTEMPTS = 3
"""Tries for the race between picking free ports and the server binding them (first start only)."""

_LOG_TAIL_BYTES = 4000


def free_ports(count: int) -> list[int]:
    """Distinct unused loopback ports, all held open while picking so none repeats."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    """Ask the kernel for an unused loopback port (bound, then released: nothing listens there)."""
    return free_ports(1)[0]


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """Terminate, and kill if it is still there after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def require_binary(binary: str | None, find: Callable[[], str | None], missing: str) -> str:
    """`binary` if given, else what `find` locates; FileNotFoundError(`missing`) if neither."""
    found = binary if binary is not None else find()
    if found is None:
        raise FileNotFoundError(missing)
    return found


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


class ServerProcess(ABC):
    """A throwaway server on 127.0.0.1, run in ``workdir`` with its output in ``log_path``.

    Subclasses name their ports (`port_names`), build the command line for them (`command`) and say
    when the server is usable (`_ping`). The ports picked on the first start are kept, so addresses
    stay valid across ``stop()``/``start()`` and ``kill()``/``start()`` (unless `keep_ports` is off).
    """

    name: ClassVar[str]
    """What the messages call the server."""

    start_error: ClassVar[type[ServerStartError]] = ServerStartError
    port_names: ClassVar[tuple[str, ...]]

    start_timeout: ClassVar[float]
    """Seconds to wait for `_ping` before giving up."""

    stop_grace: ClassVar[float]
    """Default seconds between SIGTERM and SIGKILL in ``stop()``."""

    exit_grace: ClassVar[float | None] = None
    """Grace on leaving the ``with`` block; None: `stop_grace`."""

    poll_interval: ClassVar[float] = 0.05
    keep_ports: ClassVar[bool] = True

    kill_failed_start: ClassVar[bool] = False
    """SIGKILL a server that did not come up, rather than wait for a clean stop."""

    env_prefix: ClassVar[str | None] = None
    """Environment variables with this prefix are dropped: they would override the server's config."""

    def __init__(self, workdir: str | os.PathLike[str], binary: str, log_name: str) -> None:
        self.workdir = Path(workdir).absolute()  # the server runs in it: paths given to it must not be relative
        self.binary = binary
        self.log_path = self.workdir / log_name
        self._ports: dict[str, int] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The command line for the current ports."""

    @abstractmethod
    def _ping(self) -> bool:
        """True once the server is usable."""

    @abstractmethod
    def _prepare(self) -> None:
        """Write what the command needs (dirs, config) once the ports are known."""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The server process, e.g. for measuring its CPU time."""
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    def _port(self, name: str) -> int:
        if self._ports is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._ports[name]

    def _env(self) -> dict[str, str] | None:
        if self.env_prefix is None:
            return None
        return {k: v for k, v in os.environ.items() if not k.startswith(self.env_prefix)}

    def _log_tail(self) -> str:
        """The end of the log, for failure messages."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no log>"
        return data[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    def _wait_ready(self) -> bool:
        """Poll until ready; False if the process died or the deadline passed."""
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if self._ping():
                return True
            time.sleep(self.poll_interval)
        return False

    def start(self) -> Self:
        """Launch the server and block until it is usable, or raise `start_error`."""
        if self.running:
            raise RuntimeError(f"{self.name} already running")
        self.stop()  # reap one that died on its own and close its log
        self.workdir.mkdir(parents=True, exist_ok=True)
        fresh = self._ports is None or not self.keep_ports
        for _ in range(PORT_ATTEMPTS if fresh else 1):
            if fresh:
                self._ports = dict(zip(self.port_names, free_ports(len(self.port_names)), strict=True))
            self._prepare()
            self._log = self.log_path.open("ab")
            self._process = subprocess.Popen(self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                             stdout=self._log, stderr=subprocess.STDOUT, env=self._env())
            if self._wait_ready():
                return self
            code = self._process.poll()
            tail = self._log_tail()
            if self.kill_failed_start:
                self.kill()
            else:
                self.stop()
            if code is None:
                raise self.start_error(f"{self.name} not ready within {self.start_timeout:.0f}s; log tail:\n{tail}")
            # A port taken since it was picked can be picked again; a kept one cannot.
            if not fresh or "address already in use" not in tail.lower():
                raise self.start_error(f"{self.name} exited with code {code}; log tail:\n{tail}")
        raise self.start_error(f"no free ports after {PORT_ATTEMPTS} attempts; log tail:\n{self._log_tail()}")

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (default `stop_grace`); safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, self.stop_grace if grace is None else grace)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL at once, no SIGTERM first: a crash, for failure tests."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def restart(self, grace: float | None = None) -> None:
        """Stop and start again (on the same ports unless `keep_ports` is off)."""
        self.stop(grace)
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(self.exit_grace)
