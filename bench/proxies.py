#!/usr/bin/env python3
"""Three pull-through caches in front of one registry, in one run: nginx, distribution, the mirror.

Everything runs on loopback (127.0.0.1) and is started (and stopped, in every case, Ctrl-C
included) by this script. The upstream is Debian's ``docker-registry`` (CNCF distribution) on a
temp dir, holding one large pseudo-random blob in ``library/bench``. It is pushed in 64 MiB
pieces with ``push_blob_stream``, so it is never whole in memory. In front of it:

- nginx: Debian's ``nginx-light`` (``/usr/sbin/nginx``) with ``proxy_cache``, configured like
  the popular nginx-based registry caches: ``proxy_cache_key $request_uri``, ``proxy_cache_lock
  on`` (timeout 300 s; ``proxy_cache_lock_age`` stays at its default of 5 s),
  ``proxy_cache_valid 200 206 7d``, ``proxy_buffering on``, ``sendfile on``, one worker,
  ``access_log off``. The cache, the temp paths, the pid file and the error log are in the
  instance's temp dir;
- distribution: a second ``docker-registry`` with ``proxy: remoteurl: <upstream>`` and its own
  filesystem storage (``cache: blobdescriptor: inmemory``, as in bench/cluster.py);
- the mirror: ``.venv/bin/mirror serve --cache-dir <dir> --upstream docker.io=<upstream>
  --log-level warning``.

The client is Debian's curl (``/usr/bin/curl --noproxy '*' -o - -w '%{stderr}...'``), one
process per pull. Its stdout is a pipe into this script, where a thread reads 1 MiB at a time
and sha256-hashes it: every pull is checked for size and digest. Its timings (``-w``, to
stderr) give TTFB (``time_starttransfer``) and throughput (size / ``time_total``).

Blob (``--only blob``), ``--repeat`` interleaved rounds. Each round does, in this order:

1. direct: one pull straight from the upstream (after one untimed warm-up pull before round 1,
   so the upstream's file is in the page cache);
2. for each proxy, in an order that rotates from round to round:
   - cold: a new proxy process on a new, empty cache dir, one pull (must be a MISS);
   - warm: the same pull again, from the same proxy (must be a HIT for nginx and the mirror);
3. for each proxy, in the same rotated order: a new proxy on an empty cache, ``--clients``
   curls start the same cold pull at once. Reported: aggregate throughput (clients x size /
   wall time until the last client finishes), the slowest client, and whether every client
   verified.

CPU: for every pull, utime + stime (fields 14 and 15 of /proc/PID/stat, in clock ticks), plus
cutime + cstime for the children a process has reaped, summed over the proxy's whole process
tree (the nginx master and its workers, cache manager and loader; found by scanning /proc for
parent pids). The upstream's tree is read the same way. A reading is taken just before the
transfer starts. After the transfer, the proxy may still be finishing its fill: the fsync,
rename and index of the mirror, or distribution's background copy into its storage. So the
script first waits until the blob's file is in the proxy's storage, looking only at the file
system (nginx's cache file for ``$request_uri``, distribution's ``blobs/.../data``, the mirror's
``blobs/sha256/..``). Then it waits until the proxy and the upstream have gone quiet: at most
1 tick between them per 100 ms, five times in a row. The second reading is the one taken when
the quiet streak began, so that the idle wait itself is not counted. Resolution is one tick
(10 ms): about 0.04 CPU-s/GiB for a 256 MiB blob. Before the warm pull, the mirror must answer
a HEAD with ``X-Mirror-Cache: HIT``; this check comes after the second reading, so it is not
counted either.

The machine's CPU is read alongside, from /proc/stat's "cpu" line (user, nice, system, irq and
softirq: everything that ran, client and kernel included, the host's steal left out). On
loopback the kernel's TCP work is charged to whichever process is on the CPU when it runs: the
proxy when it sends into an empty socket, a client when its reads pull queued data along. So
one proxy's figure can fall just because the clients paid for its sends; the machine's cannot.

The figure is CPU seconds per GiB of blob delivered. In the concurrent test it is given per
GiB delivered to the clients and per GiB of blob (clients x more). The upstream's CPU per GiB
is reported alongside: for direct pulls as the reference, and for the proxies to show how
often the upstream was read.

Small requests (``--only small``). The standard test image (``populate(...)["single"]``) is
pushed to the upstream. A new distribution proxy and a new mirror each fetch every path once
and are checked against the upstream's bytes. For the mirror, each path is then polled until
it answers ``HIT``. Next, ``wrk -t2 -c32 -d<seconds>s --latency``, with an Accept header for
OCI and Docker manifests, runs against the upstream, the distribution proxy and the mirror for
manifest by tag, manifest by digest and the config blob. This is ``--repeat`` rounds, in an
order that rotates from round to round; the medians of requests/s and p99 are reported.

Targets (met/missed are printed):

- cold: mirror CPU/GiB <= 0.85x nginx's, and mirror throughput >= 1.0x nginx's;
- warm: mirror throughput >= 1.0x direct, and mirror CPU <= 0.15 s/GiB;
- --clients cold clients: mirror aggregate >= 1.0x nginx's;
- manifest by tag: mirror >= 10x the distribution proxy and >= 2x the upstream (requests/s);
- mirror p99 < 20 ms, for each of the three small requests.

Freed pages, before every cold pull (``--no-prime`` turns this off): this machine is a VM with
free page reporting (``page_reporting.page_reporting_order`` on the kernel command line), so a
page that has been free for a second or two is handed back to the host, and the next write into
it pays a host fault. Writing 1 GiB into a new file measured 2.4-2.7 s of system CPU on such
pages and 0.20-0.23 s on pages freed just before (``dd``, 2 rounds each). The proxies start at
different speeds after the previous one's cache is removed (nginx in milliseconds, the mirror in
about a second), so without care the fastest starter writes into recycled pages and the others
into reported ones. So just before each cold pull (and each concurrent cold run), the script
writes a scratch file of twice the blob's size next to the caches and removes it: every proxy
then writes its cache into pages freed moments earlier, as on a machine without page reporting.
The scratch write is the script's own CPU, outside every reading.

Exit status: 0 if every target was met, 1 if a target was missed, 2 on a setup failure or a
wrong answer (a size, a digest, a status, or a cache state that is not what it must be).

    .venv/bin/python bench/proxies.py                                   # 256MiB, 3 rounds
    .venv/bin/python bench/proxies.py --size 64MiB --repeat 1 --seconds 2   # quick check
    .venv/bin/python bench/proxies.py --only small --seconds 5

Results are printed as a table on stdout (progress goes to stderr) and written as JSON to
bench/results/proxies.json (git-ignored). The JSON holds every run, the medians, the targets,
the load average and the git commit. Client, upstream and proxy share the machine's CPUs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.blob_throughput import (  # noqa: E402
    BenchError,
    MirrorProcess,
    blob_chunks,
    blob_digest,
    find_mirror_binary,
    human_size,
    log,
    parse_size,
    source_state,
)
from tests.support.images import populate, push_blob_stream  # noqa: E402
from tests.support.registry import LocalRegistry, find_registry_binary, free_port  # noqa: E402

CURL = "/usr/bin/curl"
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"

REPOSITORY = "library/bench"
MiB = 1 << 20
GiB = 1 << 30
READ_SIZE = 1 << 20
"""The client reads curl's stdout 1 MiB at a time."""
PIPE_SIZE = 1 << 20
"""curl's stdout pipe is enlarged to this (the default 1 MiB limit of /proc/sys/fs/pipe-max-size)."""
REQUEST_TIMEOUT = 900.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SETTLE_INTERVAL = 0.1
SETTLE_QUIET_TICKS = 1
SETTLE_STREAK = 5
SETTLE_TIMEOUT = 60.0
FILE_WAIT_TIMEOUT = 30.0
PRIME_FACTOR = 2
"""The scratch file written and removed before a cold pull is this many times the blob."""
CLK_TCK = os.sysconf("SC_CLK_TCK")

