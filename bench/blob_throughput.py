#!/usr/bin/env python3
"""Blob throughput benchmark: the mirror against the registry it proxies, on loopback.

One run starts a real ``docker-registry`` (CNCF distribution) in a temp dir, pushes one large
pseudo-random blob into ``library/bench``, starts ``mirror serve`` as a subprocess in front of
it, and measures with an aiohttp client that reads, discards and sha256-verifies every body:

- direct: GET the blob straight from the registry (the baseline);
- cold:   GET through the mirror with an empty cache (a fresh mirror and cache dir per run);
- warm:   GET through the mirror once the blob is cached;
- memory: N clients (default 10) pull the blob through a fresh, empty mirror at once while the
          mirror's VmRSS is sampled every 50 ms; VmHWM is read at the end.

It prints a table, compares against the targets (warm >= 1.0x direct, cold >= 0.8x direct,
peak mirror RSS < 150 MB), writes bench/results/blob_throughput.json, and exits 1 if a target
is missed (2 on a setup or correctness failure). Only 127.0.0.1 is ever contacted.

    .venv/bin/python bench/blob_throughput.py [--size 1GiB] [--repeat 3]

Standard library + aiohttp only; not a pytest test.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.support.images import push_blob_stream  # noqa: E402
from tests.support.registry import LocalRegistry, find_registry_binary, free_port, stop_process  # noqa: E402

REPOSITORY = "library/bench"
GEN_CHUNK = 64 << 20
"""Bytes generated (and pushed) per piece, so the blob is never whole in memory."""
CLIENT_READ = 1 << 20
"""Client-side read buffer; the body is read with readany() and discarded."""
SAMPLE_INTERVAL = 0.05
MIRROR_START_TIMEOUT = 30.0
MIRROR_STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 900.0
MB = 1_000_000
MiB = 1 << 20

TARGET_WARM = 1.0
TARGET_COLD = 0.8
TARGET_RSS_MB = 150.0

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 256MiB, 500MB)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


def human_size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


# The blob


def blob_chunks(size: int, seed: int) -> Iterator[bytes]:
    """Deterministic, incompressible bytes in GEN_CHUNK pieces; each piece has its own seed so
    the stream can be regenerated (once to hash it, once to push it)."""
    index = 0
    remaining = size
    while remaining:
        count = min(GEN_CHUNK, remaining)
        yield random.Random(seed * 1_000_003 + index).randbytes(count)
        remaining -= count
        index += 1


def blob_digest(size: int, seed: int) -> str:
    hasher = hashlib.sha256()
    for chunk in blob_chunks(size, seed):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


# Processes




def find_mirror_binary() -> Path:
    for candidate in (Path(sys.executable).parent / "mirror", REPO_ROOT / ".venv" / "bin" / "mirror"):
        if candidate.exists():
            return candidate
    found = shutil.which("mirror")
    if found is None:
        raise FileNotFoundError("the `mirror` console script was not found (.venv/bin/mirror)")
    return Path(found)


class MirrorProcess:
    """`mirror serve` on a fresh port and cache dir; stop() is safe to call more than once."""

    def __init__(self, binary: Path, upstream_url: str, cache_dir: Path, log_path: Path) -> None:
        self.binary = binary
        self.upstream_url = upstream_url
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> MirrorProcess:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        for _ in range(3):
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [str(self.binary), "serve", "--listen", f"127.0.0.1:{self.port}",
                     "--cache-dir", str(self.cache_dir), "--upstream", f"docker.io={self.upstream_url}",
                     "--log-level", "warning"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"mirror did not start; log tail:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + MIRROR_START_TIMEOUT
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with opener.open(f"{self.url}/v2/", timeout=1.0) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "<no log>"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, MIRROR_STOP_TIMEOUT)


def read_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (bytes) from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every SAMPLE_INTERVAL in its own thread, so a busy client event
    loop cannot delay the samples."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.monotonic() - start, read_status(self.pid)["VmRSS"]))
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            self._stop_event.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# Measurement


@dataclass
class Pull:
    seconds: float
    ttfb: float
    size: int
    digest: str
    status: int
    cache: str | None

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds


class BenchError(RuntimeError):
    pass


async def pull(session: aiohttp.ClientSession, url: str, expected_digest: str, expected_size: int) -> Pull:
    """GET url, read and discard the body, verify size and sha256."""
    hasher = hashlib.sha256()
    size = 0
    ttfb = None
    start = time.perf_counter()
    async with session.get(url) as response:
        if response.status != 200:
            body = await response.read()
            raise BenchError(f"GET {url} -> {response.status}: {body[:300]!r}")
        while True:
            chunk = await response.content.readany()
            if not chunk:
                break
            if ttfb is None:
                ttfb = time.perf_counter() - start
            hasher.update(chunk)
            size += len(chunk)
        cache = response.headers.get("X-Mirror-Cache")
        status = response.status
    seconds = time.perf_counter() - start
    digest = "sha256:" + hasher.hexdigest()
    if size != expected_size or digest != expected_digest:
        raise BenchError(f"GET {url} returned {size} bytes with {digest}; expected {expected_size} bytes "
                         f"with {expected_digest}")
    return Pull(seconds, ttfb or seconds, size, digest, status, cache)


async def wait_published(url: str, timeout: float = 60.0) -> None:
    """Until a HEAD answers from the cache: the blob is in the mirror's blob tree."""
    deadline = time.monotonic() + timeout
    async with client_session() as session:
        while True:
            async with session.head(url) as response:
                if response.headers.get("X-Mirror-Cache") == "HIT":
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"blob not published within {timeout:.0f}s")
            await asyncio.sleep(0.05)


