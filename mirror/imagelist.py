"""Image lists for seeding and exporting: which images, which platforms, whether their
referrers come along.

A list is plain text (one reference per line, `#` comments) or YAML, either a list or a mapping
with `images:`, whose entries are a reference or a mapping:

    images:
      - nginx:1.27                                   # Docker Hub's library/nginx
      - ref: ghcr.io/acme/app@sha256:<hex>
        platforms: [linux/amd64, linux/arm64]        # or "all" (the default)
        referrers: true                              # signatures, SBOMs, attestations
      - repository: quay.io/prometheus/prometheus     # every tag that passes the filters
        tags: {allow: ['^v2\\.'], deny: ['-rc'], semver: '>=2.50.0, <3.0.0'}

References name their registry as users write them (a first component with a dot or a port, or a
configured alias); the registry must be a configured upstream, and a name without one means the
default upstream, with Docker Hub's
`library/` rule where it applies. Every error names the line or entry at fault.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import semver
import yaml

from mirror.config import Config, UpstreamConfig
from mirror.errors import ConfigError, MirrorError
from mirror.oci import Digest, Reference, parse_name, parse_tag

# The first component of a reference names a registry if it looks like a host (Docker's rule).
_REGISTRY_RE = re.compile(r"[^/]*[.:][^/]*|localhost")


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, value: str) -> Platform:
        parts = value.strip().split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise ValueError(f"{value!r} is not a platform such as linux/amd64 or linux/arm/v7")
        return cls(*parts)

    @classmethod
    def of(cls, descriptor_platform: object) -> Platform | None:
        """The platform an index descriptor names, if it names one."""
        if not isinstance(descriptor_platform, dict):
            return None
        os_, architecture = descriptor_platform.get("os"), descriptor_platform.get("architecture")
        if not os_ or not architecture:
            return None
        variant = descriptor_platform.get("variant")
        return cls(str(os_), str(architecture), str(variant) if variant else None)

    def matches(self, descriptor_platform: object) -> bool:
        if not isinstance(descriptor_platform, dict):
            return False
        if (descriptor_platform.get("os"), descriptor_platform.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or descriptor_platform.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class TagFilter:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    semver: str | None = None
    """Comparisons that must all hold, comma-separated: `>=1.2.0, <2.0.0` (a leading `v` on a tag is ignored)."""

    def admits(self, tag: str) -> bool:
        if self.allow and not any(re.search(p, tag) for p in self.allow):
            return False
        if any(re.search(p, tag) for p in self.deny):
            return False
        if self.semver is None:
            return True
        try:
            version = semver.Version.parse(tag.removeprefix("v"))
        except ValueError:
            return False
        return all(version.match(clause.strip()) for clause in self.semver.split(","))


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One entry of the list, resolved to an upstream."""

    source: str
    """Where it came from, for messages: `line 3` or `images[2]`."""
    upstream: UpstreamConfig
    name: str
    reference: Reference | None
    """None: every tag `tags` admits."""
    platforms: tuple[Platform, ...] | None = None
    """None: all."""
    referrers: bool = False
    tags: TagFilter | None = None

    def __str__(self) -> str:
        reference = "" if self.reference is None else (
            f"@{self.reference.digest}" if self.reference.digest else f":{self.reference.tag}")
        return f"{self.upstream.name}/{self.name}{reference}"


def parse_reference(text: str, config: Config, source: str,
                    any_registry: bool = False) -> tuple[UpstreamConfig, str, Reference | None]:
    """(upstream, repository name, reference) of a reference as users write it; the reference
    is None for a bare repository, which means `latest` where a tag is wanted."""
    text = text.strip()
    digest = None
    if "@" in text:
        text, _, digest_text = text.partition("@")
        digest = Digest.parse(digest_text)
    first, slash, rest = text.partition("/")
    if slash and (_REGISTRY_RE.fullmatch(first) or _configured(config, first)):
        upstream = _upstream(config, first, source, any_registry)
        path = rest
    else:
        upstream = config.upstream(config.default_upstream)
        path = text
    name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "")
    if upstream.library_prefix and "/" not in name:
        name = f"library/{name}"
    name = parse_name(name)
    if digest is not None:
        return upstream, name, Reference(digest=digest)
    return upstream, name, Reference(tag=parse_tag(tag)) if colon else None


def _configured(config: Config, registry: str) -> UpstreamConfig | None:
    for upstream in config.upstreams:
        if registry == upstream.name or registry in upstream.aliases:
            return upstream
    return None


