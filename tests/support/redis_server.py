"""Run Debian's real ``redis-server`` on loopback for the cluster-coordination tests.

Leases (``SET NX PX``), their expiry and what happens when Redis goes away are properties of the
real server, so tests drive one rather than a fake. It starts in milliseconds, so each test can
have its own. By default nothing is persisted (``--save ""``, ``--appendonly no``): a restart is
then the loss of every key, which is what the mirror must survive.
"""

from __future__ import annotations

import os
import shutil
import socket

from tests.support.processes import ServerProcess, ServerStartError, require_binary

START_TIMEOUT = 10.0
"""Seconds to wait for PING to answer."""

STOP_TIMEOUT = 5.0
"""Seconds between SIGTERM and SIGKILL (without persistence Redis exits at once)."""


class RedisStartError(ServerStartError):
    """Redis did not come up; the message carries the tail of its log."""


def find_redis_binary() -> str | None:
    """Debian puts ``redis-server`` in /usr/bin."""
    return shutil.which("redis-server")


class RedisServer(ServerProcess):
    """A throwaway ``redis-server`` on 127.0.0.1 with its working dir under ``workdir``.

    ``restart()`` keeps the port, so ``url`` stays valid for clients that reconnect.
    """

    name = "redis-server"
    start_error = RedisStartError
    port_names = ("redis",)
    start_timeout = START_TIMEOUT
    stop_grace = STOP_TIMEOUT
    poll_interval = 0.01  # it starts in milliseconds

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        binary: str | None = None,
        save: str = "",
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        found = require_binary(binary, find_redis_binary, "redis-server binary not found on PATH")
        super().__init__(workdir, found, "redis.log")
        self.save = save
        self.appendonly = appendonly
        self.extra_args = extra_args

    @property
    def port(self) -> int:
        return self._port("redis")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (unchanged by restarts)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        # No config file: Debian's /etc/redis/redis.conf would bind the system's port and dir.
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", self.save, "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
            *self.extra_args,
        ]

    def _prepare(self) -> None:
        """Nothing to write: everything is on the command line."""

    def call(self, *args: str) -> bytes:
        """One command in RESP over a fresh connection; the reply's first line (enough for
        PING, FLUSHALL, simple replies)."""
        request = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as conn:
            conn.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def _ping(self) -> bool:
        try:
            return self.call("PING") == b"+PONG"
        except OSError:
            return False

    def flush(self) -> None:
        """Drop every key in every database."""
        reply = self.call("FLUSHALL")
        if reply != b"+OK":
            raise RuntimeError(f"FLUSHALL answered {reply!r}")
