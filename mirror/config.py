"""Configuration: frozen dataclasses built from defaults < YAML file < environment < flags.

Every bad key or value raises `ConfigError` whose message starts with the key path
(`upstreams[1].tag_ttl: ...`), so an operator knows which line to fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.errors import ConfigError

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"

_HOST_RE = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                      r"|\[[0-9a-fA-F:.]+\]")
_ALIAS_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?")
_PREFIX_RE = re.compile(r"(?:/[A-Za-z0-9._-]+)+")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2,
               "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4}


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream registry. `name` is the registry host as clients write it (docker.io,
    ghcr.io, 127.0.0.1:5001); `url` is where the mirror fetches from."""

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tag_ttl: float = 300.0
    max_age: float | None = None
    """Content nobody pulled for this long is evicted (unless another upstream keeps it)."""
    library_prefix: bool = False
    """Docker Hub's rule: a one-segment name means `library/<name>`."""


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    """Per-operation limits. There is deliberately no total timeout: a large blob may take
    as long as it takes, as long as bytes keep coming."""

    connect: float = 10.0
    read: float = 60.0
    revalidate: float = 5.0
    """How long a cached tag's revalidation may take before the cached copy is served stale."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client may hold: slow or idle connections are closed, and past `max_connections`
    new ones are refused, so no client can exhaust the mirror's sockets."""

    header_timeout: float = 30.0
    """A request head (request line and headers) must arrive within this, from its first byte."""
    keepalive_timeout: float = 75.0
    """An idle keep-alive connection is closed after this."""
    max_connections: int = 4096


@dataclass(frozen=True, slots=True)
class EvictionConfig:
    """The disk budget. Past `high_watermark` x `max_size`, least recently used content goes
    until usage is under `low_watermark` x `max_size`. No `max_size`: nothing is evicted."""

    max_size: int | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.8


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 5000
    cache_dir: Path = Path("mirror-cache")
    default_upstream: str = DOCKER_HUB
    upstreams: tuple[UpstreamConfig, ...] = (
        UpstreamConfig(name=DOCKER_HUB, url=DOCKER_HUB_URL, library_prefix=True),
    )
    timeouts: TimeoutConfig = TimeoutConfig()
    eviction: EvictionConfig = EvictionConfig()
    log_level: str = "info"
    path_prefix: str = ""
    """Where the API is mounted (`/registry` serves `/registry/v2/...`), for a reverse proxy or a
    hosts.toml that names a path; `/v2/...` is still served."""
    metrics_listen: tuple[str, int] | None = None
    """A second listener for /metrics, /healthz and /readyz; None serves them beside the API."""
    log_format: str = "text"
    """`text` (access lines in Common Log Format plus fields) or `json` (one object per line)."""
    shutdown_grace: float = 30.0
    """After SIGTERM, how long responses under way may take to finish."""
    connections: ConnectionLimits = ConnectionLimits()

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