ACCEPT = ("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json")

WRITE_OUT = "%{stderr}\n@@bench %{json}\n@@headers %header{x-mirror-cache}|%header{x-cache-status}|\n"
"""curl's -w: its timings as JSON and the two caches' status headers, on stderr."""

PROXIES = ("nginx", "distribution", "mirror")
LABELS = {"direct": "direct (upstream registry)", "nginx": "nginx proxy_cache",
          "distribution": "distribution proxy", "mirror": "mirror", "upstream": "upstream registry"}
CACHE_HEADER = {"nginx": "X-Cache-Status", "mirror": "X-Mirror-Cache"}

TARGET_COLD_CPU_VS_NGINX = 0.85
TARGET_COLD_MIBS_VS_NGINX = 1.0
TARGET_WARM_VS_DIRECT = 1.0
TARGET_WARM_CPU_S_GIB = 0.15
TARGET_CONCURRENT_VS_NGINX = 1.0
TARGET_TAG_VS_DISTRIBUTION = 10.0
TARGET_TAG_VS_UPSTREAM = 2.0
TARGET_P99_MS = 20.0

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# CPU time of process trees, from /proc


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime + cutime + cstime in ticks) for every process now alive."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue  # gone since the scandir
        # Field 2 (comm) may hold spaces and parentheses; the fields after the last ")" start at 3.
        rest = data[data.rindex(b")") + 2:].split()
        ppid = int(rest[1])  # field 4
        ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])  # fields 14-17
        table[int(entry.name)] = (ppid, ticks)
    return table


def tree_ticks(roots: Sequence[int]) -> list[int]:
    """CPU ticks of each root's process tree (the root, its children, theirs...). Children that a
    process in the tree has reaped still count, through cutime and cstime."""
    table = _proc_table()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    totals = []
    for root in roots:
        total, stack, seen = 0, [root], set()
        while stack:
            pid = stack.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            total += table[pid][1]
            stack.extend(children.get(pid, ()))
        totals.append(total)
    return totals


def machine_ticks() -> int:
    """The machine's busy ticks: user, nice, system, irq and softirq of /proc/stat's "cpu" line
    (why it is read: see the module's docstring)."""
    with open("/proc/stat", "rb") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return user + nice + system + irq + softirq


def readings(roots: Sequence[int]) -> list[int]:
    """The ticks of each root's tree, then the machine's."""
    return [*tree_ticks(roots), machine_ticks()]


def cpu_seconds(before: Sequence[int], after: Sequence[int]) -> list[float]:
    """CPU seconds between two `readings`: each root's tree, then the machine."""
    return [(a - b) / CLK_TCK for a, b in zip(after, before, strict=True)]


def settle(roots: Sequence[int]) -> tuple[list[int], float]:
    """Wait until the trees are quiet (at most SETTLE_QUIET_TICKS between them per interval,
    SETTLE_STREAK intervals in a row) and return `readings` as of the start of the quiet streak,
    with the seconds waited. After SETTLE_TIMEOUT, the last reading."""
    started = time.monotonic()
    previous = readings(roots)
    streak_start, streak = previous, 0
    while time.monotonic() - started < SETTLE_TIMEOUT:
        time.sleep(SETTLE_INTERVAL)
        current = readings(roots)
        if sum(current[:-1]) - sum(previous[:-1]) <= SETTLE_QUIET_TICKS:
            if streak == 0:
                streak_start = previous
            streak += 1
            if streak >= SETTLE_STREAK:
                return streak_start, time.monotonic() - started
        else:
            streak = 0
        previous = current
    log(f"warning: processes {list(roots)} did not go quiet within {SETTLE_TIMEOUT:.0f}s")
    return previous, time.monotonic() - started


# The client: curl, its body hashed here


_live: set[subprocess.Popen[bytes]] = set()
"""curl processes under way, killed on the way out."""


@dataclass
class Pull:
    target: str
    phase: str
    size: int
    seconds: float
    """curl's time_total."""
    ttfb: float
    """curl's time_starttransfer."""
    wall: float
    """From starting curl to the end of its output, as seen here."""
    started: float
    ended: float
    cache: str | None
    proxy_cpu_s: float | None = None
    upstream_cpu_s: float | None = None
    machine_cpu_s: float | None = None

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds if self.seconds > 0 else 0.0


