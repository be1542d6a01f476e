"""Image lists: references as users write them, resolved through the configured upstreams, and
errors that name the line or entry at fault."""

from __future__ import annotations

import pytest

from mirror.config import Config, UpstreamConfig
from mirror.errors import ConfigError
from mirror.imagelist import Platform, TagFilter, load_list

CONFIG = Config(upstreams=(
    UpstreamConfig(name="docker.io", url="http://127.0.0.1:1", aliases=("hub",), library_prefix=True),
    UpstreamConfig(name="ghcr.io", url="http://127.0.0.1:2"),
    UpstreamConfig(name="127.0.0.1:5001", url="http://127.0.0.1:5001"),
))
DIGEST = "sha256:" + "ab" * 32


def test_plain_text_references_resolve_as_docker_does() -> None:
    text = f"""
# a comment, then references
nginx:1.27
library/redis
hub/team/app:v1           # an alias names the upstream
ghcr.io/acme/tool@{DIGEST}
127.0.0.1:5001/local/thing:2
"""
    assert [str(s) for s in load_list(text, CONFIG)] == [
        "docker.io/library/nginx:1.27", "docker.io/library/redis:latest", "docker.io/team/app:v1",
        f"ghcr.io/acme/tool@{DIGEST}", "127.0.0.1:5001/local/thing:2"]


def test_yaml_entries_with_platforms_referrers_and_tag_filters() -> None:
    text = """
images:
  - alpine:3.19
  - ref: ghcr.io/acme/app:1.0
    platforms: [linux/amd64, linux/arm/v7]
    referrers: true
  - repository: quay.io.example/prom
    tags: {allow: ['^v2\\.'], deny: ['-rc'], semver: '>=2.50.0, <3.0.0'}
"""
    config = Config(upstreams=(*CONFIG.upstreams, UpstreamConfig(name="quay.io.example", url="http://127.0.0.1:3")))
    plain, pinned, repository = load_list(text, config)
    assert str(plain) == "docker.io/library/alpine:3.19" and plain.platforms is None
    assert pinned.platforms == (Platform("linux", "amd64"), Platform("linux", "arm", "v7")) and pinned.referrers
    assert repository.reference is None and repository.tags is not None
    admitted = [t for t in ("v2.49.0", "v2.50.1", "v2.53.0-rc.1", "v3.0.0", "v1.2", "latest")
                if repository.tags.admits(t)]
    assert admitted == ["v2.50.1"]


def test_platform_matching() -> None:
    assert Platform.parse("linux/arm64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not Platform.parse("linux/arm/v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert TagFilter().admits("anything")


@pytest.mark.parametrize(("text", "message"), [
    ("nginx\nquay.io/x/y:1", "line 2: registry 'quay.io' is not a configured upstream"),
    ("Bad_Name:1", "line 1: invalid repository name"),
    ("nginx:bad!tag", "line 1: invalid tag"),
    ("nginx@sha256:short", "line 1: malformed"),
    ("- {ref: nginx, platforms: [linux]}", "images[0].platforms: 'linux' is not a platform"),
    ("- {ref: nginx, colour: red}", "images[0].colour: unknown key"),
    ("- {ref: nginx, repository: nginx}", "images[0]: give exactly one of ref and repository"),
    ("- {repository: nginx:1}", "images[0].repository: a repository has no tag"),
    ("- {repository: nginx, tags: {allow: ['(']}}", "images[0].tags.allow: '(' is not a regular expression"),
    ("- {repository: nginx, tags: {semver: 'about 2'}}", "images[0].tags.semver"),
    ("- {ref: nginx, referrers: maybe}", "images[0].referrers: expected true or false"),
    ("- 42", "images[0]: expected a reference or a mapping"),
])
def test_a_bad_entry_is_an_error_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_list(text, CONFIG)
    assert message in str(raised.value)
