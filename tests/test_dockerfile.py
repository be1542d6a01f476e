"""The container image's recipe. No container engine runs here to build it, so this checks what
a build would rely on: the baked configuration loads and agrees with the ports, volume and
health check the image declares, and the image runs as a non-root user."""

from __future__ import annotations

import re
from pathlib import Path

from mirror.config import load

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of every `NAME ...` instruction of the final stage, continuation lines joined."""
    final = DOCKERFILE[DOCKERFILE.rindex("\nFROM "):]
    joined = re.sub(r"\\\n\s*", " ", final)
    return [m.group(1).strip() for m in re.finditer(rf"^{name} (.*)$", joined, re.MULTILINE)]


def test_baked_config_loads_and_matches_what_the_image_declares(tmp_path: Path) -> None:
    heredoc = re.search(r"^COPY <<EOF /etc/mirror/config.yaml\n(.*?)^EOF$", DOCKERFILE, re.MULTILINE | re.DOTALL)
    assert heredoc is not None
    (tmp_path / "config.yaml").write_text(heredoc.group(1))
    config = load(tmp_path / "config.yaml", environ={})
    assert config.metrics_listen is not None
    assert str(config.cache_dir) in instructions("VOLUME")
    assert sorted(instructions("EXPOSE")[0].split()) == sorted([str(config.port), str(config.metrics_listen[1])])
    assert f"127.0.0.1:{config.metrics_listen[1]}/healthz" in instructions("HEALTHCHECK")[0]
    assert "MIRROR_CONFIG=/etc/mirror/config.yaml" in instructions("ENV")[0]
    assert [u.name for u in config.upstreams] == ["docker.io"]


def test_image_runs_as_a_non_root_user_and_copies_only_what_exists() -> None:
    (user,) = instructions("USER")
    assert user.split(":")[0] not in ("0", "root")
    for line in re.findall(r"^COPY (?!--from|<<)(.*)$", DOCKERFILE, re.MULTILINE):
        *sources, _ = line.split()
        assert all((ROOT / source).exists() for source in sources), line
    assert instructions("ENTRYPOINT") == ['["mirror"]'] and instructions("CMD") == ['["serve"]']