class CurlPull:
    """One curl GET; its stdout is read and hashed in a thread, so many can run at once."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.hasher = hashlib.sha256()
        self.size = 0
        self.failure: BaseException | None = None
        self.started = time.perf_counter()
        self.ended = self.started
        self.process = subprocess.Popen(
            [CURL, "-sS", "--noproxy", "*", "-o", "-", "-w", WRITE_OUT, url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        _live.add(self.process)
        assert self.process.stdout is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.thread = threading.Thread(target=self._drain, daemon=True, name="curl-reader")
        self.thread.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        fd = self.process.stdout.fileno()
        try:
            while True:
                count = os.readv(fd, [buffer])
                if not count:
                    break
                self.hasher.update(view[:count])
                self.size += count
        except BaseException as exc:  # reported by result()
            self.failure = exc
        finally:
            self.ended = time.perf_counter()

    def result(self, target: str, phase: str, digest: str, size: int, header: str | None) -> Pull:
        """Wait for the end; raise BenchError unless it was a 200 with the right size and digest."""
        self.thread.join(REQUEST_TIMEOUT)
        try:
            if self.thread.is_alive():
                raise BenchError(f"curl {self.url} did not finish within {REQUEST_TIMEOUT:.0f}s")
            assert self.process.stderr is not None
            stderr = self.process.stderr.read().decode("utf-8", errors="replace")
            code = self.process.wait(STOP_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            _live.discard(self.process)
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
        if self.failure is not None:
            raise BenchError(f"reading curl's output for {self.url} failed: {self.failure!r}")
        stats: dict[str, Any] | None = None
        headers: list[str] = []
        for line in stderr.splitlines():
            if line.startswith("@@bench "):
                stats = json.loads(line[len("@@bench "):])
            elif line.startswith("@@headers "):
                headers = line[len("@@headers "):].split("|")
        if code != 0 or stats is None:
            raise BenchError(f"curl {self.url} exited with {code}: {stderr.strip()[:500]}")
        got = "sha256:" + self.hasher.hexdigest()
        if stats["http_code"] != 200 or self.size != size or got != digest:
            raise BenchError(f"GET {self.url} ({target} {phase}) -> {stats['http_code']}, {self.size} bytes "
                             f"with {got}; expected 200, {size} bytes with {digest}")
        if int(stats["size_download"]) != self.size:
            raise BenchError(f"curl reported {stats['size_download']} bytes, {self.size} read from it")
        cache = None
        if header == "X-Mirror-Cache" and headers:
            cache = headers[0] or None
        elif header == "X-Cache-Status" and len(headers) > 1:
            cache = headers[1] or None
        return Pull(target=target, phase=phase, size=self.size, seconds=float(stats["time_total"]),
                    ttfb=float(stats["time_starttransfer"]), wall=self.ended - self.started,
                    started=self.started, ended=self.ended, cache=cache)


def kill_live_clients() -> None:
    for process in list(_live):
        if process.poll() is None:
            process.kill()
            process.wait()
        _live.discard(process)


def http(url: str, method: str = "GET", accept: str | None = ACCEPT, timeout: float = 30.0
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def is_hit(url: str, method: str = "GET") -> bool:
    return http(url, method)[1].get("X-Mirror-Cache") == "HIT"


def ping(url: str) -> bool:
    try:
        return http(f"{url}/v2/", timeout=1.0)[0] == 200
    except (urllib.error.URLError, OSError):
        return False


# The proxies


class NginxProcess:
    """nginx -p <dir> with proxy_cache in front of the upstream; in its own session, so that the
    master and its workers can be stopped together (SIGTERM to the master, then SIGKILL to the
    group it leads if anything is left)."""

    def __init__(self, workdir: Path, upstream_port: int) -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.cache_dir = workdir / "cache"
        self.config_path = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _config(self) -> str:
        d = self.workdir
        return f"""\