def _upstream(config: Config, registry: str, source: str, any_registry: bool) -> UpstreamConfig:
    """The configured upstream `registry` names; with `any_registry` (a list for another mirror,
    which knows its own upstreams), any registry host."""
    if (upstream := _configured(config, registry)) is not None:
        return upstream
    if any_registry:
        return UpstreamConfig(name=registry, url=f"https://{registry}")
    raise ConfigError(f"{source}: registry {registry!r} is not a configured upstream "
                      f"(configured: {', '.join(u.name for u in config.upstreams)})")


def load_list(text: str, config: Config, any_registry: bool = False) -> list[ImageSpec]:
    """The image list in `text`, plain or YAML."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        document = None
    if isinstance(document, dict) and "images" in document:
        document = document["images"]
    if isinstance(document, list):
        return [_entry(item, f"images[{i}]", config, any_registry) for i, item in enumerate(document)]
    specs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            specs.append(_entry(line, f"line {number}", config, any_registry))
    return specs


def from_arguments(references: Sequence[str], config: Config, any_registry: bool = False) -> list[ImageSpec]:
    return [_entry(r, f"argument {r!r}", config, any_registry) for r in references]


def _entry(item: object, source: str, config: Config, any_registry: bool) -> ImageSpec:
    try:
        if isinstance(item, str):
            upstream, name, reference = parse_reference(item, config, source, any_registry)
            return ImageSpec(source, upstream, name, reference or Reference(tag="latest"))
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: expected a reference or a mapping, got {type(item).__name__}")
        unknown = set(item) - {"ref", "repository", "platforms", "referrers", "tags"}
        if unknown:
            raise ConfigError(f"{source}.{sorted(unknown)[0]}: unknown key (expected ref, repository, platforms, "
                              "referrers, tags)")
        if ("ref" in item) == ("repository" in item):
            raise ConfigError(f"{source}: give exactly one of ref and repository")
        platforms = _platforms(item.get("platforms", "all"), f"{source}.platforms")
        referrers = item.get("referrers", False)
        if not isinstance(referrers, bool):
            raise ConfigError(f"{source}.referrers: expected true or false")
        if "ref" in item:
            upstream, name, reference = parse_reference(str(item["ref"]), config, f"{source}.ref", any_registry)
            return ImageSpec(source, upstream, name, reference or Reference(tag="latest"), platforms, referrers)
        upstream, name, reference = parse_reference(str(item["repository"]), config, f"{source}.repository",
                                                    any_registry)
        if reference is not None:
            raise ConfigError(f"{source}.repository: a repository has no tag or digest; use ref for one image")
        return ImageSpec(source, upstream, name, None, platforms, referrers, _tag_filter(item.get("tags"), source))
    except MirrorError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None


def _platforms(value: object, source: str) -> tuple[Platform, ...] | None:
    if value == "all":
        return None
    values = value.split(",") if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{source}: expected all, or a list such as [linux/amd64, linux/arm64]")
    try:
        return tuple(Platform.parse(str(v)) for v in values)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _tag_filter(value: object, source: str) -> TagFilter:
    if value is None:
        return TagFilter()
    if not isinstance(value, dict) or set(value) - {"allow", "deny", "semver"}:
        raise ConfigError(f"{source}.tags: expected a mapping of allow, deny and semver")
    patterns: dict[str, tuple[str, ...]] = {}
    for key in ("allow", "deny"):
        listed = value.get(key, [])
        listed = [listed] if isinstance(listed, str) else listed
        if not isinstance(listed, list):
            raise ConfigError(f"{source}.tags.{key}: expected a list of regular expressions")
        for pattern in listed:
            try:
                re.compile(str(pattern))
            except re.error as exc:
                raise ConfigError(f"{source}.tags.{key}: {pattern!r} is not a regular expression: {exc}") from None
        patterns[key] = tuple(str(p) for p in listed)
    range_ = value.get("semver")
    if range_ is not None:
        try:
            probe = semver.Version.parse("0.0.0")
            for clause in str(range_).split(","):
                probe.match(clause.strip())
        except ValueError as exc:
            raise ConfigError(f"{source}.tags.semver: {range_!r} is not a range such as '>=1.2.0, <2.0.0': "
                              f"{exc}") from None
    return TagFilter(patterns["allow"], patterns["deny"], None if range_ is None else str(range_))
