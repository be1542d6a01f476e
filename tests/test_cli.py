"""The `mirror` command as a user runs it."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Registry
from tests.support.served import MIRROR, Served
from tests.support.skopeo import assert_same_tree, copy


@pytest.fixture
async def served(registry: Registry, tmp_path: Path) -> AsyncIterator[str]:
    mirror = await Served.start("--cache-dir", tmp_path / "cache", "--upstream", f"docker.io={registry.url}")
    yield mirror.host
    assert await mirror.terminate() == 0


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


async def test_startup_sweeps_unfinished_downloads(tmp_path: Path) -> None:
    leftover = tmp_path / "cache" / "tmp" / "abc.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a blob")
    mirror = await Served.start("--cache-dir", tmp_path / "cache", "--upstream", "docker.io=http://127.0.0.1:9")
    assert await mirror.terminate() == 0
    assert not leftover.exists()
    assert any("swept 1 unfinished" in line for line in mirror.log)
