"""Configuration: frozen dataclasses built from defaults < YAML file < environment < flags.

Every bad key or value raises `ConfigError` whose message starts with the key path
(`upstreams[1].tag_ttl: ...`), so an operator knows which line to fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.breaker import BreakerConfig
from mirror.credentials import (
    AZURE_AUTHORITY,
    AcrCredentials,
    CredentialsConfig,
    DockerConfigCredentials,
    EcrCredentials,
    GcrCredentials,
)
from mirror.errors import ConfigError
from mirror.signatures import Keyring

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
    credentials: CredentialsConfig | None = None
    """Credentials from somewhere other than `username`/`password`: a Docker config.json or a cloud."""
    token_realms: tuple[str, ...] | None = None
    """Token services the credentials may be sent to (`host[:port]`, `*.domain`); None: the
    upstream's host, its registrable domain and that domain's subdomains."""
    tag_ttl: float = 300.0
    max_age: float | None = None
    """Content nobody pulled for this long is evicted (unless another upstream keeps it)."""
    library_prefix: bool = False
    """Docker Hub's rule: a one-segment name means `library/<name>`."""
    stale_while_revalidate: bool = True
    """A tag past its TTL is served from the cache at once while one revalidation runs in the
    background; False waits for the revalidation (up to `upstream_timeouts.revalidate`)."""
    negative_ttl: float = 30.0
    """How long an upstream 404 for a tag or manifest is remembered (0: not at all)."""
    referrers_ttl: float = 300.0
    """How long a subject's list of referrers (signatures, SBOMs) is served before it is asked
    for again: the subject is immutable, but its referrers arrive and go after it."""
    referrers_negative_ttl: float = 60.0
    """The same for an empty list: a signature pushed just after its image shows up sooner."""
    on_refusal: str = "stale"
    """What an upstream 401 or 403 means for a cached tag: `stale` (an outage of the mirror's
    credentials: serve the cached copy and log it) or `deny` (stop serving it)."""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    offline: bool = False
    """Never contact this upstream: serve what is cached (tags as they were, whatever their
    age) and answer the rest "not cached"."""


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
class AccessRule:
    """Who (`user:NAME`, `group:NAME`, `anonymous`, `authenticated` or `*`) may or may not pull
    (or administer: pin, unpin, gc, seed) which repositories (`UPSTREAM/GLOB`, e.g.
    `ghcr.io/acme/*`, where `*` spans `/` too)."""

    who: tuple[str, ...]
    allow: bool
    repositories: tuple[str, ...]
    permissions: frozenset[str] = frozenset({"pull"})
    """What the rule decides: `pull`, `admin` or both (a deny rule, by default, both)."""


