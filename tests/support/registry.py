"""Run a real CNCF distribution registry as the upstream for integration tests.

Tests talk to a genuine ``docker-registry`` process rather than a fake so that
the mirror is exercised against real protocol behaviour (headers, digests,
error bodies, upload sessions).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

START_TIMEOUT = 20.0
"""Seconds to wait for ``GET /v2/`` to answer 200 before giving up."""

STOP_TIMEOUT = 5.0
"""Seconds to wait after SIGTERM before resorting to SIGKILL."""

_PORT_ATTEMPTS = 3
"""Retries for the small race between picking a free port and the registry binding it."""

_LOG_TAIL_BYTES = 4000

# Never route loopback test traffic through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryStartError(RuntimeError):
    """The registry did not come up; the message carries the tail of its log."""


def find_registry_binary() -> str | None:
    """Locate the distribution binary (Debian names it ``docker-registry``, upstream ``registry``)."""
    for candidate in ("docker-registry", "registry"):
        found = shutil.which(candidate)
        if found is not None:
            return found
    return None


def free_port() -> int:
    """Ask the kernel for an unused loopback port (bound, then released: nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _yaml_str(value: str) -> str:
    """Quote a scalar for YAML; a JSON string literal is a valid YAML double-quoted scalar."""
    return json.dumps(value)


class LocalRegistry:
    """A throwaway ``docker-registry`` on 127.0.0.1 with filesystem storage under ``workdir``.

    Deletes are enabled so tests can remove upstream content; auth is off and
    health checks are off so the registry never stalls on its own probes.
    """

    def __init__(
        self, workdir: str | os.PathLike[str], binary: str | None = None
    ) -> None:
        self.workdir = Path(workdir)
        found = binary if binary is not None else find_registry_binary()
        if found is None:
            raise FileNotFoundError("docker-registry binary not found on PATH")
        self.binary = found
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the form used in image references."""
        if self._port is None or self._process is None:
            raise RuntimeError("registry is not running")
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}"

    def _write_config(self, port: int) -> None:
        """Write config.yml by hand: the stdlib has no YAML emitter and the shape is fixed."""
        self.config_path.write_text(
            "\n".join(
                [
                    "version: 0.1",
                    "log:",
                    "  level: warn",
                    "  formatter: text",
                    "  accesslog:",
                    "    disabled: true",
                    "storage:",
                    "  filesystem:",
                    f"    rootdirectory: {_yaml_str(str(self.storage_dir))}",
                    "  delete:",
                    "    enabled: true",
                    "  maintenance:",
                    "    uploadpurging:",
                    "      enabled: false",
                    "http:",
                    f"  addr: {_yaml_str(f'127.0.0.1:{port}')}",
                    f"  secret: {_yaml_str('mirror-tests-not-secret')}",
                    "health:",
                    "  storagedriver:",
                    "    enabled: false",
                    "",
                ]
            )
        )

    def _log_tail(self) -> str:
        """Return the end of the registry log for failure messages."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no log>"
        return data[-_LOG_TAIL_BYTES:].decode("utf-8", errors="replace")

    def _ping(self) -> bool:
        """True once ``GET /v2/`` answers 200 (the API version check)."""
        try:
            with _OPENER.open(f"{self.url}/v2/", timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> Self:
        """Launch the registry and block until it serves the API, or raise RegistryStartError."""
        if self._process is not None:
            raise RuntimeError("registry already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        # REGISTRY_* variables override the config file, so a stray one could redirect the process.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        for _ in range(_PORT_ATTEMPTS):
            port = free_port()
            self._write_config(port)
            self._port = port
            self._log = self.log_path.open("ab")
            self._process = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            if self._wait_ready():
                return self
            code = self._process.poll()
            tail = self._log_tail()
            self.stop()
            if code is None:
                raise RegistryStartError(
                    f"docker-registry not ready within {START_TIMEOUT:.0f}s; log tail:\n{tail}"
                )
            if "address already in use" not in tail:
                raise RegistryStartError(
                    f"docker-registry exited with code {code}; log tail:\n{tail}"
                )
        raise RegistryStartError(
            f"no free port after {_PORT_ATTEMPTS} attempts; log tail:\n{self._log_tail()}"
        )

    def _wait_ready(self) -> bool:
        """Poll until ready; False if the process died or the deadline passed."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if self._ping():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate the process (kill if it lingers); safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """Terminate, and kill if it is still there after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