user root;
worker_processes 1;
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {self.error_log} warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {d}/client_body_temp;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    proxy_cache_path {self.cache_dir} levels=1:2 keys_zone=reg:10m max_size=20g inactive=7d use_temp_path=off;
    server {{
        listen 127.0.0.1:{self.port};
        location /v2/ {{
            proxy_pass http://127.0.0.1:{self.upstream_port};
            proxy_http_version 1.1;
            proxy_read_timeout 900s;
            proxy_cache reg;
            proxy_cache_valid 200 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 300s;
            proxy_cache_key $request_uri;
            proxy_buffering on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""

    def start(self) -> NginxProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = free_port()
            self.config_path.write_text(self._config())
            with (self.workdir / "stderr.log").open("ab") as out:
                self.process = subprocess.Popen(
                    [NGINX, "-p", f"{self.workdir}/", "-e", str(self.error_log), "-c", str(self.config_path),
                     "-g", "daemon off; master_process on;"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.process.poll() is None:
                if ping(self.url):
                    return self
                time.sleep(0.05)
            self.stop()
            if "Address already in use" not in self.log_tail():
                break
        raise BenchError(f"nginx did not start; error log tail:\n{self.log_tail()}")

    def log_tail(self, limit: int = 3000) -> str:
        text = ""
        for path in (self.error_log, self.workdir / "stderr.log"):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_bytes()[-limit:].decode("utf-8", errors="replace")
        return text or "<no log>"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # SIGTERM: fast shutdown, the master stops its workers
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # any worker the master left behind


class DistributionProxy(LocalRegistry):
    """docker-registry as a pull-through cache (proxy: remoteurl) on its own filesystem storage."""

    def __init__(self, workdir: Path, upstream: str) -> None:
        super().__init__(workdir)
        self.upstream = upstream

    def blob_data(self, digest: str) -> Path:
        algorithm, hexdigest = digest.split(":", 1)
        return (self.storage_dir / "docker" / "registry" / "v2" / "blobs" / algorithm / hexdigest[:2] / hexdigest
                / "data")

    def _write_config(self, port: int) -> None:
        """The upstream test registry's own config, made a pull-through cache."""
        super()._write_config(port)
        with self.config_path.open("a") as config:
            config.write(f"proxy:\n  remoteurl: {json.dumps(self.upstream)}\n")


@dataclass
class Proxy:
    kind: str
    url: str
    pid: int
    workdir: Path
    stop: Callable[[], None]
    log_tail: Callable[[], str]
    on_disk: Callable[[str], bool]
    """Whether the blob's file is in the proxy's storage: a look at the file system, which costs
    the proxy no CPU (its layout is known here: nginx's cache key, distribution's and the
    mirror's blob trees)."""
    check_stored: Callable[[str], None]
    """Raises unless the proxy now answers from its cache; run after the CPU readings."""


# Results


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_gib(cpu_s: float | None, size: int) -> float | None:
    return None if cpu_s is None else cpu_s / (size / GiB)


@dataclass
class Series:
    name: str
    runs: list[Pull] = field(default_factory=list)

    @property
    def mib_s(self) -> float | None:
        return median(p.mib_s for p in self.runs)

    @property
    def ttfb_ms(self) -> float | None:
        value = median(p.ttfb for p in self.runs)
        return None if value is None else value * 1000

    @property
    def proxy_cpu_gib(self) -> float | None:
        return median(per_gib(p.proxy_cpu_s, p.size) for p in self.runs)

    @property
    def upstream_cpu_gib(self) -> float | None:
        return median(per_gib(p.upstream_cpu_s, p.size) for p in self.runs)

    @property
    def machine_cpu_gib(self) -> float | None:
        return median(per_gib(p.machine_cpu_s, p.size) for p in self.runs)

    def as_json(self) -> dict[str, Any]:
        return {"median_mib_s": rnd(self.mib_s, 1), "median_ttfb_ms": rnd(self.ttfb_ms, 2),
                "median_proxy_cpu_s_per_gib": rnd(self.proxy_cpu_gib, 3),
                "median_upstream_cpu_s_per_gib": rnd(self.upstream_cpu_gib, 3),
                "median_machine_cpu_s_per_gib": rnd(self.machine_cpu_gib, 3),
                "runs": [{**asdict(p), "mib_s": round(p.mib_s, 1),
                          "proxy_cpu_s_per_gib": rnd(per_gib(p.proxy_cpu_s, p.size), 3),
                          "upstream_cpu_s_per_gib": rnd(per_gib(p.upstream_cpu_s, p.size), 3),
                          "machine_cpu_s_per_gib": rnd(per_gib(p.machine_cpu_s, p.size), 3)} for p in self.runs]}


@dataclass
class Concurrent:
    target: str
    clients: int
    size: int
    wall: float
    pulls: list[Pull]
    proxy_cpu_s: float
    upstream_cpu_s: float
    machine_cpu_s: float

    @property
    def aggregate_mib_s(self) -> float:
        return self.clients * self.size / MiB / self.wall

    @property
    def slowest_mib_s(self) -> float:
        return min(p.mib_s for p in self.pulls)

    @property
    def cpu_per_gib_delivered(self) -> float:
        return self.proxy_cpu_s / (self.clients * self.size / GiB)

    @property
    def cpu_per_gib_blob(self) -> float:
        return self.proxy_cpu_s / (self.size / GiB)

    @property
    def upstream_cpu_per_gib_blob(self) -> float:
        return self.upstream_cpu_s / (self.size / GiB)

    @property
    def machine_cpu_per_gib_delivered(self) -> float:
        return self.machine_cpu_s / (self.clients * self.size / GiB)

    @property
    def caches(self) -> str:
        counts = collections.Counter(p.cache or "-" for p in self.pulls)
        return " ".join(f"{name}x{count}" for name, count in sorted(counts.items()))

    def as_json(self) -> dict[str, Any]:
        return {"clients": self.clients, "wall_s": round(self.wall, 3),
                "aggregate_mib_s": round(self.aggregate_mib_s, 1), "slowest_client_mib_s": round(self.slowest_mib_s, 1),
                "proxy_cpu_s": round(self.proxy_cpu_s, 3),
                "proxy_cpu_s_per_gib_delivered": round(self.cpu_per_gib_delivered, 3),
                "proxy_cpu_s_per_gib_blob": round(self.cpu_per_gib_blob, 3),
                "upstream_cpu_s": round(self.upstream_cpu_s, 3),
                "upstream_cpu_s_per_gib_blob": round(self.upstream_cpu_per_gib_blob, 3),
                "machine_cpu_s": round(self.machine_cpu_s, 3),
                "machine_cpu_s_per_gib_delivered": round(self.machine_cpu_per_gib_delivered, 3),
                "caches": self.caches, "all_verified": True,
                "clients_detail": [{**asdict(p), "mib_s": round(p.mib_s, 1)} for p in self.pulls]}


def rnd(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclass
class WrkResult:
    rate: float
    p99_ms: float
    requests: int


def run_wrk(url: str, seconds: int) -> WrkResult:
    """wrk -t2 -c32 --latency; it must see no errors and no non-2xx answers."""
    out = subprocess.run([WRK, "-t2", "-c32", f"-d{seconds}s", "--latency", "-H", f"Accept: {ACCEPT}", url],
                         capture_output=True, text=True, timeout=seconds + 60, check=False)
    text = out.stdout
    if out.returncode != 0 or "Non-2xx" in text or "Socket errors" in text:
        raise BenchError(f"wrk against {url} saw errors (exit {out.returncode}):\n{text}{out.stderr}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    total = re.search(r"(\d+) requests in", text)
    if rate is None or p99 is None or total is None:
        raise BenchError(f"could not read wrk's output:\n{text}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return WrkResult(float(rate.group(1)), float(p99.group(1)) * scale, int(total.group(1)))


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.mirror_binary = find_mirror_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="proxies-bench-", dir=args.workdir))
        self.upstream = LocalRegistry(self.workdir / "upstream")
        self.proxies: list[Proxy] = []
        self.counter = 0
        self.file_wait_disabled: set[str] = set()
        self.digest = ""
        self.source = source_state()
        self.load_at_start = os.getloadavg()
        self.started = time.monotonic()

    # Setup

    def start_upstream(self) -> None:
        log(f"workdir {self.workdir}")
        self.upstream.start()
        log(f"upstream {self.upstream.url} ({self.upstream.binary}, pid {self.upstream.pid})")

    def push_blob(self) -> None:
        started = time.perf_counter()
        self.digest = blob_digest(self.size, self.args.seed)
        log(f"blob {human_size(self.size)} {self.digest} (hashed in {time.perf_counter() - started:.1f}s)")
        started = time.perf_counter()
        push_blob_stream(self.upstream.url, REPOSITORY, blob_chunks(self.size, self.args.seed), self.digest,
                         self.size)
        log(f"pushed to {REPOSITORY} in {time.perf_counter() - started:.1f}s")

    def start_proxy(self, kind: str) -> Proxy:
        self.counter += 1
        workdir = self.workdir / f"{kind}-{self.counter}"
        blob_path = f"/v2/{REPOSITORY}/blobs/"
        proxy: Proxy
        if kind == "nginx":
            upstream_port = int(self.upstream.url.rsplit(":", 1)[1])
            nginx = NginxProcess(workdir, upstream_port)

            def cached(digest: str) -> bool:
                key = hashlib.md5((blob_path + digest).encode()).hexdigest()  # proxy_cache_key $request_uri
                path = nginx.cache_dir / key[-1] / key[-3:-1] / key  # levels=1:2
                return path.exists() and path.stat().st_size > self.size  # nginx's header, then the body

            self.proxies.append(proxy := Proxy(kind, "", 0, workdir, nginx.stop, nginx.log_tail, cached,
                                               lambda _: None))
            nginx.start()
            proxy.url, proxy.pid = nginx.url, nginx.pid
        elif kind == "distribution":
            registry = DistributionProxy(workdir, self.upstream.url)

            def stored(digest: str) -> bool:
                data = registry.blob_data(digest)
                return data.exists() and data.stat().st_size == self.size

            self.proxies.append(proxy := Proxy(kind, "", 0, workdir, registry.stop, registry._log_tail, stored,
                                               lambda _: None))
            registry.start()
            proxy.url, proxy.pid = registry.url, registry.pid
        elif kind == "mirror":
            mirror = MirrorProcess(self.mirror_binary, self.upstream.url, workdir / "cache", workdir / "mirror.log")
            workdir.mkdir(parents=True, exist_ok=True)

            def in_tree(digest: str) -> bool:
                algorithm, hexdigest = digest.split(":", 1)
                path = mirror.cache_dir / "blobs" / algorithm / hexdigest[:2] / hexdigest
                return path.exists() and path.stat().st_size == self.size

            def published(digest: str) -> None:
                url = f"{mirror.url}{blob_path}{digest}"
                wait_until(functools.partial(is_hit, url, "HEAD"),
                           "the mirror to publish the blob (HEAD -> X-Mirror-Cache: HIT)")

            self.proxies.append(proxy := Proxy(kind, "", 0, workdir, mirror.stop, mirror.log_tail, in_tree,
                                               published))
            mirror.start()
            proxy.url, proxy.pid = mirror.url, mirror.pid
        else:
            raise ValueError(kind)
        return proxy

    def retire(self, proxy: Proxy) -> None:
        proxy.stop()
        if not self.args.keep:
            shutil.rmtree(proxy.workdir, ignore_errors=True)

    # Blob

    def blob_url(self, base: str) -> str:
        return f"{base}/v2/{REPOSITORY}/blobs/{self.digest}"

    def wait_on_disk(self, proxy: Proxy) -> None:
        """Until the proxy's fill has reached its storage, looking only at the file system. The CPU
        readings end when the processes go quiet; a fill blocked in fsync is quiet too, so wait for
        the file first. If the expected file never shows up (a changed layout), say so once and
        rely on the quiet wait alone."""
        if proxy.kind in self.file_wait_disabled:
            return
        try:
            wait_until(functools.partial(proxy.on_disk, self.digest), f"{proxy.kind}'s copy of the blob on disk",
                       timeout=FILE_WAIT_TIMEOUT)
        except BenchError as exc:
            log(f"warning: {exc}; not waiting for {proxy.kind}'s file again")
            self.file_wait_disabled.add(proxy.kind)

    def free_pages(self) -> None:
        """Write a scratch file next to the caches and remove it, so that the cold pull that follows
        writes into pages freed just now rather than pages the VM has handed back to the host
        (see the module's docstring)."""
        if not self.args.prime:
            return
        scratch = self.workdir / "scratch"
        block = bytes(8 * MiB)
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(PRIME_FACTOR * self.size // len(block) + 1):
                os.write(fd, block)
        finally:
            os.close(fd)
            scratch.unlink()

    def measured_pull(self, target: str, phase: str, url: str, proxy: Proxy | None) -> Pull:
        """One curl pull with the CPU of the proxy's tree (if any) and the upstream's around it."""
        roots = [self.upstream.pid] if proxy is None else [proxy.pid, self.upstream.pid]
        before = readings(roots)
        client = CurlPull(url)
        result = client.result(target, phase, self.digest, self.size, CACHE_HEADER.get(target))
        if proxy is not None:
            self.wait_on_disk(proxy)
        after, _ = settle(roots)
        cpu = cpu_seconds(before, after)
        result.upstream_cpu_s, result.machine_cpu_s = cpu[-2:]
        if proxy is not None:
            result.proxy_cpu_s = cpu[0]
        return result

    def expect_cache(self, pull: Pull, expected: str) -> None:
        if pull.target in CACHE_HEADER and pull.cache != expected:
            raise BenchError(f"{pull.target} {pull.phase} pull was served as {pull.cache!r}, expected {expected}")

    def run_blob(self) -> dict[str, Any]:
        repeat = self.args.repeat
        series: dict[str, Series] = {"direct": Series("direct")}
        for kind in PROXIES:
            series[f"{kind} cold"] = Series(f"{kind} cold")
            series[f"{kind} warm"] = Series(f"{kind} warm")
        concurrent: dict[str, list[Concurrent]] = {kind: [] for kind in PROXIES}

        log("warm-up: one untimed direct pull")
        CurlPull(self.blob_url(self.upstream.url)).result("direct", "warm-up", self.digest, self.size, None)

        for index in range(repeat):
            order = rotated(PROXIES, index)
            tag = f"round {index + 1}/{repeat}"
            pull = self.measured_pull("direct", "direct", self.blob_url(self.upstream.url), None)
            series["direct"].runs.append(pull)
            log(f"{tag} {'direct':<20} {describe(pull)}")
            for kind in order:
                proxy = self.start_proxy(kind)
                try:
                    self.free_pages()
                    pull = self.measured_pull(kind, "cold", self.blob_url(proxy.url), proxy)
                    self.expect_cache(pull, "MISS")
                    series[f"{kind} cold"].runs.append(pull)
                    log(f"{tag} {kind + ' cold':<20} {describe(pull)}")
                    proxy.check_stored(self.digest)
                    pull = self.measured_pull(kind, "warm", self.blob_url(proxy.url), proxy)
                    self.expect_cache(pull, "HIT")
                    series[f"{kind} warm"].runs.append(pull)
                    log(f"{tag} {kind + ' warm':<20} {describe(pull)}")
                finally:
                    self.retire(proxy)
            for kind in order:
                result = self.measure_concurrent(kind)
                concurrent[kind].append(result)
                log(f"{tag} {kind + f' x{result.clients}':<20} {result.aggregate_mib_s:8.1f} MiB/s aggregate, "
                    f"slowest {result.slowest_mib_s:7.1f} MiB/s, proxy CPU {result.cpu_per_gib_delivered:.3f} s/GiB "
                    f"delivered ({result.caches})")
        return {"series": series, "concurrent": concurrent}

    def measure_concurrent(self, kind: str) -> Concurrent:
        clients = self.args.clients
        proxy = self.start_proxy(kind)
        try:
            roots = [proxy.pid, self.upstream.pid]
            url = self.blob_url(proxy.url)
            self.free_pages()
            before = readings(roots)
            started = time.perf_counter()
            running: list[CurlPull] = []
            try:
                for _ in range(clients):
                    running.append(CurlPull(url))
                pulls = [c.result(kind, "concurrent", self.digest, self.size, CACHE_HEADER.get(kind))
                         for c in running]
            finally:
                kill_live_clients()
            wall = max(p.ended for p in pulls) - started
            self.wait_on_disk(proxy)
            after, _ = settle(roots)
        finally:
            self.retire(proxy)
        proxy_cpu, upstream_cpu, machine_cpu = cpu_seconds(before, after)
        return Concurrent(target=kind, clients=clients, size=self.size, wall=wall, pulls=pulls,
                          proxy_cpu_s=proxy_cpu, upstream_cpu_s=upstream_cpu, machine_cpu_s=machine_cpu)

    # Small requests

    def run_small(self) -> dict[str, Any]:
        image = populate(self.upstream.url)["single"]
        config = json.loads(image.manifest)["config"]["digest"]
        paths = {"manifest by tag": f"/v2/{image.name}/manifests/{image.tag}",
                 "manifest by digest": f"/v2/{image.name}/manifests/{image.digest}",
                 f"blob ({len(image.blobs[config])} B config)": f"/v2/{image.name}/blobs/{config}"}
        targets = ("upstream", "distribution", "mirror")
        proxies = {kind: self.start_proxy(kind) for kind in ("distribution", "mirror")}
        try:
            bases = {"upstream": self.upstream.url, **{k: p.url for k, p in proxies.items()}}
            for name, path in paths.items():
                status, _, expected = http(f"{self.upstream.url}{path}")
                if status != 200:
                    raise BenchError(f"upstream {path} -> {status}")
                for kind in ("distribution", "mirror"):
                    status, _, body = http(f"{bases[kind]}{path}")
                    if status != 200 or body != expected:
                        raise BenchError(f"{kind} {name} ({path}) -> {status}, {len(body)} bytes; "
                                         f"expected 200 and the upstream's {len(expected)} bytes")
                wait_until(functools.partial(is_hit, f"{bases['mirror']}{path}"),
                           f"the mirror to answer {path} from its cache")
                http(f"{bases['distribution']}{path}")
            settle([self.upstream.pid, *(p.pid for p in proxies.values())])
            results: dict[str, dict[str, list[WrkResult]]] = {n: {t: [] for t in targets} for n in paths}
            for index in range(self.args.repeat):
                for name, path in paths.items():
                    for target in rotated(targets, index):
                        result = run_wrk(f"{bases[target]}{path}", self.args.seconds)
                        results[name][target].append(result)
                        log(f"small round {index + 1}/{self.args.repeat} {name:<24} {target:<13} "
                            f"{result.rate:9.0f}/s  p99 {result.p99_ms:7.2f} ms")
        finally:
            for proxy in proxies.values():
                self.retire(proxy)
        return {"paths": paths, "results": results}

    # Report

    def cleanup(self) -> None:
        kill_live_clients()
        for proxy in self.proxies:
            proxy.stop()
        self.upstream.stop()
        if self.args.keep:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def describe(pull: Pull) -> str:
    text = f"{pull.mib_s:8.1f} MiB/s  ttfb {pull.ttfb * 1e3:7.1f} ms"
    if pull.proxy_cpu_s is not None:
        text += f"  proxy CPU {per_gib(pull.proxy_cpu_s, pull.size):6.3f} s/GiB"
    text += f"  upstream CPU {per_gib(pull.upstream_cpu_s, pull.size):6.3f} s/GiB"
    text += f"  machine CPU {per_gib(pull.machine_cpu_s, pull.size):6.3f} s/GiB"
    if pull.cache:
        text += f"  {pull.cache}"
    return text


def target(name: str, value: float | None, goal: str, passed: bool | None, unit: str = "x") -> dict[str, Any]:
    return {"name": name, "value": rnd(value, 3), "unit": unit, "goal": goal,
            "met": None if value is None else passed}


def report(bench: Bench, blob: dict[str, Any] | None, small: dict[str, Any] | None) -> dict[str, Any]:
    args = bench.args
    lines: list[str] = []
    targets: list[dict[str, Any]] = []
    out: dict[str, Any] = {}
    load_end = os.getloadavg()
    src = bench.source
    dirty = ", ".join(Path(p).name for p in src["dirty_mirror_files"]) or "none"
    lines += ["", f"commit {str(src['commit'])[:12]} (uncommitted in mirror/: {dirty}); {os.cpu_count()} CPUs; "
              f"python {platform.python_version()}; load average {bench.load_at_start[0]:.2f} at start, "
              f"{load_end[0]:.2f} at end (other processes share these CPUs)"]

    if blob is not None:
        series: dict[str, Series] = blob["series"]
        conc: dict[str, list[Concurrent]] = blob["concurrent"]
        direct = series["direct"]
        lines += [
            f"blob {human_size(bench.size)} ({bench.size} bytes) {bench.digest}; {args.repeat} round(s), medians; "
            "client: curl; CPU = the process tree's utime+stime per GiB of blob",
            "",
            f"{'one client':<28} {'MiB/s':>8} {'TTFB ms':>8} {'vs direct':>9} {'proxy CPU s/GiB':>16} "
            f"{'upstream CPU s/GiB':>19} {'machine CPU s/GiB':>18}",
            f"{'-' * 28} {'-' * 8} {'-' * 8} {'-' * 9} {'-' * 16} {'-' * 19} {'-' * 18}",
        ]
        for key in ["direct", *(f"{k} {p}" for k in PROXIES for p in ("cold", "warm"))]:
            s = series[key]
            label = LABELS["direct"] if key == "direct" else f"{LABELS[key.split()[0]]}, {key.split()[1]}"
            lines.append(f"{label:<28} {fmt(s.mib_s, '.1f', 8)} {fmt(s.ttfb_ms, '.1f', 8)} "
                         f"{fmt(ratio(s.mib_s, direct.mib_s), '.2f', 8)}x {fmt(s.proxy_cpu_gib, '.3f', 16)} "
                         f"{fmt(s.upstream_cpu_gib, '.3f', 19)} {fmt(s.machine_cpu_gib, '.3f', 18)}")
        clients = args.clients
        lines += [
            "",
            f"{f'{clients} cold clients at once':<28} {'aggr MiB/s':>10} {'slowest':>8} {'proxy CPU s/GiB':>16} "
            f"{'s/GiB of blob':>13} {'upstream s/GiB blob':>19} {'machine CPU s/GiB':>18}  caches (last round)",
            f"{'-' * 28} {'-' * 10} {'-' * 8} {'-' * 16} {'-' * 13} {'-' * 19} {'-' * 18}  {'-' * 19}",
        ]
        conc_medians: dict[str, dict[str, float | None]] = {}
        for kind in PROXIES:
            runs = conc[kind]
            m = {"aggregate_mib_s": median(r.aggregate_mib_s for r in runs),
                 "slowest_client_mib_s": median(r.slowest_mib_s for r in runs),
                 "proxy_cpu_s_per_gib_delivered": median(r.cpu_per_gib_delivered for r in runs),
                 "proxy_cpu_s_per_gib_blob": median(r.cpu_per_gib_blob for r in runs),
                 "upstream_cpu_s_per_gib_blob": median(r.upstream_cpu_per_gib_blob for r in runs),
                 "machine_cpu_s_per_gib_delivered": median(r.machine_cpu_per_gib_delivered for r in runs)}
            conc_medians[kind] = m
            lines.append(f"{LABELS[kind]:<28} {fmt(m['aggregate_mib_s'], '.1f', 10)} "
                         f"{fmt(m['slowest_client_mib_s'], '.1f', 8)} "
                         f"{fmt(m['proxy_cpu_s_per_gib_delivered'], '.3f', 16)} "
                         f"{fmt(m['proxy_cpu_s_per_gib_blob'], '.3f', 13)} "
                         f"{fmt(m['upstream_cpu_s_per_gib_blob'], '.3f', 19)} "
                         f"{fmt(m['machine_cpu_s_per_gib_delivered'], '.3f', 18)}  {runs[-1].caches if runs else ''}")
        lines.append("(proxy and machine CPU s/GiB: per GiB delivered to the clients; s/GiB of blob: the proxy's CPU "
                     "per GiB of the blob; every client verified)")

        def m_of(key: str, attr: str) -> float | None:
            value: float | None = getattr(series[key], attr)
            return value

        cold_cpu = ratio(m_of("mirror cold", "proxy_cpu_gib"), m_of("nginx cold", "proxy_cpu_gib"))
        cold_mibs = ratio(m_of("mirror cold", "mib_s"), m_of("nginx cold", "mib_s"))
        warm_direct = ratio(m_of("mirror warm", "mib_s"), direct.mib_s)
        warm_cpu = m_of("mirror warm", "proxy_cpu_gib")
        conc_ratio = ratio(conc_medians["mirror"]["aggregate_mib_s"], conc_medians["nginx"]["aggregate_mib_s"])
        targets += [
            target("cold: mirror CPU/GiB / nginx CPU/GiB", cold_cpu, f"<= {TARGET_COLD_CPU_VS_NGINX}x",
                   cold_cpu is not None and cold_cpu <= TARGET_COLD_CPU_VS_NGINX),
            target("cold: mirror MiB/s / nginx MiB/s", cold_mibs, f">= {TARGET_COLD_MIBS_VS_NGINX}x",
                   cold_mibs is not None and cold_mibs >= TARGET_COLD_MIBS_VS_NGINX),
            target("warm: mirror MiB/s / direct MiB/s", warm_direct, f">= {TARGET_WARM_VS_DIRECT}x",
                   warm_direct is not None and warm_direct >= TARGET_WARM_VS_DIRECT),
            target("warm: mirror CPU s/GiB", warm_cpu, f"<= {TARGET_WARM_CPU_S_GIB}",
                   warm_cpu is not None and warm_cpu <= TARGET_WARM_CPU_S_GIB, unit="s/GiB"),
            target(f"{clients} cold clients: mirror / nginx aggregate", conc_ratio,
                   f">= {TARGET_CONCURRENT_VS_NGINX}x",
                   conc_ratio is not None and conc_ratio >= TARGET_CONCURRENT_VS_NGINX),
        ]
        out["blob"] = {"size": bench.size, "digest": bench.digest, "repository": REPOSITORY,
                       "series": {k: s.as_json() for k, s in series.items()},
                       "concurrent": {k: {"medians": {mk: rnd(mv, 3) for mk, mv in conc_medians[k].items()},
                                          "runs": [r.as_json() for r in conc[k]]} for k in PROXIES}}

    if small is not None:
        results: dict[str, dict[str, list[WrkResult]]] = small["results"]
        lines += [
            "",
            f"small requests: wrk -t2 -c32 -d{args.seconds}s --latency, {args.repeat} round(s), medians; "
            "proxies warm",
            f"{'request':<24} {'upstream':>20} {'distribution proxy':>20} {'mirror':>20} {'mirror/dist':>11} "
            f"{'mirror/upstr':>12}",
            f"{'-' * 24} {'-' * 20} {'-' * 20} {'-' * 20} {'-' * 11} {'-' * 12}",
        ]
        small_json: dict[str, Any] = {}
        for name, by in results.items():
            med = {t: (median(r.rate for r in runs), median(r.p99_ms for r in runs)) for t, runs in by.items()}
            cells = [f"{med[t][0] or 0:>7.0f}/s p99 {med[t][1] or 0:>6.1f}ms" for t in ("upstream", "distribution",
                                                                                      "mirror")]
            vs_dist = ratio(med["mirror"][0], med["distribution"][0])
            vs_up = ratio(med["mirror"][0], med["upstream"][0])
            lines.append(f"{name:<24} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} {fmt(vs_dist, '.2f', 10)}x "
                         f"{fmt(vs_up, '.2f', 11)}x")
            small_json[name] = {
                "path": small["paths"][name],
                "medians": {t: {"requests_per_s": rnd(r, 1), "p99_ms": rnd(p, 3)} for t, (r, p) in med.items()},
                "mirror_vs_distribution": rnd(vs_dist, 3), "mirror_vs_upstream": rnd(vs_up, 3),
                "runs": {t: [asdict(r) for r in runs] for t, runs in by.items()}}
            if name == "manifest by tag":
                targets += [
                    target("manifest by tag: mirror / distribution proxy", vs_dist,
                           f">= {TARGET_TAG_VS_DISTRIBUTION:g}x",
                           vs_dist is not None and vs_dist >= TARGET_TAG_VS_DISTRIBUTION),
                    target("manifest by tag: mirror / upstream", vs_up, f">= {TARGET_TAG_VS_UPSTREAM:g}x",
                           vs_up is not None and vs_up >= TARGET_TAG_VS_UPSTREAM),
                ]
            p99 = med["mirror"][1]
            targets.append(target(f"{name}: mirror p99", p99, f"< {TARGET_P99_MS:g}", p99 is not None
                                  and p99 < TARGET_P99_MS, unit="ms"))
        out["small"] = small_json

    lines += ["", f"{'target':<46} {'value':>10} {'goal':>9} {'result':>7}",
              f"{'-' * 46} {'-' * 10} {'-' * 9} {'-' * 7}"]
    for t in targets:
        value = "-" if t["value"] is None else (f"{t['value']:.2f}x" if t["unit"] == "x" else
                                                 f"{t['value']:.3f}" if t["unit"] == "s/GiB" else f"{t['value']:.1f}")
        result = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"{t['name']:<46} {value:>10} {t['goal']:>9} {result:>7}")
    if bench.file_wait_disabled:
        lines += ["", f"WARNING: the blob's file was not found where expected for {sorted(bench.file_wait_disabled)}; "
                  "their CPU readings relied on the quiet wait alone"]
    changed = source_state() != bench.source
    if changed:
        lines += ["", "WARNING: the mirror's sources changed on disk during the run; figures may mix versions"]
    elapsed = time.monotonic() - bench.started
    lines += ["", f"run time {elapsed:.0f}s"]
    print("\n".join(lines), flush=True)
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "options": {"size": bench.size, "repeat": args.repeat, "clients": args.clients, "seconds": args.seconds,
                    "only": args.only, "seed": args.seed, "prime": args.prime},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "clk_tck": CLK_TCK, "loadavg_start": list(bench.load_at_start), "loadavg_end": list(load_end)},
        "source": bench.source,
        "source_changed_during_run": changed,
        "elapsed_s": round(elapsed, 1),
        "file_wait_disabled": sorted(bench.file_wait_disabled),
        **out,
        "targets": targets,
        "all_met": all(t["met"] for t in targets),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("256MiB"),
                        help="blob size, e.g. 256MiB (default), 1GiB, 500MB")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    parser.add_argument("--clients", type=int, default=10, help="clients in the concurrent cold pull (default 10)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--only", choices=("blob", "small"), default=None, help="run only this part")
    parser.add_argument("--seed", type=int, default=1, help="seed of the blob's pseudo-random bytes")
    parser.add_argument("--no-prime", dest="prime", action="store_false",
                        help="do not free pages before each cold pull (see the docstring)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "proxies.json",
                        help="where to write the JSON (default bench/results/proxies.json)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, caches)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.clients < 1 or args.seconds < 1:
        parser.error("--repeat, --clients and --seconds must be at least 1")
    return args


def _terminate(signum: int, frame: object) -> None:
    log(f"terminated by signal {signum}; stopping everything")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needed = {"docker-registry": find_registry_binary(), "curl": CURL if os.path.exists(CURL) else None}
    if args.only != "small":
        needed["nginx"] = NGINX if os.path.exists(NGINX) else None
    if args.only != "blob":
        needed["wrk"] = WRK if os.path.exists(WRK) else None
    missing = [name for name, path in needed.items() if path is None]
    if missing:
        log(f"missing: {', '.join(missing)} (apt-get install docker-registry curl nginx-light wrk)")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        bench = Bench(args)
    except FileNotFoundError as exc:
        log(str(exc))
        return 2
    try:
        bench.start_upstream()
        blob = small = None
        if args.only != "small":
            bench.push_blob()
            blob = bench.run_blob()
        if args.only != "blob":
            small = bench.run_small()
        results = report(bench, blob, small)
    except (BenchError, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        log(f"benchmark failed: {exc}")
        for proxy in bench.proxies[-3:]:
            tail = proxy.log_tail()
            if tail.strip() and tail != "<no log>":
                log(f"{proxy.kind} log tail ({proxy.workdir.name}):\n{tail}")
        return 2
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        bench.cleanup()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.output}")
    if not results["all_met"]:
        print("at least one target was missed")
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
