"""Configuration: the example file, precedence, and errors that name the key path."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from mirror.breaker import BreakerConfig
from mirror.config import (
    DOCKER_HUB_URL,
    AccessRule,
    Config,
    ConnectionLimits,
    EvictionConfig,
    Overrides,
    S3Config,
    S3Location,
    SignaturePolicy,
    TlsConfig,
    load,
)
from mirror.errors import ConfigError
from tests.support.cosign import make_key, public_pem

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_example_config_loads_with_every_documented_key() -> None:
    config = load(ROOT / "config.example.yaml", environ={})
    assert (config.host, config.port, config.default_upstream, config.path_prefix) == (
        "0.0.0.0", 5000, "docker.io", "/registry")
    hub, ghcr = config.upstreams
    assert (hub.name, hub.url, hub.aliases, hub.tag_ttl, hub.library_prefix) == (
        "docker.io", DOCKER_HUB_URL, ("hub",), 300.0, True)
    assert (ghcr.name, ghcr.tag_ttl, ghcr.library_prefix) == ("ghcr.io", 600.0, False)
    assert (hub.stale_while_revalidate, hub.negative_ttl, hub.on_refusal) == (True, 30.0, "stale")
    assert hub.breaker == BreakerConfig(failures=2, backoff=1.0, max_backoff=300.0, refusal_backoff=30.0)
    assert (config.timeouts.connect, config.timeouts.read, config.timeouts.revalidate) == (10.0, 60.0, 5.0)
    assert config.eviction == EvictionConfig(max_size=50 * 1024**3, high_watermark=0.9, low_watermark=0.8)
    assert (config.log_format, config.metrics_listen, config.shutdown_grace) == ("text", ("0.0.0.0", 9090), 30.0)
    assert config.connections == ConnectionLimits(header_timeout=30.0, keepalive_timeout=75.0, max_connections=4096)


def test_example_auth_and_tls_block_loads_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config.example.yaml").read_text()
    start, end = text.index("#AUTH-BEGIN\n") + len("#AUTH-BEGIN\n"), text.index("#AUTH-END")
    block = "\n".join(line.removeprefix("#") for line in text[start:end].splitlines())
    uncommented = text[:start] + block + "\n" + text[end:]  # in place, beside the example's upstreams
    for name in ("htpasswd", "token.key", "tls/tls.crt", "tls/tls.key", "tls/ca.crt"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("x" * 40)
        path.chmod(0o600)
        uncommented = uncommented.replace(f"/etc/mirror/{name}", str(path))
    config = load(write(tmp_path, uncommented), environ={})
    assert config.auth.htpasswd == tmp_path / "htpasswd" and config.auth.token_lifetime == 300
    assert config.auth.groups == (("ci", ("builder", "deployer")), ("admin", ("alice",)))
    assert config.auth.rules[0] == AccessRule(("group:admin",), True, ("*",), frozenset({"pull", "admin"}))
    # A deny denies everything unless it says otherwise.
    assert config.auth.rules[1] == AccessRule(("user:deployer",), False, ("ghcr.io/acme/secret-*",),
                                              frozenset({"pull", "admin"}))
    assert config.auth.rules[2] == AccessRule(("group:ci",), True, ("ghcr.io/acme/*", "docker.io/*"))
    assert config.tls == TlsConfig(tmp_path / "tls/tls.crt", tmp_path / "tls/tls.key", tmp_path / "tls/ca.crt",
                                   "optional")


def test_example_cluster_block_loads_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config.example.yaml").read_text()
    start, end = text.index("#CLUSTER-BEGIN\n") + len("#CLUSTER-BEGIN\n"), text.index("#CLUSTER-END")
    # Prose is "# Text"; settings are "#key: ..." and "#  key: ..." (indented).
    block = "\n".join(line if re.match(r"# \S", line) else line.removeprefix("#")
                      for line in text[start:end].splitlines())
    config = load(write(tmp_path, text[:start] + block + "\n" + text[end:]), environ={})
    assert config.storage == S3Location("image-cache", "mirror")
    assert config.s3 == S3Config("http://seaweedfs:8333", "us-east-1", "mirror", "change-me")
    assert (config.redis, config.advertise) == ("redis://redis:6379/0", "http://10.0.0.7:5000")


def test_example_signature_policy_loads_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config.example.yaml").read_text()
    start, end = text.index("#SIGNATURES-BEGIN\n") + len("#SIGNATURES-BEGIN\n"), text.index("#SIGNATURES-END")
    block = "\n".join(line.removeprefix("#") for line in text[start:end].splitlines())
    key = tmp_path / "release.pub"
    key.write_bytes(public_pem(make_key()))
    config = load(write(tmp_path, text[:start] + block.replace("/etc/mirror/keys/release.pub", str(key)) + "\n"
                        + text[end:]), environ={})
    assert config.signature_policies == (SignaturePolicy("release-signed", (key,), ("ghcr.io",), ("acme/*",)),)


@pytest.mark.parametrize(("policy", "message"), [
    ({"keys": ["KEY"]}, "signature_policies[0].name: a signature policy needs a name"),
    ({"name": "p"}, "signature_policies[0].keys: expected a list of paths"),
    ({"name": "p", "keys": ["/nonexistent/key.pub"]}, "signature_policies[0].keys[0]:"),
    ({"name": "p", "keys": ["NOTAKEY"]}, "signature_policies[0].keys[0]:"),
    ({"name": "p", "keys": ["KEY"], "upstreams": ["quay.io"]}, "'quay.io' is not a configured upstream"),
    ({"name": "p", "keys": ["KEY"], "repositories": []}, "expected a list of repository patterns"),
    ({"name": "p", "keys": ["KEY"], "typo": 1}, "signature_policies[0].typo: unknown key"),
])
def test_bad_signature_policies_are_refused_naming_the_key(tmp_path: Path, policy: dict[str, object],
                                                           message: str) -> None:
    (tmp_path / "key.pub").write_bytes(public_pem(make_key()))
    (tmp_path / "not.pub").write_text("not a key")
    text = yaml.safe_dump({"signature_policies": [policy]})
    text = text.replace("NOTAKEY", str(tmp_path / "not.pub")).replace("KEY", str(tmp_path / "key.pub"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(write(tmp_path, text), environ={})


@pytest.mark.parametrize(("settings", "message"), [
    ({"storage": "gs://bucket/x"}, "expected s3://BUCKET/PREFIX"),
    ({"storage": "s3://Bucket_Name"}, "expected s3://BUCKET/PREFIX"),
    ({"storage": "s3://bucket/a/../b"}, "has an empty, '.' or '..' part"),
    ({"redis": "redis://r:6379/0"}, "set storage"),
    ({"storage": "s3://bucket", "redis": "http://user:hunter2@r"}, "expected a redis://"),
    ({"storage": "s3://bucket", "s3": {"endpoint": "seaweedfs:8333"}}, "s3.endpoint: expected an http"),
    ({"storage": "s3://bucket", "s3": {"access_key_id": "a"}}, "go together"),
    ({"advertise": "10.0.0.7:5000"}, "expected the URL other replicas reach"),
    ({"storage": "s3://bucket", "s3": {"presign": True, "presign_ttl": "30d"}}, "s3.presign_ttl: must be between"),
])
def test_bad_cluster_settings_are_refused_naming_the_key(tmp_path: Path, settings: dict[str, object],
                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        load(write(tmp_path, yaml.safe_dump(settings)), environ={})
    assert "hunter2" not in str(refused.value)


def test_cluster_settings_come_from_the_environment_and_flags(tmp_path: Path) -> None:
    config = load(None, environ={"MIRROR_STORAGE": "s3://env-bucket/p", "MIRROR_REDIS": "redis://env:6379/1"},
                  overrides=Overrides(storage="s3://flag-bucket", advertise="http://10.1.2.3:5000"))
    assert config.storage == S3Location("flag-bucket", "")
    assert (config.redis, config.advertise) == ("redis://env:6379/1", "http://10.1.2.3:5000")


def test_quick_start_flags_for_auth_and_tls(tmp_path: Path) -> None:
    for name in ("htpasswd", "key.pem", "cert.pem"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    config = load(None, environ={}, overrides=Overrides(htpasswd=str(tmp_path / "htpasswd"),
                                                        tls_cert=str(tmp_path / "cert.pem"),
                                                        tls_key=str(tmp_path / "key.pem")))
    assert config.auth.enabled and config.auth.htpasswd == tmp_path / "htpasswd"
    assert config.tls == TlsConfig(tmp_path / "cert.pem", tmp_path / "key.pem")


@pytest.mark.parametrize(("value", "size"), [("50GiB", 50 * 1024**3), ("500MB", 500 * 1000**2), ("2t", 2 * 1000**4),
                                             ("1.5KiB", 1536), (4096, 4096)])
def test_sizes(tmp_path: Path, value: object, size: int) -> None:
    assert load(write(tmp_path, f"max_size: {value}"), environ={}).eviction.max_size == size
    assert load(None, environ={"MIRROR_MAX_SIZE": "1GiB"}, overrides=Overrides(max_size=str(value))
                ).eviction.max_size == size


def test_defaults_mean_docker_hub() -> None:
    config = load(None, environ={})
    assert config == Config()
    assert [(u.name, u.url) for u in config.upstreams] == [("docker.io", DOCKER_HUB_URL)]


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:6000\ncache_dir: /from/file\n")
    env = {"MIRROR_LISTEN": "127.0.0.1:7000", "MIRROR_CACHE_DIR": "/from/env"}
    config = load(path, environ=env)
    assert (config.port, str(config.cache_dir)) == (7000, "/from/env")
    config = load(path, environ=env, overrides=Overrides(listen="[::1]:8000"))
    assert (config.host, config.port, str(config.cache_dir)) == ("::1", 8000, "/from/env")


@pytest.mark.parametrize(("value", "prefix"), [("/registry", "/registry"), ("/a/b.c/", "/a/b.c"), ("/", "")])
def test_path_prefix(tmp_path: Path, value: str, prefix: str) -> None:
    assert load(write(tmp_path, f"path_prefix: {value}"), environ={}).path_prefix == prefix
    assert load(None, environ={"MIRROR_PATH_PREFIX": "/env"}, overrides=Overrides(path_prefix=value)
                ).path_prefix == prefix


def test_upstream_flags_replace_by_name_or_add() -> None:
    config = load(None, environ={"MIRROR_UPSTREAMS": "quay.io=http://127.0.0.1:5003"},
                  overrides=Overrides(upstreams=("docker.io=http://127.0.0.1:5001", "http://127.0.0.1:5002")))
    assert [(u.name, u.url, u.library_prefix) for u in config.upstreams] == [
        ("docker.io", "http://127.0.0.1:5001", True),
        ("quay.io", "http://127.0.0.1:5003", False),
        ("127.0.0.1:5002", "http://127.0.0.1:5002", False),
    ]


def test_credentials_from_inline_file_and_environment(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    secret.chmod(0o640)  # a world-readable password file is refused (see test_auth)
    path = write(tmp_path, f"""
