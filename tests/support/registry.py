"""Run a real CNCF distribution registry as the upstream for integration tests.

Tests talk to a genuine ``docker-registry`` process rather than a fake so that
the mirror is exercised against real protocol behaviour (headers, digests,
error bodies, upload sessions).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request

from tests.support.processes import ServerProcess, ServerStartError, free_port, require_binary, stop_process

# free_port and stop_process lived here first; tests and benchmarks still import them from here.
__all__ = ["LocalRegistry", "RegistryStartError", "find_registry_binary", "free_port", "stop_process"]

START_TIMEOUT = 20.0
"""Seconds to wait for ``GET /v2/`` to answer 200 before giving up."""

STOP_TIMEOUT = 5.0
"""Seconds to wait after SIGTERM before resorting to SIGKILL."""

# Never route loopback test traffic through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryStartError(ServerStartError):
    """The registry did not come up; the message carries the tail of its log."""


def find_registry_binary() -> str | None:
    """Locate the distribution binary (Debian names it ``docker-registry``, upstream ``registry``)."""
    for candidate in ("docker-registry", "registry"):
        found = shutil.which(candidate)
        if found is not None:
            return found
    return None


def _yaml_str(value: str) -> str:
    """Quote a scalar for YAML; a JSON string literal is a valid YAML double-quoted scalar."""
    return json.dumps(value)


class LocalRegistry(ServerProcess):
    """A throwaway ``docker-registry`` on 127.0.0.1 with filesystem storage under ``workdir``.

    Deletes are enabled so tests can remove upstream content; auth is off and
    health checks are off so the registry never stalls on its own probes.
    """

    name = "docker-registry"
    start_error = RegistryStartError
    port_names = ("http",)
    start_timeout = START_TIMEOUT
    stop_grace = STOP_TIMEOUT
    keep_ports = False  # nothing holds on to its address across a restart
    env_prefix = "REGISTRY_"  # REGISTRY_* variables override the config file and could redirect it

    def __init__(
        self, workdir: str | os.PathLike[str], binary: str | None = None
    ) -> None:
        found = require_binary(binary, find_registry_binary, "docker-registry binary not found on PATH")
        super().__init__(workdir, found, "registry.log")
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the form used in image references."""
        if self._ports is None or self._process is None:
            raise RuntimeError("registry is not running")
        return f"127.0.0.1:{self._port('http')}"

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}"

    def command(self) -> list[str]:
        return [self.binary, "serve", str(self.config_path)]

    def _prepare(self) -> None:
        self.storage_dir.mkdir(exist_ok=True)
        self._write_config(self._port("http"))

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

    def _ping(self) -> bool:
        """True once ``GET /v2/`` answers 200 (the API version check)."""
        try:
            with _OPENER.open(f"{self.url}/v2/", timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False
