"""The `mirror` command as a user runs it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Registry
from tests.test_skopeo import assert_same_tree, copy

MIRROR = [sys.executable, "-m", "mirror"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Served:
    """`mirror serve` in its own process. Its log is drained by a thread, which signals once
    the mirror says it is listening."""

    def __init__(self, *args: str) -> None:
        self.host = f"127.0.0.1:{free_port()}"
        self.process = subprocess.Popen([*MIRROR, "serve", "--listen", self.host, *args],
                                        stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(timeout=20):
            self.stop()
            pytest.fail("mirror did not start within 20 s:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "listening on" in line:
                self._ready.set()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def served(registry: Registry, tmp_path: Path) -> Iterator[str]:
    mirror = Served("--cache-dir", str(tmp_path / "cache"), "--upstream", f"docker.io={registry.url}")
    yield mirror.host
    mirror.stop()


async def test_serve_then_pull_with_skopeo(served: str, registry: Registry, skopeo: str, tmp_path: Path) -> None:
    image = registry.images["index"]
    await copy(skopeo, f"{registry.host}/{image.name}:{image.tag}", tmp_path / "direct", True)
    await copy(skopeo, f"{served}/multi:{image.tag}", tmp_path / "mirrored", True)
    assert_same_tree(tmp_path / "direct", tmp_path / "mirrored")


def test_help_explains_itself() -> None:
    out = subprocess.run([*MIRROR, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--config", "--listen", "--cache-dir", "--upstream", "--default-upstream"):
        assert flag in out
    assert "docker.io means Docker Hub" in out


def test_bad_config_is_reported_with_its_key_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("upstreams:\n  - {name: docker.io, url: 'http://127.0.0.1:1', tag_ttl: later}\n")
    result = subprocess.run([*MIRROR, "serve", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "upstreams[0].tag_ttl" in result.stderr


def test_startup_sweeps_unfinished_downloads(tmp_path: Path) -> None:
    leftover = tmp_path / "cache" / "tmp" / "abc.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a blob")
    mirror = Served("--cache-dir", str(tmp_path / "cache"), "--upstream", "docker.io=http://127.0.0.1:9")
    mirror.stop()
    assert not leftover.exists()
    assert any("swept 1 unfinished" in line for line in mirror.log)
