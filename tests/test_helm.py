"""The Helm chart (helm/mirror), rendered as `helm template` would by a small Go renderer built from
Debian's Go packages (tests/support/helm_render), every object checked against Kubernetes' own
schemas, and what an operator would notice: the config the mirror loads, where passwords, accounts,
token keys and TLS keys live, probes, pod security, cache sizes, the Grafana dashboard and the node
configuration in NOTES.txt."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import trustme
import yaml
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

from mirror.auth import Htpasswd, Identity, Tokens
from mirror.config import AccessRule, Config, ConnectionLimits, S3Location, check_private, load
from mirror.tls import server_context
from tests.conftest import unavailable
from tests.support.clients import system_path
from tests.support.snippets import snippet

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "mirror"
RENDERER = Path(__file__).resolve().parent / "support" / "helm_render"
FULL_VALUES = Path(__file__).resolve().parent / "support" / "helm-values-full.yaml"

# Debian's Go toolchain and the Go libraries the renderer is built from, in GOPATH mode.
GO_PACKAGES = ("golang-go", "golang-github-masterminds-sprig-dev", "golang-k8s-sigs-yaml-dev")
GOCODE = Path("/usr/share/gocode")
GO_LIBRARIES = (GOCODE / "src/github.com/Masterminds/sprig", GOCODE / "src/sigs.k8s.io/yaml")

RELEASE, NAMESPACE = "mirror", "registry"
SERVICE_HOST = f"{RELEASE}.{NAMESPACE}.svc.cluster.local:5000"
GIB = 1024**3
# The accounts in the full values' htpasswd content.
ACCOUNTS = {"alice": "alice-pw", "builder": "builder-pw"}

# Cluster mode on the default values: three replicas sharing a SeaweedFS bucket, with the S3 keys
# and the Redis URL (which holds a password) given inline, for the chart's own Secret.
CLUSTER_STORAGE = "s3://mirror-cache/k8s"
CLUSTER_REDIS = "redis://:redis-pw@redis-master.redis.svc:6379/0"
CLUSTER: dict[str, Any] = {
    "replicaCount": 3,
    "config": {"max_size": "500GiB"},
    "cluster": {"enabled": True, "storage": CLUSTER_STORAGE,
                "s3": {"endpoint": "http://seaweedfs-s3.storage:8333", "region": "us-east-1",
                       "accessKeyId": "mirror-access", "secretAccessKey": "mirror-s3-secret"},
                "redis": {"url": CLUSTER_REDIS}},
}
# Cluster mode over the full values, every credential from Secrets of your own.
CLUSTER_EXISTING: dict[str, Any] = {
    "cluster": {"enabled": True, "storage": "s3://mirror-cache",
                "s3": {"existingSecret": "mirror-s3", "accessKeyIdKey": "access-key",
                       "secretAccessKeyKey": "secret-key"},
                "redis": {"existingSecret": "mirror-redis", "secretKey": "redis-url"}},
}
# The pod's IP and name, as the kubelet would give them through the downward API.
POD_IP, POD_NAME = "10.244.1.7", f"{RELEASE}-6d9f7c5b8-x2k8q"

# What Secrets the chart does not create hold, by (Secret, key); any other: FROM_EXISTING.
ExistingSecrets = Mapping[tuple[str, str], str]
FROM_EXISTING = "from-existing-secret"

# Every metric the mirror exports; the dashboard may use no other.
METRICS = {
    "mirror_http_requests_total", "mirror_http_request_duration_seconds", "mirror_cache_requests_total",
    "mirror_served_bytes_total", "mirror_upstream_requests_total", "mirror_upstream_request_duration_seconds",
    "mirror_upstream_bytes_total", "mirror_coalesced_requests_total", "mirror_downloads_in_flight",
    "mirror_cache_size_bytes", "mirror_cache_blobs", "mirror_cache_max_size_bytes", "mirror_evictions_total",
    "mirror_evicted_bytes_total", "mirror_upstream_rate_limited_total", "mirror_upstream_ratelimit_remaining",
    "mirror_upstream_ratelimit_limit", "mirror_build_info", "process_resident_memory_bytes",
    "process_virtual_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    "process_start_time_seconds",
}

# What the Prometheus Operator's ServiceMonitor CRD accepts where the chart writes (kubernetes-validate
# has no schema for CRDs).
SERVICE_MONITOR_SPEC = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels",
                        "sampleLimit", "targetLimit"}
SERVICE_MONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                            "honorTimestamps", "relabelings", "metricRelabelings", "params", "tlsConfig",
                            "bearerTokenSecret", "basicAuth", "followRedirects", "enableHttp2", "proxyUrl"}


def kubernetes_versions() -> tuple[str, ...]:
    """An older Kubernetes many clusters still run, and the newest the validator knows."""
    return "1.29", ".".join(str(latest_version()).split(".")[:2])


def go_toolchain() -> str:
    """The go binary, with Debian's sprig and sigs.k8s.io/yaml sources; installed from apt if we are root."""
    def present() -> str | None:
        go = shutil.which("go", path=system_path())
        return go if go and all(library.is_dir() for library in GO_LIBRARIES) else None

    if present() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", *GO_PACKAGES], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    if (go := present()) is None:
        unavailable(f"the Go toolchain and libraries to build the chart renderer are missing (apt packages "
                    f"{' '.join(GO_PACKAGES)})")
    return go