def client_session(connections: int = 1) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, sock_read=120.0),
        auto_decompress=False, read_bufsize=CLIENT_READ,
        connector=aiohttp.TCPConnector(limit=connections, force_close=True),
    )


async def pull_once(url: str, digest: str, size: int) -> Pull:
    async with client_session() as session:
        return await pull(session, url, digest, size)


async def pull_many(url: str, digest: str, size: int, clients: int) -> list[Pull]:
    """`clients` independent connections start the same GET at once."""
    async with client_session(clients) as session:
        return list(await asyncio.gather(*(pull(session, url, digest, size) for _ in range(clients))))


@dataclass
class Series:
    name: str
    runs: list[Pull] = field(default_factory=list)

    @property
    def mib_s(self) -> float:
        return statistics.median(p.mib_s for p in self.runs)

    @property
    def ttfb(self) -> float:
        return statistics.median(p.ttfb for p in self.runs)

    def as_json(self) -> dict[str, Any]:
        return {"median_mib_s": round(self.mib_s, 1), "median_ttfb_ms": round(self.ttfb * 1000, 2),
                "runs": [{**asdict(p), "mib_s": round(p.mib_s, 1)} for p in self.runs]}


@dataclass
class MemoryResult:
    clients: int
    baseline_rss: int
    peak_rss_sampled: int
    vm_hwm: int
    samples: int
    wall_seconds: float
    aggregate_mib_s: float
    slowest_client_mib_s: float
    cache_results: list[str | None]

    @property
    def peak(self) -> int:
        return max(self.peak_rss_sampled, self.vm_hwm)