PERMISSIONS = ("pull", "admin")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Client authentication and access rules. With no htpasswd and no rules, anyone may pull
    everything; with an htpasswd and no rules, every authenticated user may, anonymous nobody."""

    htpasswd: Path | None = None
    token_lifetime: float = 300.0
    token_key_file: Path | None = None
    """The key tokens are signed with, shared by replicas; None: a random key per process."""
    realm: str | None = None
    """The token service URL clients are sent to; None: this mirror's /token as the client reached it."""
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rules: tuple[AccessRule, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or bool(self.rules)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None
    """Certificates signed by this CA identify clients (mTLS): the subject's CN is the user name."""
    client_certs: str = "optional"
    """`optional` (a certificate is one way to authenticate) or `required` (no certificate, no connection)."""


@dataclass(frozen=True, slots=True)
class EvictionConfig:
    """The disk budget. Past `high_watermark` x `max_size`, least recently used content goes
    until usage is under `low_watermark` x `max_size`. No `max_size`: nothing is evicted."""

    max_size: int | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.8


@dataclass(frozen=True, slots=True)
class SignaturePolicy:
    """Manifests of runnable images in the repositories it covers are served only with a valid
    cosign/sigstore signature by one of `keys` (Harbor's "prevent unsigned images", for every
    upstream at once). The first policy that covers a repository applies."""

    name: str
    keys: tuple[Path, ...]
    """PEM public keys; any one of them may sign."""
    upstreams: tuple[str, ...] = ("*",)
    repositories: tuple[str, ...] = ("*",)
    """Repository names as the upstream knows them (`library/alpine`), as shell patterns
    (`team/*`, `*`); `*` crosses `/`."""


@dataclass(frozen=True, slots=True)
class S3Location:
    """Shared object storage: `s3://bucket/prefix`."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


@dataclass(frozen=True, slots=True)
class S3Config:
    """How to reach the bucket. Each unset key is left to the AWS SDK's own settings
    (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, profiles, instance or pod roles)."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    presign: bool = False
    """Answer a hit with a 307 to a presigned URL of the object, for clients that can reach the
    bucket themselves: the bytes then bypass the mirror."""
    presign_ttl: float = 300.0


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
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None
    storage: S3Location | None = None
    """Shared object storage for blobs; None keeps them on the local disk in `cache_dir`, which
    is then the spool only."""
    s3: S3Config = S3Config()
    redis: str | None = field(default=None, repr=False)
    """Redis for coordination between replicas that share `storage` (the URL may hold a password)."""
    advertise: str | None = None
    """How other replicas reach this one; None: from the listen address."""
    signature_policies: tuple[SignaturePolicy, ...] = ()
    admin_token_file: Path | None = None
    """A file holding the token (`Authorization: Bearer ...`) that may use the admin API."""

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
    if parts.username is not None or parts.password is not None:
        # A URL is logged and shown; a secret in it would be too.
        raise ConfigError(f"{path}: put credentials under the upstream's credentials:, not in its URL")
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
            shown = "a value (not shown: it is a secret)" if key in _SECRET_KEYS else repr(value)
            raise ConfigError(f"{self.at(key)}: expected {names}, got {shown}")
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
        check_private(Path(value), section.at(source))
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
    section.check_keys({"name", "url", "aliases", "tag_ttl", "max_age", "library_prefix", "credentials",
                        "token_realms", "stale_while_revalidate", "negative_ttl", "on_refusal", "breaker",
                        "offline", "referrers_ttl", "referrers_negative_ttl"})
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
    username = password = credentials = None
    if (creds := section.data.get("credentials")) is not None:
        username, password, credentials = _credentials(_Section(creds, section.at("credentials")), environ)
    realms = section.get("token_realms", list)
    for i, realm in enumerate(realms or ()):
        try:
            _check_name(realm.removeprefix("*.") if isinstance(realm, str) else "", "")
        except ConfigError:
            raise ConfigError(f"{section.at('token_realms')}[{i}]: {realm!r} is not a host, host:port or *.domain "
                              "in lower case") from None
    return UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        aliases=tuple(aliases),
        username=username,
        password=password,
        credentials=credentials,
        token_realms=None if realms is None else tuple(realms),
        tag_ttl=parse_duration(section.data.get("tag_ttl", 300), section.at("tag_ttl")),
        max_age=(parse_duration(section.data["max_age"], section.at("max_age"))
                 if section.data.get("max_age") is not None else None),
        library_prefix=section.get("library_prefix", bool, name == DOCKER_HUB),
        stale_while_revalidate=section.get("stale_while_revalidate", bool, True),
        negative_ttl=parse_duration(section.data.get("negative_ttl", 30), section.at("negative_ttl")),
        referrers_ttl=parse_duration(section.data.get("referrers_ttl", 300), section.at("referrers_ttl")),
        referrers_negative_ttl=parse_duration(section.data.get("referrers_negative_ttl", 60),
                                              section.at("referrers_negative_ttl")),
        on_refusal=_choice(section, "on_refusal", ("stale", "deny"), "stale"),
        breaker=_breaker(section),
        offline=section.get("offline", bool, False),
    )