@dataclass(frozen=True)
class Renderer:
    binary: Path

    def run(self, *values: Path, notes: bool = False) -> subprocess.CompletedProcess[str]:
        args = [str(self.binary), "-name", RELEASE, "-namespace", NAMESPACE]
        args += [f"-f={path}" for path in values] + (["-notes"] if notes else []) + [str(CHART)]
        return subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)

    def manifests(self, *values: Path) -> list[dict[str, Any]]:
        result = self.run(*values)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]

    def notes(self, *values: Path) -> str:
        result = self.run(*values, notes=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def error(self, *values: Path) -> str:
        result = self.run(*values)
        assert result.returncode != 0, "the chart rendered values it should have refused"
        return result.stderr


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    """The renderer, built once per session. It must sit inside a GOPATH, beside its go.mod, for
    GOPATH mode to find Debian's sprig (imported as .../sprig/v3, installed without the /v3)."""
    go = go_toolchain()
    gopath = tmp_path_factory.mktemp("helm_render")
    shutil.copytree(RENDERER, gopath / "src" / "helm_render")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}{os.pathsep}{GOCODE}", "GOFLAGS": "",
           "GOCACHE": str(gopath / "cache")}
    build = subprocess.run([go, "build", "-o", str(gopath / "helm_render"), "."], cwd=gopath / "src" / "helm_render",
                           env=env, capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"the chart renderer does not build:\n{build.stderr}"
    return Renderer(gopath / "helm_render")


@pytest.fixture(scope="module")
def default(helm: Renderer) -> list[dict[str, Any]]:
    return helm.manifests()


@pytest.fixture(scope="module")
def full(helm: Renderer) -> list[dict[str, Any]]:
    return helm.manifests(FULL_VALUES)


@pytest.fixture(scope="module")
def cluster(helm: Renderer, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = tmp_path_factory.mktemp("cluster") / "values.yaml"
    path.write_text(yaml.safe_dump(CLUSTER))
    return helm.manifests(path)


@pytest.fixture(scope="module")
def full_cluster(helm: Renderer, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = tmp_path_factory.mktemp("full_cluster") / "values.yaml"
    path.write_text(yaml.safe_dump(CLUSTER_EXISTING))
    return helm.manifests(FULL_VALUES, path)


ValuesFile = Callable[[dict[str, Any]], Path]


@pytest.fixture
def values(tmp_path: Path) -> ValuesFile:
    """Writes a values file: `values({"replicaCount": 2})`."""
    def write(data: dict[str, Any]) -> Path:
        path = tmp_path / f"values{len(list(tmp_path.glob('values*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The StatefulSet, or in cluster mode the Deployment: never both."""
    (found,) = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert isinstance(found, dict)
    return found


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = workload(docs)["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = pod_spec(docs)["containers"]
    assert isinstance(only, dict)
    return only


def config_text(docs: list[dict[str, Any]]) -> str:
    text: str = find(docs, "ConfigMap", RELEASE)["data"]["config.yaml"]
    return text


def quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)Gi", quantity)
    assert match, quantity
    return int(match[1]) * GIB


@dataclass(frozen=True)
class SecretFile:
    """A file of one of the pod's Secret volumes."""

    volume: str
    secret: str
    key: str
    path: str
    """Inside the volume."""
    mode: int
    """Its permission bits, as the pod sees them."""


def secret_files(docs: list[dict[str, Any]]) -> dict[str, SecretFile]:
    """Every file the pod's (projected) Secret volumes hold, by path inside the container."""
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    files: dict[str, SecretFile] = {}
    for volume in pod_spec(docs)["volumes"]:
        if "projected" not in volume:
            continue
        default_mode = volume["projected"].get("defaultMode", 0o644)
        for source in volume["projected"]["sources"]:
            for item in source["secret"]["items"]:
                path = f"{mounts[volume['name']]}/{item['path']}"
                assert path not in files, f"two Secret items project to {path}"
                files[path] = SecretFile(volume["name"], source["secret"]["name"], item["key"], item["path"],
                                         item.get("mode", default_mode))
    return files


def materialise_secrets(docs: list[dict[str, Any]], root: Path, existing: ExistingSecrets) -> dict[str, str]:
    """Writes the files the pod would see in its Secret volumes into `root/<volume>/`, owner-only,
    from the chart's Secrets or `existing`; returns what was written, by path inside the container."""
    own = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Secret"}
    written = {}
    for path, file in secret_files(docs).items():
        secret = own.get(file.secret)
        value = (base64.b64decode(secret["data"][file.key]).decode() if secret
                 else existing.get((file.secret, file.key), FROM_EXISTING))
        target = root / file.volume / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value)
        target.chmod(0o600)
        written[path] = value
    return written


def pod_environment(docs: list[dict[str, Any]], existing: ExistingSecrets | None = None) -> dict[str, str]:
    """The container's environment as the kubelet sets it: values with $(VAR) expanded from the
    variables defined before them, Secret keys from the chart's Secrets or `existing`, and the
    pod's IP and name."""
    own = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Secret"}
    fields = {"status.podIP": POD_IP, "metadata.name": POD_NAME}
    environment: dict[str, str] = {}
    for variable in container(docs)["env"]:
        if "value" in variable:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: environment.get(m[1], m[0]), variable["value"])
        elif "secretKeyRef" in variable["valueFrom"]:
            ref = variable["valueFrom"]["secretKeyRef"]
            secret = own.get(ref["name"])
            value = (base64.b64decode(secret["data"][ref["key"]]).decode() if secret
                     else (existing or {}).get((ref["name"], ref["key"]), FROM_EXISTING))
        else:
            value = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        assert variable["name"] not in environment, f"{variable['name']} is set twice"
        environment[variable["name"]] = value
    return environment


def load_rendered_config(docs: list[dict[str, Any]], tmp_path: Path, existing: ExistingSecrets | None = None,
                         environ: Mapping[str, str] | None = None) -> Config:
    """The mirror's own loader reading the ConfigMap's config.yaml, with the Secret files the pod
    would have in place of its Secret volumes' mounts (and `environ`, the pod's environment)."""
    secrets = tmp_path / "secrets"
    materialise_secrets(docs, secrets, existing or {})
    text = config_text(docs)
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    for volume in {file.volume for file in secret_files(docs).values()}:
        text = text.replace(f"{mounts[volume]}/", f"{secrets / volume}/")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load(path, environ=environ or {})


@pytest.fixture(scope="module")
def existing() -> ExistingSecrets:
    """What the full values' own Secrets hold: a certificate for the Service's ClusterIP from
    cert-manager (say), the CA of client certificates, a registry token."""
    ca, clients = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("10.96.0.50", f"{RELEASE}.{NAMESPACE}.svc.cluster.local")
    return {("mirror-tls", "tls.crt"): "".join(pem.bytes().decode() for pem in leaf.cert_chain_pems),
            ("mirror-tls", "tls.key"): leaf.private_key_pem.bytes().decode(),
            ("mirror-client-ca", "ca.pem"): clients.cert_pem.bytes().decode(),
            ("ghcr-token", "token"): FROM_EXISTING}


def check_service_monitor(monitor: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """A ServiceMonitor's fields by hand: its schema is a CRD the validator does not have."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC, set(spec) - SERVICE_MONITOR_SPEC
    assert spec["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT, set(endpoint) - SERVICE_MONITOR_ENDPOINT
        for duration in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint.get(duration, "1s")), endpoint
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [s for s in docs if s["kind"] == "Service"
                and spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 1, "the ServiceMonitor must select exactly one Service, or each pod is scraped twice"
    assert {p["name"] for p in selected[0]["spec"]["ports"]} >= {e["port"] for e in spec["endpoints"]}


@pytest.mark.parametrize("which", ["default", "full", "cluster", "full_cluster"])
def test_every_object_is_valid_kubernetes(which: str, request: pytest.FixtureRequest) -> None:
    docs: list[dict[str, Any]] = request.getfixturevalue(which)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Service", "Service", "ServiceAccount", "StatefulSet"]
    if which.startswith("full"):
        expected = sorted([*expected, "ConfigMap", "PodDisruptionBudget", "Secret", "Secret", "ServiceMonitor"])
    if which == "cluster":
        expected = sorted([*expected, "PodDisruptionBudget", "Secret"])
    if which.endswith("cluster"):
        expected = sorted(["Deployment" if kind == "StatefulSet" else kind for kind in expected])
    assert kinds == expected
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "mirror" and labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm" and labels["helm.sh/chart"] == "mirror-0.1.0"
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, docs)
            continue
        if doc["kind"] in ("StatefulSet", "Deployment"):
            for volume in doc["spec"]["template"]["spec"]["volumes"]:
                sources = [value for key, value in volume.items() if key != "name"]
                assert len(sources) == 1 and isinstance(sources[0], dict), f"volume {volume} needs one source"
        for version in kubernetes_versions():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {version}: "
                            f"{'.'.join(map(str, error.path))}: {error.message}")


@pytest.mark.parametrize("which", ["default", "full"])
def test_services_and_budget_select_the_pods(which: str, request: pytest.FixtureRequest) -> None:
    docs: list[dict[str, Any]] = request.getfixturevalue(which)
    statefulset = find(docs, "StatefulSet")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports == {"http": 5000, "metrics": 9090}
    services = {s["metadata"]["name"]: s["spec"] for s in docs if s["kind"] == "Service"}
    assert services[statefulset["spec"]["serviceName"]]["clusterIP"] == "None"
    for spec in services.values():
        assert spec["selector"].items() <= pod_labels.items()
        assert {(p["name"], p["targetPort"]) for p in spec["ports"]} == {("http", "http"), ("metrics", "metrics")}
    main = services[RELEASE]
    assert {p["name"]: p["port"] for p in main["ports"]} == {"http": 5000, "metrics": 9090}
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    if which == "full":
        (budget,) = budgets
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert (main["type"], main["clusterIP"]) == ("NodePort", "10.96.0.50")
        assert {p["name"]: p["nodePort"] for p in main["ports"]} == {"http": 30500, "metrics": 30590}
    else:
        assert budgets == [], "with one replica a budget only blocks node drains"


def test_a_budget_can_be_forced_for_one_replica(helm: Renderer, values: ValuesFile) -> None:
    docs = helm.manifests(values({"podDisruptionBudget": {"always": True}}))
    assert find(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_default_config_is_accepted_by_the_mirror(default: list[dict[str, Any]], tmp_path: Path) -> None:
    config = load_rendered_config(default, tmp_path)
    assert (config.host, config.port, config.metrics_listen) == ("0.0.0.0", 5000, ("0.0.0.0", 9090))
    assert str(config.cache_dir) == "/var/cache/mirror"
    assert (config.log_format, config.shutdown_grace, config.default_upstream) == ("json", 30.0, "docker.io")
    (hub,) = config.upstreams
    assert (hub.name, hub.url, hub.tag_ttl, hub.username, hub.password) == (
        "docker.io", "https://registry-1.docker.io", 300.0, None, None)
    assert not config.auth.enabled and config.tls is None, "by default the API is open plain HTTP"
    assert config.connections == ConnectionLimits(header_timeout=30.0, keepalive_timeout=75.0, max_connections=4096)
    assert not secret_files(default), "no Secret volumes without credentials, accounts or TLS"


def test_full_config_is_accepted_by_the_mirror_with_passwords_from_secret_files(
        full: list[dict[str, Any]], existing: ExistingSecrets, tmp_path: Path) -> None:
    config = load_rendered_config(full, tmp_path, existing)
    assert (config.log_level, config.log_format, config.shutdown_grace, config.path_prefix) == (
        "warning", "text", 90.0, "/registry")
    assert (config.eviction.high_watermark, config.eviction.low_watermark) == (0.85, 0.7)
    credentials = {u.name: (u.username, u.password) for u in config.upstreams}
    assert credentials == {"docker.io": ("platform-bot", "hub-s3cret: with spaces & 'quotes'"),
                           "ghcr.io": ("mirror-bot", "from-existing-secret"),
                           "127.0.0.1:5001": ("local", "local-pass")}
    assert config.upstream("ghcr.io").max_age == 30 * 86400
    assert config.upstream("docker.io").aliases == ("hub",)
    assert config.connections == ConnectionLimits(header_timeout=10.0, keepalive_timeout=120.0, max_connections=2000)


def test_full_accounts_tokens_and_tls_work_in_the_mirror(full: list[dict[str, Any]], existing: ExistingSecrets,
                                                         tmp_path: Path) -> None:
    """What the mirror does with the files the pod gets: accounts log in, every replica accepts
    the others' tokens, and the API serves the mounted certificate, asking for client ones."""
    config = load_rendered_config(full, tmp_path, existing)
    auth = config.auth
    assert auth.enabled and auth.htpasswd is not None and auth.token_key_file is not None
    assert (auth.token_lifetime, auth.realm) == (600.0, "https://mirror.infra.example.com:5000/token")
    assert dict(auth.groups) == {"admin": ("alice",), "ci": ("builder",)}
    assert auth.rules == (AccessRule(("group:admin",), True, ("*",)),
                          AccessRule(("group:ci",), True, ("ghcr.io/acme/*", "docker.io/*")),
                          AccessRule(("anonymous",), True, ("docker.io/library/*",)))

    accounts = Htpasswd(auth.htpasswd)
    for user, password in ACCOUNTS.items():
        assert asyncio.run(accounts.verify(user, password, "test")), f"{user} cannot log in with the chart's htpasswd"
    assert not asyncio.run(accounts.verify("alice", "builder-pw", "test"))

    # Each replica reads the key from the same mounted file at start.
    count = int(find(full, "StatefulSet")["spec"]["replicas"])
    replicas = [Tokens(auth.token_lifetime, auth.token_key_file) for _ in range(count)]
    token = replicas[0].issue(Identity("alice"), "mirror")
    assert [replica.user(token, "mirror") for replica in replicas] == ["alice"] * count, (
        "a client that logged in on one pod must be accepted by the others")

    assert config.tls is not None and config.tls.client_certs == "optional"
    assert server_context(config.tls).verify_mode == ssl.CERT_OPTIONAL


def test_secret_files_are_where_the_config_says_and_private(full: list[dict[str, Any]], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    files = yaml.safe_load(config_text(full))
    referenced = {files["auth"]["htpasswd"], files["auth"]["token"]["key_file"],
                  *(files["tls"][key] for key in ("cert", "key", "client_ca"))}
    mounted = secret_files(full)
    assert referenced == {"/etc/mirror/auth/htpasswd", "/etc/mirror/auth/token.key", "/etc/mirror/tls/tls.crt",
                          "/etc/mirror/tls/tls.key", "/etc/mirror/tls/ca.crt"}
    assert referenced <= set(mounted), f"the config names files the pod lacks: {referenced - set(mounted)}"
    assert {(mounted[path].secret, mounted[path].key) for path in referenced} == {
        (f"{RELEASE}-auth", "htpasswd"), (f"{RELEASE}-auth", "token.key"), ("mirror-tls", "tls.crt"),
        ("mirror-tls", "tls.key"), ("mirror-client-ca", "ca.pem")}
    mounts = {m["mountPath"]: m for m in container(full)["volumeMounts"]}
    for directory in ("/etc/mirror/auth", "/etc/mirror/tls", "/etc/mirror/secrets"):
        assert mounts[directory]["readOnly"] is True
        assert "subPath" not in mounts[directory], "a subPath mount never sees a renewed certificate or htpasswd"

    # The mirror's own check, on files carrying the modes the volumes give them: as root it refuses
    # a secret file every user can read, otherwise it warns.
    for path, file in mounted.items():
        assert file.mode & 0o007 == 0, f"{path} is {oct(file.mode)}: readable by every user of the node"
        assert file.mode & 0o040, f"{path} is {oct(file.mode)}: the mirror's group (fsGroup) cannot read it"
        probe = tmp_path / file.volume / file.path
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("secret")
        probe.chmod(file.mode)
        with caplog.at_level(logging.WARNING, logger="mirror.config"):
            check_private(probe, path)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_the_token_key_is_generated_once_for_every_replica(helm: Renderer, full: list[dict[str, Any]]) -> None:
    holders = [s for s in full if s["kind"] == "Secret" and "token.key" in s["data"]]
    assert [s["metadata"]["name"] for s in holders] == [f"{RELEASE}-auth"], "replicas must share one key"
    key = base64.b64decode(holders[0]["data"]["token.key"])
    assert len(key) >= 32 and key.isalnum()
    assert find(full, "StatefulSet")["spec"]["replicas"] == 3, "one pod template: every replica mounts that key"
    assert [f.secret for f in secret_files(full).values() if f.path == "token.key"] == [f"{RELEASE}-auth"]

    again = helm.manifests(FULL_VALUES)
    assert find(again, "Secret", f"{RELEASE}-auth")["data"]["token.key"] != holders[0]["data"]["token.key"], (
        "a fixed key in the chart would let anyone forge tokens")
    assert (find(again, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
            == find(full, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]), (
        "a new key must not roll the pods (and upgrades keep the key through lookup)")


def test_accounts_and_token_key_from_secrets_of_your_own(helm: Renderer, values: ValuesFile, tmp_path: Path) -> None:
    docs = helm.manifests(values({"auth": {"htpasswd": {"existingSecret": "mirror-users", "key": "users"},
                                           "token": {"keySecret": "mirror-token", "keySecretKey": "signing-key"}}}))
    assert [d for d in docs if d["kind"] == "Secret"] == [], "nothing for the chart to keep"
    assert {(f.secret, f.key): path for path, f in secret_files(docs).items()} == {
        ("mirror-users", "users"): "/etc/mirror/auth/htpasswd",
        ("mirror-token", "signing-key"): "/etc/mirror/auth/token.key"}
    htpasswd = yaml.safe_load(FULL_VALUES.read_text())["auth"]["htpasswd"]["content"]
    config = load_rendered_config(docs, tmp_path, {("mirror-users", "users"): htpasswd,
                                                   ("mirror-token", "signing-key"): "k" * 40})
    assert config.auth.enabled and config.auth.realm is None, "the realm defaults to the address clients use"
    assert config.auth.token_lifetime == 300.0 and config.auth.token_key_file is not None
    assert config.auth.htpasswd is not None
    assert asyncio.run(Htpasswd(config.auth.htpasswd).verify("alice", "alice-pw", "test"))
    assert config.tls is None


def test_passwords_accounts_and_keys_live_only_in_secrets(full: list[dict[str, Any]], tmp_path: Path) -> None:
    written = materialise_secrets(full, tmp_path, existing={})
    files = yaml.safe_load(config_text(full))
    referenced = {u["name"]: u["credentials"]["password_file"] for u in files["upstreams"]}
    assert referenced == {name: f"/etc/mirror/secrets/{name}/password"
                          for name in ("docker.io", "ghcr.io", "127.0.0.1:5001")}
    passwords = {path for path in written if path.startswith("/etc/mirror/secrets/")}
    assert set(referenced.values()) == passwords, "every password_file must be a file the pod has"
    assert not any("password" in u["credentials"] for u in files["upstreams"])
    not_secrets = yaml.safe_dump([d for d in full if d["kind"] != "Secret"])
    secrets = ["hub-s3cret", "local-pass", written["/etc/mirror/auth/token.key"],
               *(line.split(":")[1] for line in written["/etc/mirror/auth/htpasswd"].splitlines())]
    for secret in secrets:
        assert secret not in not_secrets
    assert "$2b$" not in config_text(full)
    sources = {s["secret"]["name"] for s in
               next(v for v in pod_spec(full)["volumes"] if v["name"] == "secrets")["projected"]["sources"]}
    assert sources == {f"{RELEASE}-credentials", "ghcr-token"}
    secret_keys = find(full, "Secret", f"{RELEASE}-credentials")["data"].keys()
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) for key in secret_keys), secret_keys


def test_a_username_from_a_secret_is_refused_with_the_reason(helm: Renderer, values: ValuesFile) -> None:
    error = helm.error(values({"upstreams": [{"name": "docker.io", "url": "https://registry-1.docker.io",
                                              "credentials": {"existingSecret": "hub", "usernameKey": "user",
                                                              "passwordKey": "token"}}]}))
    assert "upstreams[docker.io].credentials.usernameKey: the mirror reads the username from its config" in error


@pytest.mark.parametrize(("data", "message"), [
    ({"config": {"listen": "0.0.0.0:8080"}}, "config.listen: the chart sets this itself"),
    ({"upstreams": [{"name": "ghcr.io", "url": "https://ghcr.io",
                     "credentials": {"username": "u", "password": "p", "existingSecret": "s"}}]},
     "give either password or existingSecret"),
    ({"persistence": {"size": "lots"}}, 'volume size "lots": set config.max_size'),
    ({"terminationGracePeriodSeconds": 35}, "must exceed preStopSleepSeconds plus config.shutdown_grace (35 s)"),
    ({"upstreams": []}, "upstreams: give at least one registry"),
    ({"config": {"auth": {"htpasswd": "/etc/htpasswd"}}},
     "config.auth: the chart renders this from the top-level auth"),
    ({"config": {"tls": {"cert": "/c", "key": "/k"}}}, "config.tls: the chart renders this from the top-level tls"),
    ({"auth": {"htpasswd": {"existingSecret": "users", "content": "alice:$2b$05$x"}}},
     "auth.htpasswd: give either content or existingSecret, not both"),
    ({"auth": {"groups": {"ci": ["bob"]}}}, "auth.groups: only used with auth.htpasswd or auth.access"),
    ({"auth": {"htpasswd": {"existingSecret": "users"}, "token": {"realm": "mirror:5000/token"}}},
     'auth.token.realm: expected the token service\'s http(s) URL, got "mirror:5000/token"'),
    ({"tls": {"clientCA": {"existingSecret": "ca"}}}, "tls.clientCA: client certificates need HTTPS"),
    ({"tls": {"existingSecret": "tls", "clientCerts": "required"}},
     "tls.clientCerts: required needs tls.clientCA.existingSecret"),
    ({"tls": {"existingSecret": "tls", "clientCerts": "maybe"}}, "tls.clientCerts: expected optional or required"),
])
def test_bad_values_fail_naming_the_value_to_fix(helm: Renderer, values: ValuesFile, data: dict[str, Any],
                                                  message: str) -> None:
    assert message in helm.error(values(data))


def test_probes_ask_the_metrics_listener(default: list[dict[str, Any]]) -> None:
    main = container(default)
    probes = {name: (main[name]["httpGet"]["path"], main[name]["httpGet"]["port"])
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/healthz", "metrics"), "livenessProbe": ("/healthz", "metrics"),
                      "readinessProbe": ("/readyz", "metrics")}
    files = yaml.safe_load(config_text(default))
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert files["metrics_listen"].endswith(f":{ports['metrics']}") and files["listen"].endswith(f":{ports['http']}")


@pytest.mark.parametrize("which", ["default", "full", "cluster"])
def test_pod_runs_unprivileged_on_a_read_only_root(which: str, request: pytest.FixtureRequest) -> None:
    docs: list[dict[str, Any]] = request.getfixturevalue(which)
    pod, main = pod_spec(docs), container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (10001, 10001)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    writable = {m["mountPath"] for m in main["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/cache/mirror", "/tmp"}, "with a read-only root, only these may be written"
    assert {m["mountPath"] for m in main["volumeMounts"] if m.get("readOnly")} >= {"/etc/mirror/config.yaml"}
    assert {"name": "MIRROR_CONFIG", "value": "/etc/mirror/config.yaml"} in main["env"]
    assert main["args"] == ["serve"]


def test_full_values_reach_the_pod(full: list[dict[str, Any]]) -> None:
    pod, main = pod_spec(full), container(full)
    template = find(full, "StatefulSet")["spec"]["template"]["metadata"]
    assert main["image"] == "registry.example.com/platform/mirror:0.1.0-rc1"
    assert main["resources"] == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    assert pod["nodeSelector"]["node-role.example.com/infra"] == "true"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["serviceAccountName"] == find(full, "ServiceAccount")["metadata"]["name"] == "mirror-cache"
    assert {"name": "MIRROR_LOG_LEVEL", "value": "debug"} in main["env"]
    assert template["labels"]["tier"] == "infrastructure"
    assert template["annotations"]["example.com/team"] == "platform"
    assert pod["terminationGracePeriodSeconds"] == 120
    monitor = find(full, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"


def test_default_pod_resources_and_grace(default: list[dict[str, Any]]) -> None:
    main = container(default)
    assert main["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert main["image"] == "mirror:0.1.0"
    assert main["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-c", "import time; time.sleep(5)"]
    assert pod_spec(default)["terminationGracePeriodSeconds"] > 5 + 30, "must outlast preStop and shutdown_grace"


@pytest.mark.parametrize(("which", "size", "storage_class", "percent"),
                         [("default", "50Gi", None, 90), ("full", "200Gi", "fast-ssd", 85)])
def test_each_pod_gets_a_cache_volume_the_cache_cannot_fill(which: str, size: str, storage_class: str | None,
                                                            percent: int, request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    docs: list[dict[str, Any]] = request.getfixturevalue(which)
    (claim,) = find(docs, "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == size
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"].get("storageClassName") == storage_class
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    assert mounts["/var/cache/mirror"] == claim["metadata"]["name"]
    assert claim["metadata"]["name"] not in {v["name"] for v in pod_spec(docs)["volumes"]}
    max_size = load_rendered_config(docs, tmp_path).eviction.max_size
    assert max_size == quantity_bytes(size) * percent // 100 < quantity_bytes(size)


def test_without_persistence_the_cache_is_an_empty_dir_within_its_limit(helm: Renderer, values: ValuesFile,
                                                                         tmp_path: Path) -> None:
    docs = helm.manifests(values({"persistence": {"enabled": False, "emptyDir": {"sizeLimit": "20Gi"}}}))
    assert "volumeClaimTemplates" not in find(docs, "StatefulSet")["spec"]
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert load_rendered_config(docs, tmp_path).eviction.max_size == 18 * GIB


def test_max_size_can_be_given(helm: Renderer, values: ValuesFile, tmp_path: Path) -> None:
    docs = helm.manifests(values({"config": {"max_size": "40GiB"}}))
    assert load_rendered_config(docs, tmp_path).eviction.max_size == 40 * GIB


def test_config_and_password_changes_roll_the_pods(helm: Renderer, full: list[dict[str, Any]],
                                                   values: ValuesFile) -> None:
    def checksums(docs: list[dict[str, Any]]) -> dict[str, str]:
        annotations = find(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    before = checksums(full)
    assert set(before) == {"checksum/config", "checksum/secret"}
    log_level = checksums(helm.manifests(FULL_VALUES, values({"config": {"log_level": "error"}})))
    assert log_level["checksum/config"] != before["checksum/config"]
    assert log_level["checksum/secret"] == before["checksum/secret"]
    upstreams = yaml.safe_load(FULL_VALUES.read_text())["upstreams"]
    upstreams[0]["credentials"]["password"] = "rotated"
    rotated = checksums(helm.manifests(FULL_VALUES, values({"upstreams": upstreams})))
    assert rotated["checksum/secret"] != before["checksum/secret"]
    assert rotated["checksum/config"] == before["checksum/config"]


def test_dashboard_uses_only_metrics_the_mirror_exports(full: list[dict[str, Any]]) -> None:
    configmap = find(full, "ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads(configmap["data"]["mirror.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "mirror.json").read_text())
    assert (dashboard["title"], dashboard["uid"]) == ("mirror", "mirror-registry-cache")
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "instance" in variables
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'instance=~"$instance"' in expr, f"{panel['title']}: {expr} ignores the instance picked"
            assert balanced(expr), expr
            names = {re.sub(r"_(bucket|sum|count)$", "", name)
                     for name in re.findall(r"\b(?:mirror|process)_[a-z_]+", expr)}
            assert names <= METRICS, f"{panel['title']}: unknown metrics {names - METRICS}"
            used |= names
    assert used >= METRICS - {"process_virtual_memory_bytes", "process_start_time_seconds"}, (
        f"no panel shows {METRICS - used}")


def balanced(expr: str) -> bool:
    """Brackets and quotes pair up: a cheap guard against a PromQL typo."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and expr.count('"') % 2 == 0


def test_dashboard_is_off_by_default(default: list[dict[str, Any]]) -> None:
    assert [d["metadata"]["name"] for d in default if d["kind"] == "ConfigMap"] == [RELEASE]


def test_notes_point_nodes_at_the_service(helm: Renderer) -> None:
    notes = helm.notes()
    assert snippet("containerd/docker.io/hosts.toml", SERVICE_HOST) in notes
    assert snippet("docker/daemon.json", SERVICE_HOST) in notes
    assert "/etc/containerd/certs.d/docker.io/hosts.toml" in notes
    assert "nodes usually cannot resolve" in notes and "ClusterIP" in notes


def https(text: str) -> str:
    return text.replace('"http://', '"https://')


def test_notes_use_a_fixed_cluster_ip_and_https_for_every_upstream(helm: Renderer) -> None:
    notes = helm.notes(FULL_VALUES)
    host = "10.96.0.50:5000"
    assert https(snippet("containerd/docker.io/hosts.toml", host)) in notes
    ghcr = https(snippet("containerd/quay.io/hosts.toml", host)).replace("quay.io", "ghcr.io")
    assert f"/etc/containerd/certs.d/ghcr.io/hosts.toml:\n\n{ghcr}" in notes
    assert https(snippet("docker/daemon.json", host)) in notes
    assert "http://10.96.0.50" not in notes and f"https://{SERVICE_HOST}/v2/" in notes
    assert f"/etc/docker/certs.d/{host}/ca.crt" in notes, "nodes must be told to trust the CA"
    assert f'[host."https://{host}".header]\n    Authorization = ["Basic' in notes, "nodes must be told to log in"
    assert "WARNING" not in notes and SERVICE_HOST not in notes.split("POINTING NODES")[1]


def test_notes_use_the_node_endpoint_given(helm: Renderer, values: ValuesFile) -> None:
    notes = helm.notes(values({"nodeEndpoint": "mirror.infra.example.com:5000"}))
    assert snippet("containerd/docker.io/hosts.toml", "mirror.infra.example.com:5000") in notes
    assert "WARNING" not in notes


def test_chart_readme_shows_the_tested_snippets() -> None:
    readme = (CHART / "README.md").read_text()
    for transform in (str, https):
        assert transform(snippet("containerd/docker.io/hosts.toml", "10.96.0.50:5000")) in readme
        assert transform(snippet("docker/daemon.json", "10.96.0.50:5000")) in readme



def test_cluster_mode_runs_a_deployment_of_replicas_sharing_the_bucket(cluster: list[dict[str, Any]]) -> None:
    assert [d for d in cluster if d["kind"] in ("StatefulSet", "PersistentVolumeClaim")] == []
    deployment = find(cluster, "Deployment", RELEASE)
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert "volumeClaimTemplates" not in spec
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()

    # The spool: an emptyDir within its limit, at the cache_dir the config names.
    volumes = {v["name"]: v for v in pod_spec(cluster)["volumes"]}
    assert volumes["spool"] == {"name": "spool", "emptyDir": {"sizeLimit": "20Gi"}}
    assert "cache" not in volumes and not any("persistentVolumeClaim" in v for v in volumes.values())
    mounts = {m["mountPath"]: m["name"] for m in container(cluster)["volumeMounts"]}
    assert mounts["/var/cache/mirror"] == "spool"
    assert yaml.safe_load(config_text(cluster))["cache_dir"] == "/var/cache/mirror"

    # Replicas on different nodes where the scheduler can, so one node's loss leaves the others.
    (term,) = pod_spec(cluster)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]

    # The same probes, Services over every replica, and a budget for the Deployment's pods.
    main = container(cluster)
    assert {name: main[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        "startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"http": 5000, "metrics": 9090}
    services = [s["spec"] for s in cluster if s["kind"] == "Service"]
    assert len(services) == 2 and all(s["selector"].items() <= pod_labels.items() for s in services)
    budget = find(cluster, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1 and budget["selector"]["matchLabels"].items() <= pod_labels.items()


def test_cluster_pods_find_the_bucket_redis_and_each_other_in_their_environment(cluster: list[dict[str, Any]],
                                                                                 tmp_path: Path) -> None:
    environment = pod_environment(cluster)
    assert environment["MIRROR_STORAGE"] == CLUSTER_STORAGE
    assert environment["MIRROR_REDIS"] == CLUSTER_REDIS
    assert environment["MIRROR_ADVERTISE"] == f"http://{POD_IP}:5000", "other replicas reach this pod at its IP"
    assert (environment["AWS_ENDPOINT_URL_S3"], environment["AWS_REGION"]) == (
        "http://seaweedfs-s3.storage:8333", "us-east-1")
    assert (environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"]) == (
        "mirror-access", "mirror-s3-secret")

    # Keys and the Redis password come from the chart's Secret, never from the pod spec.
    env = {v["name"]: v for v in container(cluster)["env"]}
    for name in ("MIRROR_REDIS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-cluster", name
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MIRROR_ADVERTISE"]["value"] == "http://$(POD_IP):5000"
    not_secrets = yaml.safe_dump([d for d in cluster if d["kind"] != "Secret"])
    for secret in ("redis-pw", "mirror-s3-secret", "mirror-access"):
        assert secret not in not_secrets

    # The mirror reads that environment over the ConfigMap's file: the bucket, the spool, and the
    # budget of the shared cache (config.max_size: a bucket has no size to take a share of).
    config = load_rendered_config(cluster, tmp_path, environ=environment)
    assert config.storage == S3Location("mirror-cache", "k8s")
    assert (config.redis, config.advertise) == (CLUSTER_REDIS, f"http://{POD_IP}:5000")
    assert str(config.cache_dir) == "/var/cache/mirror"
    assert config.eviction.max_size == 500 * GIB


def test_cluster_credentials_from_secrets_of_your_own(full_cluster: list[dict[str, Any]], existing: ExistingSecrets,
                                                      tmp_path: Path) -> None:
    assert {s["metadata"]["name"] for s in full_cluster if s["kind"] == "Secret"} == {
        f"{RELEASE}-auth", f"{RELEASE}-credentials"}, "nothing of the cluster's for the chart to keep"
    env = {v["name"]: v.get("valueFrom", {}).get("secretKeyRef") for v in container(full_cluster)["env"]}
    assert env["MIRROR_REDIS"] == {"name": "mirror-redis", "key": "redis-url"}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "mirror-s3", "key": "access-key"}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "mirror-s3", "key": "secret-key"}
    assert "AWS_ENDPOINT_URL_S3" not in env and "AWS_REGION" not in env, "AWS S3: the SDK's own endpoint and region"
    names = [v["name"] for v in container(full_cluster)["env"]]
    assert names.index("POD_IP") < names.index("MIRROR_ADVERTISE"), "$(POD_IP) expands only from earlier variables"
    assert {"MIRROR_LOG_LEVEL", "POD_NAME"} <= set(names), "extraEnv still reaches the pod"

    secrets = {**existing, ("mirror-redis", "redis-url"): "rediss://:pw@redis.example.com:6380/2",
               ("mirror-s3", "access-key"): "AKID", ("mirror-s3", "secret-key"): "SECRET"}
    environment = pod_environment(full_cluster, secrets)
    assert environment["MIRROR_REDIS"] == "rediss://:pw@redis.example.com:6380/2"
    assert environment["MIRROR_ADVERTISE"] == f"https://{POD_IP}:5000", "with TLS the internal endpoint is HTTPS"
    config = load_rendered_config(full_cluster, tmp_path, secrets, environment)
    assert config.storage == S3Location("mirror-cache", "")
    assert config.eviction.max_size is None, "a share of persistence.size is no budget for a bucket"
    assert config.auth.enabled and config.tls is not None and len(config.upstreams) == 3

    # The full values' own affinity replaces the default anti-affinity; the rest is unchanged.
    deployment = find(full_cluster, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert pod_spec(full_cluster)["affinity"] == yaml.safe_load(FULL_VALUES.read_text())["affinity"]
    assert set(deployment["spec"]["template"]["metadata"]["annotations"]) >= {"checksum/config", "checksum/secret"}
    volumes = {v["name"]: v for v in pod_spec(full_cluster)["volumes"]}
    assert volumes["spool"]["emptyDir"] == {"sizeLimit": "20Gi"} and {"auth", "tls", "secrets"} <= set(volumes)


def test_cluster_redis_url_without_password_and_no_keys(helm: Renderer, values: ValuesFile) -> None:
    """A plain Redis URL stays in the pod spec where operators can read it; without keys the AWS
    SDK's credential chain applies (e.g. a role through the ServiceAccount's annotations)."""
    docs = helm.manifests(values({"serviceAccount": {"annotations": {
                                      "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mirror"}},
                                  "cluster": {"enabled": True, "storage": CLUSTER_STORAGE,
                                              "s3": {"region": "eu-west-1"},
                                              "redis": {"url": "redis://redis-master.redis:6379/0"},
                                              "spool": {"sizeLimit": ""}, "podAntiAffinity": "hard",
                                              "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}}))
    assert [d for d in docs if d["kind"] == "Secret"] == []
    env = {v["name"]: v for v in container(docs)["env"]}
    assert env["MIRROR_REDIS"] == {"name": "MIRROR_REDIS", "value": "redis://redis-master.redis:6379/0"}
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    account = find(docs, "ServiceAccount")["metadata"]["annotations"]
    assert account["eks.amazonaws.com/role-arn"].endswith("role/mirror")
    assert {v["name"]: v for v in pod_spec(docs)["volumes"]}["spool"]["emptyDir"] == {}
    (term,) = pod_spec(docs)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    strategy = find(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxUnavailable": 1, "maxSurge": 0}
    assert "checksum/cluster-secret" not in find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    for version in kubernetes_versions():
        kubernetes_validate.validate(find(docs, "Deployment"), version, strict=True)

    docs = helm.manifests(values({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "podAntiAffinity": "none",
                                              "redis": {"url": "redis://redis:6379/0"},
                                              "advertise": "http://[$(POD_IP)]:5000"}}))
    assert "affinity" not in pod_spec(docs)
    assert pod_environment(docs)["MIRROR_ADVERTISE"] == f"http://[{POD_IP}]:5000"


def test_cluster_key_changes_roll_the_pods(helm: Renderer, cluster: list[dict[str, Any]], values: ValuesFile) -> None:
    def annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
        found: dict[str, str] = find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return found

    before = annotations(cluster)
    assert set(before) == {"checksum/config", "checksum/cluster-secret"}
    rotated = yaml.safe_load(yaml.safe_dump(CLUSTER))
    rotated["cluster"]["s3"]["secretAccessKey"] = "rotated"
    after = annotations(helm.manifests(values(rotated)))
    assert after["checksum/cluster-secret"] != before["checksum/cluster-secret"]
    assert after["checksum/config"] == before["checksum/config"]


def test_cluster_notes_name_the_deployment_and_the_bucket(helm: Renderer, values: ValuesFile) -> None:
    notes = helm.notes(values(CLUSTER))
    assert f"3 pod(s) of Deployment {RELEASE}" in notes and CLUSTER_STORAGE in notes
    assert f"rollout status deployment/{RELEASE}" in notes and "statefulset" not in notes.lower()
    assert "WARNING: config.max_size" not in notes and "redis-pw" not in notes
    unbounded = yaml.safe_load(yaml.safe_dump(CLUSTER))
    del unbounded["config"]
    assert "WARNING: config.max_size is not set" in helm.notes(values(unbounded))


@pytest.mark.parametrize(("data", "message"), [
    ({"cluster": {"enabled": True, "redis": {"url": "redis://redis:6379/0"}}},
     "cluster.storage: required with cluster.enabled: the shared bucket, as s3://BUCKET/PREFIX"),
    ({"cluster": {"enabled": True, "storage": "gs://mirror-cache", "redis": {"url": "redis://redis:6379/0"}}},
     'cluster.storage: expected s3://BUCKET/PREFIX (a bucket name of 3 to 63 lower-case letters, digits, dots and '
     'dashes), got "gs://mirror-cache"'),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE}},
     "cluster.redis: required with cluster.enabled: give url (redis://HOST:6379/0) or existingSecret"),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE,
                  "redis": {"url": "redis://redis:6379/0", "existingSecret": "redis"}}},
     "cluster.redis: give either url or existingSecret, not both"),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "redis": {"url": "redis-master:6379"}}},
     "cluster.redis.url: expected a redis://, rediss:// or unix:// URL"),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "redis": {"url": "redis://redis:6379/0"},
                  "s3": {"accessKeyId": "AKID"}}}, "cluster.s3: accessKeyId and secretAccessKey go together"),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "redis": {"url": "redis://redis:6379/0"},
                  "s3": {"accessKeyId": "AKID", "secretAccessKey": "s", "existingSecret": "s3"}}},
     "cluster.s3: give either existingSecret or accessKeyId and secretAccessKey, not both"),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "redis": {"url": "redis://redis:6379/0"},
                  "s3": {"endpoint": "seaweedfs-s3:8333"}}},
     'cluster.s3.endpoint: expected an http:// or https:// URL, got "seaweedfs-s3:8333"'),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "redis": {"url": "redis://redis:6379/0"},
                  "podAntiAffinity": "always"}}, "cluster.podAntiAffinity: expected soft, hard or none, got always"),
    ({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE, "redis": {"url": "redis://redis:6379/0"},
                  "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}},
     "cluster.rollingUpdate: maxUnavailable and maxSurge cannot both be 0"),
    ({"cluster": {"storage": CLUSTER_STORAGE}}, "cluster.storage: only used with cluster.enabled: true"),
    ({"config": {"storage": CLUSTER_STORAGE}}, "config.storage: the chart sets this from cluster.storage"),
    ({"config": {"redis": "redis://redis:6379/0"}}, "config.redis: the chart sets this from cluster.redis"),
    ({"config": {"s3": {"secret_access_key": "s"}}},
     "config.s3.secret_access_key: S3 keys never go into the ConfigMap"),
])
def test_bad_cluster_values_fail_naming_the_value_to_fix(helm: Renderer, values: ValuesFile, data: dict[str, Any],
                                                         message: str) -> None:
    assert message in helm.error(values(data))


def test_a_bad_redis_url_is_refused_without_repeating_its_password(helm: Renderer, values: ValuesFile) -> None:
    error = helm.error(values({"cluster": {"enabled": True, "storage": CLUSTER_STORAGE,
                                           "redis": {"url": "http://:redis-pw@redis:6379"}}}))
    assert "cluster.redis.url: expected" in error and "redis-pw" not in error


def test_chart_readme_documents_every_cluster_value() -> None:
    readme = (CHART / "README.md").read_text()

    def leaves(data: dict[str, Any], prefix: str) -> list[str]:
        return [path for key, value in data.items() for path in
                (leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]

    cluster_values = yaml.safe_load((CHART / "values.yaml").read_text())["cluster"]
    assert cluster_values["enabled"] is False, "the StatefulSet stays the default"
    for path in leaves(cluster_values, "cluster."):
        assert f"`{path}`" in readme, f"the chart's README does not mention {path}"