def source_state() -> dict[str, Any]:
    """Which mirror code was measured: the commit, whether the tree was dirty, and a hash of
    the mirror package's sources as they were on disk (other work may be uncommitted)."""
    def git(*args: str) -> str:
        # Only trailing space goes: porcelain lines start with a status column that may be blank.
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    hasher = hashlib.sha256()
    for path in sorted((REPO_ROOT / "mirror").rglob("*.py")):
        hasher.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty_mirror_files": [line[3:] for line in git("status", "--porcelain", "--", "mirror").splitlines()],
            "mirror_sources_sha256": hasher.hexdigest()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.mirror_binary = find_mirror_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="mirror-bench-", dir=args.workdir))
        self.registry = LocalRegistry(self.workdir / "registry")
        self.mirrors: list[MirrorProcess] = []
        self.digest = ""
        self._mirror_count = 0
        self.source = source_state()
        self.load_at_start = os.getloadavg()

    def blob_path(self, base_url: str) -> str:
        return f"{base_url}/v2/{REPOSITORY}/blobs/{self.digest}"

    def new_mirror(self) -> MirrorProcess:
        self._mirror_count += 1
        cache = self.workdir / f"cache-{self._mirror_count}"
        mirror = MirrorProcess(self.mirror_binary, self.registry.url, cache,
                               self.workdir / f"mirror-{self._mirror_count}.log")
        self.mirrors.append(mirror)
        return mirror.start()

    def retire(self, mirror: MirrorProcess) -> None:
        mirror.stop()
        shutil.rmtree(mirror.cache_dir, ignore_errors=True)

    def setup(self) -> None:
        log(f"workdir {self.workdir}")
        self.registry.start()
        log(f"registry {self.registry.url} ({self.registry.binary})")
        started = time.perf_counter()
        self.digest = blob_digest(self.size, self.args.seed)
        log(f"blob {human_size(self.size)} {self.digest} (hashed in {time.perf_counter() - started:.1f}s)")
        started = time.perf_counter()
        push_blob_stream(self.registry.url, REPOSITORY, blob_chunks(self.size, self.args.seed), self.digest,
                         self.size)
        log(f"pushed to {REPOSITORY} in {time.perf_counter() - started:.1f}s")

    def run(self) -> dict[str, Any]:
        """`repeat` rounds of direct, cold, warm; interleaved so that drift in the machine's speed
        (other tenants, page-cache state) hits all three alike instead of skewing one series."""
        repeat = self.args.repeat
        direct, cold, warm = Series("direct"), Series("cold"), Series("warm")

        # Warm-up: one untimed direct read so the registry's file is in the page cache for everyone.
        asyncio.run(pull_once(self.blob_path(self.registry.url), self.digest, self.size))

        for i in range(repeat):
            result = asyncio.run(pull_once(self.blob_path(self.registry.url), self.digest, self.size))
            direct.runs.append(result)
            log(f"round {i + 1}/{repeat} direct: {result.mib_s:8.1f} MiB/s  ttfb {result.ttfb * 1e3:7.1f} ms")

            # Cold: a new mirror on a new, empty cache dir every round.
            mirror = self.new_mirror()
            try:
                result = asyncio.run(pull_once(self.blob_path(mirror.url), self.digest, self.size))
                if result.cache != "MISS":
                    raise BenchError(f"cold pull was served as {result.cache}, expected MISS")
                cold.runs.append(result)
                log(f"round {i + 1}/{repeat} cold:   {result.mib_s:8.1f} MiB/s  ttfb {result.ttfb * 1e3:7.1f} ms")

                # Warm: the same mirror, once the blob is published (clients get the verified
                # last byte before the fsync and rename, so the cold pull can end first).
                asyncio.run(wait_published(self.blob_path(mirror.url)))
                result = asyncio.run(pull_once(self.blob_path(mirror.url), self.digest, self.size))
                if result.cache != "HIT":
                    raise BenchError(f"warm pull was served as {result.cache}, expected HIT")
                warm.runs.append(result)
                log(f"round {i + 1}/{repeat} warm:   {result.mib_s:8.1f} MiB/s  ttfb {result.ttfb * 1e3:7.1f} ms")
            finally:
                self.retire(mirror)

        memory = self.measure_memory()
        return self.report(direct, cold, warm, memory)

    def measure_memory(self) -> MemoryResult:
        clients = self.args.clients
        mirror = self.new_mirror()
        try:
            baseline = read_status(mirror.pid)["VmRSS"]
            sampler = RssSampler(mirror.pid)
            sampler.start()
            started = time.perf_counter()
            try:
                pulls = asyncio.run(pull_many(self.blob_path(mirror.url), self.digest, self.size, clients))
            finally:
                wall = time.perf_counter() - started
                sampler.stop()
            status = read_status(mirror.pid)
        finally:
            self.retire(mirror)
        result = MemoryResult(
            clients=clients, baseline_rss=baseline, peak_rss_sampled=sampler.peak, vm_hwm=status["VmHWM"],
            samples=len(sampler.samples), wall_seconds=wall,
            aggregate_mib_s=clients * self.size / MiB / wall,
            slowest_client_mib_s=min(p.mib_s for p in pulls),
            cache_results=[p.cache for p in pulls])
        log(f"memory {clients} clients: peak RSS {result.peak_rss_sampled / MB:.1f} MB, "
            f"VmHWM {result.vm_hwm / MB:.1f} MB, {result.aggregate_mib_s:.1f} MiB/s aggregate over {wall:.1f}s")
        return result

    def report(self, direct: Series, cold: Series, warm: Series, memory: MemoryResult) -> dict[str, Any]:
        warm_ratio = warm.mib_s / direct.mib_s
        cold_ratio = cold.mib_s / direct.mib_s
        peak_mb = memory.peak / MB
        checks = {
            "warm_vs_direct": {"value": round(warm_ratio, 3), "target": f">= {TARGET_WARM}",
                               "pass": warm_ratio >= TARGET_WARM},
            "cold_vs_direct": {"value": round(cold_ratio, 3), "target": f">= {TARGET_COLD}",
                               "pass": cold_ratio >= TARGET_COLD},
            "peak_rss_mb": {"value": round(peak_mb, 1), "target": f"< {TARGET_RSS_MB:g}",
                            "pass": peak_mb < TARGET_RSS_MB},
        }

        def status(name: str) -> str:
            return "PASS" if checks[name]["pass"] else "FAIL"

        lines = [
            "",
            f"blob {human_size(self.size)} ({self.size} bytes) {self.digest}",
            f"repeat {self.args.repeat} (median shown); {os.cpu_count()} CPUs; python {platform.python_version()}; "
            f"aiohttp {aiohttp.__version__}; load average {self.load_at_start[0]:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end (other processes share these CPUs)",
            "",
            f"{'measurement':<34} {'MiB/s':>9} {'TTFB ms':>9} {'vs direct':>10}",
            f"{'-' * 34} {'-' * 9} {'-' * 9} {'-' * 10}",
            f"{'direct (registry)':<34} {direct.mib_s:>9.1f} {direct.ttfb * 1e3:>9.1f} {'1.00x':>10}",
            f"{'cold (mirror, empty cache)':<34} {cold.mib_s:>9.1f} {cold.ttfb * 1e3:>9.1f} {cold_ratio:>9.2f}x",
            f"{'warm (mirror, cached)':<34} {warm.mib_s:>9.1f} {warm.ttfb * 1e3:>9.1f} {warm_ratio:>9.2f}x",
            f"{f'cold x{memory.clients} concurrent (aggregate)':<34} {memory.aggregate_mib_s:>9.1f} {'':>9} "
            f"{memory.aggregate_mib_s / direct.mib_s:>9.2f}x",
            f"{f'cold x{memory.clients} concurrent (slowest client)':<34} {memory.slowest_client_mib_s:>9.1f}",
            "",
            f"mirror RSS during {memory.clients}-client cold pull: baseline {memory.baseline_rss / MB:.1f} MB, "
            f"peak sampled {memory.peak_rss_sampled / MB:.1f} MB ({memory.samples} samples @ "
            f"{SAMPLE_INTERVAL * 1000:.0f} ms), VmHWM {memory.vm_hwm / MB:.1f} MB",
            "",
            f"{'target':<34} {'value':>9} {'goal':>9} {'result':>10}",
            f"{'-' * 34} {'-' * 9} {'-' * 9} {'-' * 10}",
            f"{'warm / direct throughput':<34} {warm_ratio:>8.2f}x {'>= 1.0x':>9} {status('warm_vs_direct'):>10}",
            f"{'cold / direct throughput':<34} {cold_ratio:>8.2f}x {'>= 0.8x':>9} {status('cold_vs_direct'):>10}",
            f"{'peak mirror RSS, MB':<34} {peak_mb:>9.1f} {'< 150':>9} {status('peak_rss_mb'):>10}",
        ]
        if source_state() != self.source:
            lines += ["", "WARNING: the mirror's sources changed on disk during the run; figures may mix versions"]
        print("\n".join(lines), flush=True)
        return {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "aiohttp": aiohttp.__version__, "platform": platform.platform(),
                        "loadavg_1m_start": self.load_at_start[0], "loadavg_1m_end": os.getloadavg()[0]},
            "source": self.source,
            "source_changed_during_run": source_state() != self.source,
            "blob": {"size": self.size, "digest": self.digest, "repository": REPOSITORY},
            "repeat": self.args.repeat,
            "direct": direct.as_json(),
            "cold": cold.as_json(),
            "warm": warm.as_json(),
            "memory": {**asdict(memory), "peak_mb": round(peak_mb, 1),
                       "baseline_mb": round(memory.baseline_rss / MB, 1)},
            "targets": checks,
            "pass": all(c["pass"] for c in checks.values()),
        }

    def cleanup(self) -> None:
        for mirror in self.mirrors:
            mirror.stop()
        self.registry.stop()
        if self.args.keep:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                        help="blob size, e.g. 1GiB (default), 256MiB, 500MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients in the memory test")
    parser.add_argument("--seed", type=int, default=1, help="seed of the blob's pseudo-random bytes")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "blob_throughput.json",
                        help="where to write the JSON results")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent of the temp dir for the registry and caches (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) instead of removing it")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.clients < 1:
        parser.error("--repeat and --clients must be at least 1")
    return args


def _terminate(signum: int, frame: object) -> None:
    log(f"terminated by signal {signum}; stopping the mirror and the registry")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if find_registry_binary() is None:
        log("docker-registry not found: apt-get install docker-registry")
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
    except (BenchError, RuntimeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
        log(f"benchmark failed: {exc}")
        for mirror in bench.mirrors:
            tail = mirror.log_tail()
            if tail.strip() and tail != "<no log>":
                log(f"mirror log tail ({mirror.log_path.name}):\n{tail}")
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