def _choice(section: _Section, key: str, choices: tuple[str, ...], default: str) -> str:
    value: str = section.get(key, str, default)
    if value not in choices:
        raise ConfigError(f"{section.at(key)}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _breaker(upstream: _Section) -> BreakerConfig:
    if (data := upstream.data.get("breaker")) is None:
        return BreakerConfig()
    section = _Section(data, upstream.at("breaker"))
    section.check_keys({"failures", "backoff", "max_backoff", "refusal_backoff"})
    failures = section.get("failures", int, BreakerConfig().failures)
    if failures < 1:
        raise ConfigError(f"{section.at('failures')}: must be at least 1")
    durations = _durations(section, BreakerConfig(), ("backoff", "max_backoff", "refusal_backoff"))
    for key, seconds in durations.items():
        if seconds <= 0:
            raise ConfigError(f"{section.at(key)}: must be positive")
    if durations["max_backoff"] < durations["backoff"]:
        raise ConfigError(f"{section.at('max_backoff')}: must not be below backoff")
    return BreakerConfig(failures=failures, **durations)


_CREDENTIAL_KINDS = ("docker_config", "ecr", "gcr", "acr")
_PASSWORD_KEYS = {"username", "password", "password_file", "password_env"}


def _credentials(section: _Section, environ: Mapping[str, str]
                 ) -> tuple[str | None, str | None, CredentialsConfig | None]:
    """Exactly one kind: username with a password, docker_config, ecr, gcr or acr. Returns
    (username, password) for the first, the kind's settings for the others."""
    section.check_keys(_PASSWORD_KEYS | set(_CREDENTIAL_KINDS))
    kinds = [k for k in _CREDENTIAL_KINDS if k in section.data] + (["username"] if _PASSWORD_KEYS & set(section.data)
                                                                   else [])
    if len(kinds) != 1:
        raise ConfigError(f"{section.path}: give exactly one of username with a password, docker_config, ecr, gcr "
                          f"or acr{' (got ' + ', '.join(kinds) + ')' if kinds else ''}")
    if kinds == ["username"]:
        username = section.get("username", str)
        password = _secret(section, "password", environ)
        if username is None or password is None:
            raise ConfigError(f"{section.path}: give both username and a password")
        return username, password, None
    if kinds == ["docker_config"]:
        path = section.get("docker_config", str)
        _json_file(path, section.at("docker_config"))
        return None, None, DockerConfigCredentials(Path(path))
    kind = _Section(section.data[kinds[0]], section.at(kinds[0]))
    if kinds == ["ecr"]:
        kind.check_keys({"region", "registry_id", "endpoint_url"})
        region, registry_id = kind.get("region", str), kind.get("registry_id", (str, int))
        if not region:
            raise ConfigError(f"{kind.at('region')}: required, e.g. us-east-1")
        if registry_id is not None and not re.fullmatch(r"\d{12}", str(registry_id)):
            raise ConfigError(f"{kind.at('registry_id')}: expected a 12-digit AWS account id, got {registry_id!r}")
        endpoint_url = _http_url(kind, "endpoint_url")
        return None, None, EcrCredentials(region, None if registry_id is None else str(registry_id), endpoint_url)
    if kinds == ["gcr"]:
        kind.check_keys({"key_file", "metadata"})
        key_file, metadata = kind.get("key_file", str), kind.get("metadata", bool, False)
        if (key_file is None) != metadata:
            raise ConfigError(f"{kind.path}: give either key_file or metadata: true")
        if key_file is not None:
            _json_file(key_file, kind.at("key_file"))
        return None, None, GcrCredentials(Path(key_file) if key_file else None)
    kind.check_keys({"client_id", "client_secret", "client_secret_file", "client_secret_env", "tenant_id", "exchange",
                     "authority_host"})
    client_id, client_secret = kind.get("client_id", str), _secret(kind, "client_secret", environ)
    if client_id is None or client_secret is None:
        raise ConfigError(f"{kind.path}: give client_id and a client_secret")
    exchange, tenant_id = kind.get("exchange", bool, False), kind.get("tenant_id", str)
    if exchange and tenant_id is None:
        raise ConfigError(f"{kind.at('tenant_id')}: required with exchange: true")
    for key in ("tenant_id", "authority_host"):
        if not exchange and kind.data.get(key) is not None:
            raise ConfigError(f"{kind.at(key)}: only used with exchange: true")
    authority_host = _http_url(kind, "authority_host") or AZURE_AUTHORITY
    return None, None, AcrCredentials(client_id, client_secret, tenant_id, exchange, authority_host)


def _json_file(path: str, at: str) -> None:
    """A file the mirror reads credentials from at run time: fail at start-up, not at the first pull."""
    try:
        json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{at}: cannot read {path}: {exc.strerror}") from exc
    except ValueError:
        raise ConfigError(f"{at}: {path} is not valid JSON") from None


def _http_url(section: _Section, key: str) -> str | None:
    """An https URL (credentials travel to it); plain http only on loopback, for stand-ins."""
    url: str | None = section.get(key, str)
    if url is None:
        return None
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if not parts.netloc or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise ConfigError(f"{section.at(key)}: expected an https URL (http only on loopback), got {url!r}")
    return url.rstrip("/")


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
    htpasswd: str | None = None
    admin_token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    offline: bool = False
    storage: str | None = None
    redis: str | None = None
    advertise: str | None = None


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
            # PyYAML quotes the offending line, which may hold a secret: say only where it is.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "bad syntax"
            raise ConfigError(f"config: {path} is not valid YAML{where}: {problem}") from None
    return _build(_Section(data, ""), environ, overrides)


_SCALARS = ("listen", "cache_dir", "default_upstream", "log_level", "path_prefix", "metrics_listen", "log_format",
            "shutdown_grace", "storage", "redis", "advertise")


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
    root.check_keys({"upstreams", "upstream_timeouts", "max_size", "eviction", "connections", "auth", "tls",
                     "offline", "s3", "signature_policies", "admin", *_SCALARS})
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
        elif key == "storage":
            config = replace(config, storage=parse_storage(str(value), origin))
        elif key == "redis":
            config = replace(config, redis=_redis_url(str(value), origin))
        elif key == "advertise":
            config = replace(config, advertise=_advertise(str(value), origin))
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
    everything_offline = (root.get("offline", bool, False) or environ.get("MIRROR_OFFLINE", "") in ("1", "true")
                          or overrides.offline)
    # Offline, a tag is served as it was cached or imported, whatever its age: nothing could
    # revalidate it. A miss costs nothing to answer, and each is counted for the next image list.
    config = replace(config, upstreams=tuple(
        replace(u, offline=True, tag_ttl=math.inf, negative_ttl=0.0, referrers_ttl=math.inf,
                   referrers_negative_ttl=math.inf) if u.offline or everything_offline else u
        for u in config.upstreams))

    eviction = EvictionConfig()
    if (section_data := root.data.get("eviction")) is not None:
        section = _Section(section_data, "eviction")
        section.check_keys({"high_watermark", "low_watermark"})
        eviction = EvictionConfig(
            high_watermark=_fraction(section.data.get("high_watermark", eviction.high_watermark),
                                     section.at("high_watermark")),
            low_watermark=_fraction(section.data.get("low_watermark", eviction.low_watermark),
                                    section.at("low_watermark")))
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
        limit = section.get("max", int, config.connections.max_connections)
        if limit < 1:
            raise ConfigError("connections.max: must be at least 1")
        durations = _durations(section, config.connections, ("header_timeout", "keepalive_timeout"))
        for key, seconds in durations.items():
            if seconds <= 0:
                raise ConfigError(f"connections.{key}: must be positive")
        config = replace(config, connections=ConnectionLimits(**durations, max_connections=limit))
    if (timeouts := root.data.get("upstream_timeouts")) is not None:
        section = _Section(timeouts, "upstream_timeouts")
        section.check_keys({"connect", "read", "revalidate"})
        config = replace(config, timeouts=TimeoutConfig(
            **_durations(section, config.timeouts, ("connect", "read", "revalidate"))))
    config = replace(config, auth=_auth(root, overrides), tls=_tls(root, overrides), s3=_s3(root))
    config = replace(config, admin_token_file=_admin_token_file(root, overrides))
    if (policies := root.get("signature_policies", list)) is not None:
        config = replace(config, signature_policies=tuple(
            _signature_policy(_Section(item, f"signature_policies[{i}]"), {u.name for u in config.upstreams})
            for i, item in enumerate(policies)))
    _validate(config)
    return config


def _admin_token_file(root: _Section, overrides: Overrides) -> Path | None:
    if overrides.admin_token_file is not None:
        return Path(overrides.admin_token_file)
    section = _Section(root.data.get("admin") or {}, "admin")
    section.check_keys({"token_file"})
    path = section.get("token_file", str)
    return Path(path) if path else None


MIN_ADMIN_TOKEN = 16


def read_admin_token(path: Path) -> str:
    """The admin token in `path`: one line of at least MIN_ADMIN_TOKEN characters."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"admin.token_file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < MIN_ADMIN_TOKEN or any(c.isspace() for c in token):
        raise ConfigError(f"admin.token_file: {path} must hold one token of at least {MIN_ADMIN_TOKEN} characters "
                          "(e.g. from openssl rand -hex 32)")
    return token


def _signature_policy(section: _Section, upstreams: set[str]) -> SignaturePolicy:
    section.check_keys({"name", "keys", "upstreams", "repositories"})
    name = section.get("name", str)
    if not name:
        raise ConfigError(f"{section.at('name')}: a signature policy needs a name (errors name it)")
    keys = section.get("keys", list) or []
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ConfigError(f"{section.at('keys')}: expected a list of paths to PEM public keys")
    for i, key in enumerate(keys):
        try:
            Keyring.load([Path(key)])
        except ValueError as exc:
            raise ConfigError(f"{section.at('keys')}[{i}]: {exc}") from None
    covered = section.get("upstreams", list, ["*"])
    for i, upstream in enumerate(covered):
        if upstream != "*" and upstream not in upstreams:
            raise ConfigError(f"{section.at('upstreams')}[{i}]: {upstream!r} is not a configured upstream")
    patterns = section.get("repositories", list, ["*"])
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{section.at('repositories')}: expected a list of repository patterns such as team/*")
    return SignaturePolicy(name, tuple(Path(k) for k in keys), tuple(covered), tuple(patterns))


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_storage(value: str, origin: str) -> S3Location | None:
    """`s3://bucket/prefix`; an empty value keeps the local disk."""
    if not value.strip():
        return None
    scheme, _, rest = value.strip().partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not _BUCKET_RE.fullmatch(bucket):
        raise ConfigError(f"{origin}: expected s3://BUCKET/PREFIX (a bucket name of 3 to 63 lower-case letters, "
                          f"digits, dots and dashes), got {value!r}")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ConfigError(f"{origin}: the prefix {prefix!r} has an empty, '.' or '..' part")
    return S3Location(bucket, prefix)


def _redis_url(value: str, origin: str) -> str | None:
    if not value.strip():
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        # Said without the value: it may hold a password.
        raise ConfigError(f"{origin}: expected a redis://, rediss:// or unix:// URL")
    return value


def _advertise(value: str, origin: str) -> str:
    if not value.startswith(("http://", "https://")) or not urlsplit(value).hostname:
        raise ConfigError(f"{origin}: expected the URL other replicas reach this one at, e.g. "
                          f"http://10.0.0.7:5000, got {value!r}")
    return value.rstrip("/")


def _s3(root: _Section) -> S3Config:
    if (data := root.data.get("s3")) is None:
        return S3Config()
    section = _Section(data, "s3")
    section.check_keys({"endpoint", "region", "access_key_id", "secret_access_key", "presign", "presign_ttl"})
    endpoint: str | None = section.get("endpoint", str)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"s3.endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    config = S3Config(endpoint=endpoint, region=section.get("region", str),
                      access_key_id=section.get("access_key_id", str),
                      secret_access_key=section.get("secret_access_key", str),
                      presign=section.get("presign", bool, False),
                      presign_ttl=parse_duration(section.data.get("presign_ttl", 300.0), section.at("presign_ttl")))
    if not 1 <= config.presign_ttl <= 7 * 24 * 3600:
        raise ConfigError("s3.presign_ttl: must be between 1s and 7 days (S3's limit for presigned URLs)")
    if (config.access_key_id is None) != (config.secret_access_key is None):
        raise ConfigError("s3: access_key_id and secret_access_key go together")
    return config


# Keys whose values are never repeated in an error message.
_SECRET_KEYS = frozenset({"password", "client_secret", "secret", "token", "secret_access_key"})
_GLOB_RE = re.compile(r"[*?\[]")
_WHO_RE = re.compile(r"(?:user|group):[^\s:]+|anonymous|authenticated|\*")


def _auth(root: _Section, overrides: Overrides) -> AuthConfig:
    auth = AuthConfig()
    if (data := root.data.get("auth")) is not None:
        section = _Section(data, "auth")
        section.check_keys({"htpasswd", "token", "groups", "access"})
        htpasswd = section.get("htpasswd", str)
        if htpasswd == "":
            raise ConfigError("auth.htpasswd: empty; give a file, or leave the key out for no accounts")
        auth = replace(auth, htpasswd=Path(htpasswd) if htpasswd else None)
        if (token_data := section.data.get("token")) is not None:
            token = _Section(token_data, section.at("token"))
            token.check_keys({"lifetime", "key_file", "realm"})
            key_file = token.get("key_file", str)
            auth = replace(auth, token_lifetime=parse_duration(token.data.get("lifetime", auth.token_lifetime),
                                                               token.at("lifetime")),
                           token_key_file=Path(key_file) if key_file else None, realm=token.get("realm", str))
            if auth.token_lifetime <= 0:
                raise ConfigError(f"{token.at('lifetime')}: must be positive")
        groups = _Section(section.data.get("groups") or {}, section.at("groups"))
        members = []
        for group, users in groups.data.items():
            if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
                raise ConfigError(f"{groups.at(str(group))}: expected a list of user names")
            members.append((str(group), tuple(users)))
        auth = replace(auth, groups=tuple(members))
        rules = section.get("access", list, [])
        auth = replace(auth, rules=tuple(_rule(_Section(r, f"{section.at('access')}[{i}]"))
                                         for i, r in enumerate(rules)))
    if overrides.htpasswd is not None:
        auth = replace(auth, htpasswd=Path(overrides.htpasswd))
    return auth


def _rule(section: _Section) -> AccessRule:
    section.check_keys({"who", "allow", "deny", "permissions"})
    who = section.get("who", list)
    if not who or not all(isinstance(w, str) and _WHO_RE.fullmatch(w) for w in who):
        raise ConfigError(f"{section.at('who')}: expected a list of user:NAME, group:NAME, anonymous, "
                          f"authenticated or *")
    if ("allow" in section.data) == ("deny" in section.data):
        raise ConfigError(f"{section.path}: give exactly one of allow or deny")
    key = "allow" if "allow" in section.data else "deny"
    patterns = section.get(key, list)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{section.at(key)}: expected a list of UPSTREAM/REPOSITORY patterns such as ghcr.io/acme/*")
    permissions = section.get("permissions", list, ["pull"] if key == "allow" else list(PERMISSIONS))
    if not permissions or not all(p in PERMISSIONS for p in permissions):
        raise ConfigError(f"{section.at('permissions')}: expected a list of {' and '.join(PERMISSIONS)}")
    return AccessRule(tuple(who), key == "allow", tuple(patterns), frozenset(permissions))


def _tls(root: _Section, overrides: Overrides) -> TlsConfig | None:
    data = root.data.get("tls") or {}
    section = _Section(data, "tls")
    section.check_keys({"cert", "key", "client_ca", "client_certs"})
    cert = overrides.tls_cert or section.get("cert", str)
    key = overrides.tls_key or section.get("key", str)
    if cert is None and key is None:
        if data:
            raise ConfigError("tls: give cert and key")
        return None
    if cert is None or key is None:
        raise ConfigError("tls: give both cert and key (--tls-cert and --tls-key)")
    client_certs = section.get("client_certs", str, "optional")
    if client_certs not in ("optional", "required"):
        raise ConfigError(f"tls.client_certs: expected optional or required, got {client_certs!r}")
    client_ca = section.get("client_ca", str)
    if client_certs == "required" and client_ca is None:
        raise ConfigError("tls.client_certs: required needs tls.client_ca")
    return TlsConfig(Path(cert), Path(key), Path(client_ca) if client_ca else None, client_certs)


def _check_rules(config: Config) -> None:
    """A pattern that can never match makes its rule silently inert: a deny that denies nothing."""
    upstreams = {u.name: u for u in config.upstreams}
    for i, rule in enumerate(config.auth.rules):
        where = f"auth.access[{i}].{'allow' if rule.allow else 'deny'}"
        for pattern in rule.repositories:
            head, _, rest = pattern.partition("/")
            if pattern != pattern.lower():
                raise ConfigError(f"{where}: {pattern!r} has upper case; repository names never do")
            if not _GLOB_RE.search(head) and head not in upstreams:
                raise ConfigError(f"{where}: {pattern!r} names no configured upstream (expected UPSTREAM/REPOSITORY "
                                  f"with one of {', '.join(upstreams)}, or a pattern)")
            upstream = upstreams.get(head)
            if upstream is not None and upstream.library_prefix and rest and "/" not in rest \
                    and not _GLOB_RE.search(rest):
                raise ConfigError(f"{where}: {pattern!r} never matches: on {head}, {rest} is "
                                  f"{head}/library/{rest}")


def check_private(path: Path, what: str) -> None:
    """A file holding secrets must not be readable by everyone: refused when we run as root (who
    can fix it), warned about otherwise (a mounted file may not be ours to change)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    if mode & stat.S_IROTH:
        message = f"{what}: {path} is readable by every user; chmod o-r {path}"
        if os.geteuid() == 0:
            raise ConfigError(message)
        logging.getLogger(__name__).warning("%s", message)


def _durations(section: _Section, defaults: object, keys: Sequence[str]) -> dict[str, float]:
    """The section's duration `keys`, each defaulting to its dataclass default (on `defaults`)."""
    return {key: parse_duration(section.data.get(key, getattr(defaults, key)), section.at(key)) for key in keys}


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
    if config.redis is not None and config.storage is None:
        raise ConfigError("redis: replicas share their blobs through object storage: set storage "
                          "(s3://BUCKET/PREFIX) too")
    private = [(config.auth.htpasswd, "auth.htpasswd"), (config.auth.token_key_file, "auth.token.key_file"),
               (config.tls.key if config.tls else None, "tls.key"), (config.admin_token_file, "admin.token_file")]
    if config.admin_token_file is not None:
        read_admin_token(config.admin_token_file)
    for i, upstream in enumerate(config.upstreams):
        credentials = upstream.credentials
        if isinstance(credentials, DockerConfigCredentials):
            private.append((credentials.path, f"upstreams[{i}].credentials.docker_config"))
        elif isinstance(credentials, GcrCredentials):
            private.append((credentials.key_file, f"upstreams[{i}].credentials.gcr.key_file"))
    for path, what in private:
        if path is not None:
            check_private(path, what)
    _check_rules(config)
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {config.log_format!r}")
    if config.metrics_listen == (config.host, config.port) and config.port != 0:
        raise ConfigError("metrics_listen: must differ from listen")
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {config.log_level!r}")