def parse_duration(value: object, path: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected a duration such as 30s, 5m or 1h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ConfigError(f"{path}: expected a duration such as 30s, 5m or 1h, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{path}: must not be negative")
    return seconds


def parse_size(value: object, path: str) -> int:
    """A size in bytes: a number, or `50GiB`, `500MB`, `2T` (IEC or SI units)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
        if size > 0:
            return size
    raise ConfigError(f"{path}: expected a size such as 50GiB or 500MB, got {value!r}")


def parse_listen(value: str, path: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{path}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_upstream_flag(value: str, path: str) -> tuple[str, str]:
    """`[NAME=]URL`; without a name, the URL's host[:port] names the upstream."""
    name, sep, url = value.partition("=")
    if not sep:
        name, url = "", value
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{path}: expected [NAME=]URL with an http(s) URL, got {value!r}")
    return (name or parts.netloc), url


def parse_path_prefix(value: str, path: str) -> str:
    """`/some/prefix` (a trailing slash is dropped; `/` or empty means none)."""
    prefix = value.rstrip("/")
    segments = prefix.split("/")[1:]
    if prefix and (not _PREFIX_RE.fullmatch(prefix) or any(s in (".", "..", "v2") for s in segments)):
        raise ConfigError(f"{path}: expected a path such as /registry (segments of letters, digits, '.', '_', '-', "
                          f"and no 'v2' segment), got {value!r}")
    return prefix


def _check_name(name: str, path: str) -> str:
    host, _, port = name.rpartition(":") if name.count(":") == 1 or name.startswith("[") else ("", "", "")
    if not host:
        host, port = name, ""
    if not _HOST_RE.fullmatch(host) or (port and not port.isdigit()) or name != name.lower():
        raise ConfigError(f"{path}: {name!r} is not a registry host[:port] in lower case")
    return name


class _Section:
    """A YAML mapping with its key path, so every error can name where it came from."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise ConfigError(f"{self.at(str(key))}: unknown key (expected one of {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.at(key)}: expected {names}, got {value!r}")
        return value


def _secret(section: _Section, key: str, environ: Mapping[str, str]) -> str | None:
    """A secret given inline, from a file (a mounted Kubernetes secret) or from a variable."""
    sources = [k for k in (key, f"{key}_file", f"{key}_env") if section.data.get(k) is not None]
    if len(sources) > 1:
        raise ConfigError(f"{section.at(key)}: give only one of {', '.join(sources)}")
    if not sources:
        return None
    source = sources[0]
    value: str = section.get(source, str)
    if source.endswith("_file"):
        try:
            return Path(value).read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError(f"{section.at(source)}: cannot read {value}: {exc.strerror}") from exc
    if source.endswith("_env"):
        if value not in environ:
            raise ConfigError(f"{section.at(source)}: environment variable {value} is not set")
        return environ[value]
    return value


def _upstream(section: _Section, environ: Mapping[str, str]) -> UpstreamConfig:
    section.check_keys({"name", "url", "aliases", "tag_ttl", "max_age", "library_prefix", "credentials"})
    name = section.get("name", str)
    url = section.get("url", str)
    if name is None or url is None:
        raise ConfigError(f"{section.path}: an upstream needs both name and url")
    _check_name(name, section.at("name"))
    parse_upstream_flag(url, section.at("url"))
    aliases = section.get("aliases", list, [])
    for i, alias in enumerate(aliases):
        if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
            raise ConfigError(f"{section.at('aliases')}[{i}]: {alias!r} is not a lower-case alias without dots")
    username = password = None
    if (creds := section.data.get("credentials")) is not None:
        cred = _Section(creds, section.at("credentials"))
        cred.check_keys({"username", "password", "password_file", "password_env"})
        username = cred.get("username", str)
        password = _secret(cred, "password", environ)
        if (username is None) != (password is None):
            raise ConfigError(f"{cred.path}: give both username and a password")
    return UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        aliases=tuple(aliases),
        username=username,
        password=password,
        tag_ttl=parse_duration(section.data.get("tag_ttl", 300), section.at("tag_ttl")),
        max_age=(parse_duration(section.data["max_age"], section.at("max_age"))
                 if section.data.get("max_age") is not None else None),
        library_prefix=section.get("library_prefix", bool, name == DOCKER_HUB),
    )


def merge_upstreams(current: Sequence[UpstreamConfig], extra: Sequence[tuple[str, str]],
                    path: str) -> tuple[UpstreamConfig, ...]:
    """`--upstream NAME=URL` replaces the URL of the upstream of that name, or adds one."""
    merged = {u.name: u for u in current}
    for name, url in extra:
        _check_name(name, path)
        previous = merged.get(name)
        merged[name] = (replace(previous, url=url.rstrip("/")) if previous else
                        UpstreamConfig(name=name, url=url.rstrip("/"), library_prefix=name == DOCKER_HUB))
    return tuple(merged.values())


@dataclass(frozen=True, slots=True)
class Overrides:
    """What the command line says; None means 'not given'."""

    listen: str | None = None
    cache_dir: str | None = None
    max_size: str | None = None
    upstreams: tuple[str, ...] = ()
    default_upstream: str | None = None
    log_level: str | None = None
    path_prefix: str | None = None
    metrics_listen: str | None = None
    log_format: str | None = None
    shutdown_grace: str | None = None


def load(path: Path | None = None, environ: Mapping[str, str] | None = None,
         overrides: Overrides = Overrides()) -> Config:
    environ = os.environ if environ is None else environ
    data: object = {}
    if path is None and environ.get("MIRROR_CONFIG"):
        path = Path(environ["MIRROR_CONFIG"])
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    return _build(_Section(data, ""), environ, overrides)


_SCALARS = ("listen", "cache_dir", "default_upstream", "log_level", "path_prefix", "metrics_listen", "log_format",
            "shutdown_grace")


def _scalar_settings(root: _Section, environ: Mapping[str, str],
                     overrides: Overrides) -> dict[str, tuple[str, object]]:
    """Each plain setting with where it came from (for error messages), the file overridden by
    the environment overridden by the flags."""
    settings: dict[str, tuple[str, object]] = {}
    for key in _SCALARS:
        variable, flag = f"MIRROR_{key.upper()}", f"--{key.replace('_', '-')}"
        for origin, value in ((key, root.data.get(key)), (variable, environ.get(variable)),
                              (flag, getattr(overrides, key))):
            if value is not None:
                settings[key] = (origin, value)
    return settings


def _build(root: _Section, environ: Mapping[str, str], overrides: Overrides) -> Config:
    root.check_keys({"listen", "cache_dir", "default_upstream", "upstreams", "upstream_timeouts", "log_level",
                     "max_size", "eviction", "connections", *_SCALARS})
    config = Config()
    for key, (origin, value) in _scalar_settings(root, environ, overrides).items():
        if key == "listen":
            host, port = parse_listen(str(value), origin)
            config = replace(config, host=host, port=port)
        elif key == "cache_dir":
            config = replace(config, cache_dir=Path(str(value)))
        elif key == "default_upstream":
            config = replace(config, default_upstream=str(value))
        elif key == "path_prefix":
            config = replace(config, path_prefix=parse_path_prefix(str(value), origin))
        elif key == "metrics_listen":
            config = replace(config, metrics_listen=parse_listen(str(value), origin))
        elif key == "log_format":
            config = replace(config, log_format=str(value).lower())
        elif key == "shutdown_grace":
            config = replace(config, shutdown_grace=parse_duration(value, origin))
        else:
            config = replace(config, log_level=str(value).lower())

    if (items := root.get("upstreams", list)) is not None:
        upstreams = tuple(_upstream(_Section(item, f"upstreams[{i}]"), environ) for i, item in enumerate(items))
        config = replace(config, upstreams=upstreams)
    if environ.get("MIRROR_UPSTREAMS"):
        flags = [parse_upstream_flag(v, "MIRROR_UPSTREAMS") for v in environ["MIRROR_UPSTREAMS"].split()]
        config = replace(config, upstreams=merge_upstreams(config.upstreams, flags, "MIRROR_UPSTREAMS"))
    if overrides.upstreams:
        flags = [parse_upstream_flag(v, "--upstream") for v in overrides.upstreams]
        config = replace(config, upstreams=merge_upstreams(config.upstreams, flags, "--upstream"))

    eviction = EvictionConfig()
    if (section_data := root.data.get("eviction")) is not None:
        section = _Section(section_data, "eviction")
        section.check_keys({"high_watermark", "low_watermark"})
        eviction = EvictionConfig(
            high_watermark=_fraction(section.data.get("high_watermark", 0.9), section.at("high_watermark")),
            low_watermark=_fraction(section.data.get("low_watermark", 0.8), section.at("low_watermark")))
        if eviction.low_watermark > eviction.high_watermark:
            raise ConfigError("eviction.low_watermark: must not be above high_watermark")
    for origin, value in (("max_size", root.data.get("max_size")), ("MIRROR_MAX_SIZE", environ.get("MIRROR_MAX_SIZE")),
                          ("--max-size", overrides.max_size)):
        if value is not None:
            eviction = replace(eviction, max_size=parse_size(value, origin))
    config = replace(config, eviction=eviction)

    if (connections := root.data.get("connections")) is not None:
        section = _Section(connections, "connections")
        section.check_keys({"header_timeout", "keepalive_timeout", "max"})
        limit = section.get("max", int, 4096)
        if limit < 1:
            raise ConfigError("connections.max: must be at least 1")
        durations = {key: parse_duration(section.data.get(key, default), section.at(key))
                     for key, default in (("header_timeout", 30), ("keepalive_timeout", 75))}
        config = replace(config, connections=ConnectionLimits(**durations, max_connections=limit))
    if (timeouts := root.data.get("upstream_timeouts")) is not None:
        section = _Section(timeouts, "upstream_timeouts")
        section.check_keys({"connect", "read", "revalidate"})
        config = replace(config, timeouts=TimeoutConfig(
            connect=parse_duration(section.data.get("connect", 10), section.at("connect")),
            read=parse_duration(section.data.get("read", 60), section.at("read")),
            revalidate=parse_duration(section.data.get("revalidate", 5), section.at("revalidate"))))
    _validate(config)
    return config


def _fraction(value: object, path: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ConfigError(f"{path}: expected a fraction of max_size between 0 and 1, got {value!r}")


def _validate(config: Config) -> None:
    seen: dict[str, str] = {}
    for i, upstream in enumerate(config.upstreams):
        for key in (upstream.name, *upstream.aliases):
            if key == "v2":
                raise ConfigError(f"upstreams[{i}]: 'v2' cannot name an upstream: it marks the registry API in paths")
            if key in seen:
                raise ConfigError(f"upstreams[{i}]: {key!r} is already used by upstream {seen[key]!r}")
            seen[key] = upstream.name
    if config.default_upstream not in {u.name for u in config.upstreams}:
        raise ConfigError(f"default_upstream: {config.default_upstream!r} is not a configured upstream")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {config.log_format!r}")
    if config.metrics_listen == (config.host, config.port) and config.port != 0:
        raise ConfigError("metrics_listen: must differ from listen")
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {config.log_level!r}")