upstreams:
  - {{name: a.example, url: "http://127.0.0.1:1", credentials: {{username: u, password: inline}}}}
  - {{name: b.example, url: "http://127.0.0.1:2", credentials: {{username: u, password_file: {secret}}}}}
  - {{name: c.example, url: "http://127.0.0.1:3", credentials: {{username: u, password_env: TOKEN}}}}
default_upstream: a.example
""")
    config = load(path, environ={"TOKEN": "from-env"})
    assert [u.password for u in config.upstreams] == ["inline", "from-file", "from-env"]
    assert "inline" not in repr(config), "passwords stay out of reprs and so out of logs"


@pytest.mark.parametrize(("text", "message"), [
    ("listen: nonsense", "listen: expected HOST:PORT"),
    ("lisen: 1.2.3.4:5", "lisen: unknown key"),
    ("upstreams:\n  - {name: docker.io, url: ftp://x}", "upstreams[0].url: expected [NAME=]URL"),
    ("upstreams:\n  - {name: docker.io, url: 'http://x', tag_ttl: soon}", "upstreams[0].tag_ttl: expected a duration"),
    ("upstreams:\n  - {name: docker.io, url: 'http://x', colour: red}", "upstreams[0].colour: unknown key"),
    ("upstreams:\n  - {name: docker.io, url: 'http://x', aliases: [a.b]}", "upstreams[0].aliases[0]"),
    ("upstreams:\n  - {name: docker.io, url: 'http://x', credentials: {username: u}}",
     "upstreams[0].credentials: give both"),
    ("upstreams:\n  - {name: docker.io, url: 'http://x', credentials: {username: u, password_env: NOPE}}",
     "upstreams[0].credentials.password_env: environment variable NOPE is not set"),
    ("upstreams:\n  - {name: Docker.IO, url: 'http://x'}", "upstreams[0].name"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', on_refusal: ignore}",
     "upstreams[0].on_refusal: expected one of stale, deny"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', negative_ttl: -1}", "upstreams[0].negative_ttl: must not be"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', stale_while_revalidate: maybe}",
     "upstreams[0].stale_while_revalidate: expected bool"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', breaker: {failures: 0}}", "upstreams[0].breaker.failures: must be"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', breaker: {backoff: 0s}}", "upstreams[0].breaker.backoff: must be"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', breaker: {backoff: 5m, max_backoff: 1s}}",
     "upstreams[0].breaker.max_backoff: must not be below"),
    ("upstreams:\n  - {name: a.io, url: 'http://x', breaker: {trip: 3}}", "upstreams[0].breaker.trip: unknown key"),
    ("upstreams:\n  - {name: a.io, url: 'http://x'}\n  - {name: a.io, url: 'http://y'}", "upstreams[1]: 'a.io'"),
    ("default_upstream: ghcr.io", "default_upstream: 'ghcr.io' is not a configured upstream"),
    ("upstream_timeouts: {read: -1}", "upstream_timeouts.read: must not be negative"),
    ("- a list", "config: expected a mapping"),
    ("max_size: lots", "max_size: expected a size"),
    ("max_size: 0", "max_size: expected a size"),
    ("eviction: {high_watermark: 1.5}", "eviction.high_watermark: expected a fraction"),
    ("eviction: {high_watermark: 0.5, low_watermark: 0.6}", "eviction.low_watermark: must not be above"),
    ("eviction: {size: 1}", "eviction.size: unknown key"),
    ("log_format: xml", "log_format: expected text or json"),
    ("upstreams:\n  - {name: a.io, url: 'https://bot:s3cret@a.io'}", "upstreams[0].url: put credentials under"),
    ("upstreams:\n  - {name: a.io, url: 'https://a.io', credentials: {username: u, password: 8473625190}}",
     "upstreams[0].credentials.password: expected str, got a value (not shown: it is a secret)"),
    ("upstreams:\n  - {name: a.io, url: 'https://a.io', credentials: {username: u, password: 'hunter2'\n",
     "config: "),
    ("auth: {htpasswd: ''}", "auth.htpasswd: empty"),
    ("auth: {access: [{who: ['*'], deny: [docker.io/evil]}]}",
     "auth.access[0].deny: 'docker.io/evil' never matches: on docker.io, evil is docker.io/library/evil"),
    ("auth: {access: [{who: ['*'], deny: [hub/library/evil]}]}", "auth.access[0].deny: 'hub/library/evil' names no"),
    ("auth: {access: [{who: ['*'], allow: [docker.io/Library/*]}]}", "auth.access[0].allow: 'docker.io/Library/*' has"),
    ("connections: {max: 0}", "connections.max: must be at least 1"),
    ("connections: {header_timeout: slow}", "connections.header_timeout: expected a duration"),
    ("connections: {idle: 1}", "connections.idle: unknown key"),
    ("connections: {header_timeout: 0}", "connections.header_timeout: must be positive"),
    ("shutdown_grace: soon", "shutdown_grace: expected a duration"),
    ("metrics_listen: 9090", "metrics_listen: expected HOST:PORT"),
    ("listen: '127.0.0.1:5000'\nmetrics_listen: '127.0.0.1:5000'", "metrics_listen: must differ from listen"),
    ("auth: {access: [{who: [nobody], allow: ['*']}]}", "auth.access[0].who: expected a list of user:NAME"),
    ("auth: {access: [{who: ['*'], allow: ['*'], deny: ['x']}]}", "auth.access[0]: give exactly one of allow or deny"),
    ("auth: {access: [{who: ['*'], allow: []}]}", "auth.access[0].allow: expected a list of UPSTREAM/REPOSITORY"),
    ("auth: {groups: {ci: alice}}", "auth.groups.ci: expected a list of user names"),
    ("auth: {token: {lifetime: 0}}", "auth.token.lifetime: must be positive"),
    ("auth: {htpasswd: /nonexistent/htpasswd}", "auth.htpasswd: cannot read /nonexistent/htpasswd"),
    ("auth: {users: 1}", "auth.users: unknown key"),
    ("tls: {cert: /a.pem}", "tls: give both cert and key"),
    ("tls: {client_certs: sometimes}", "tls: give cert and key"),
    ("path_prefix: registry", "path_prefix: expected a path"),
    ("path_prefix: /a/../b", "path_prefix: expected a path"),
    ("path_prefix: /mirror/v2", "path_prefix: expected a path"),
    ("path_prefix: '/a b'", "path_prefix: expected a path"),
    ("upstreams:\n  - {name: docker.io, url: 'http://x', aliases: [v2]}", "upstreams[0]: 'v2' cannot name"),
])
def test_bad_config_names_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), environ={})
    assert str(caught.value).startswith(message)
    assert "hunter2" not in str(caught.value) and "8473625190" not in str(caught.value), "a secret in an error"


def test_offline_from_the_file_the_environment_or_the_flag(tmp_path: Path) -> None:
    two = "upstreams:\n  - {name: a.io, url: 'http://127.0.0.1:1', offline: true}\n  - {name: b.io, url: 'http://127.0.0.1:2'}"
    config = load(write(tmp_path, two + "\ndefault_upstream: a.io"), environ={})
    assert [(u.name, u.offline, u.tag_ttl, u.negative_ttl) for u in config.upstreams] == [
        ("a.io", True, math.inf, 0.0), ("b.io", False, 300.0, 30.0)]
    for environ, overrides in (({"MIRROR_OFFLINE": "1"}, Overrides()), ({}, Overrides(offline=True))):
        assert all(u.offline and u.tag_ttl == math.inf for u in load(None, environ=environ,
                                                                       overrides=overrides).upstreams)
    assert all(u.offline for u in load(write(tmp_path, "offline: true"), environ={}).upstreams)
