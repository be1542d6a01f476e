"""Start-up time of `mirror serve` on a large cache: the time from launching the process to
its "listening on" line, with N cached blobs (default 100,000).

Two cases: the index already knows every file (a normal restart), and the index is empty (it
is rebuilt from the files, as after losing it). Target: under 3 s for 100,000 blobs.
Loopback only; the upstream named is a closed port, since nothing is fetched.

    .venv/bin/python bench/startup.py [--blobs 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 3.0


def fill_cache(cache: Path, blobs: int) -> None:
    """`blobs` small published files, named by their sha256 as the store lays them out."""
    root = cache / "blobs" / "sha256"
    for i in range(blobs):
        data = i.to_bytes(8, "big") * 16
        digest = hashlib.sha256(data).hexdigest()
        shard = root / digest[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / digest).write_bytes(data)


def time_startup(cache: Path, port: int) -> float:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache),
         "--upstream", "docker.io=http://127.0.0.1:9"], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if "listening on" in line:
                return time.perf_counter() - started
        raise RuntimeError("mirror exited before listening")
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=5099)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mirror-startup-"))
    try:
        cache = workdir / "cache"
        started = time.perf_counter()
        fill_cache(cache, args.blobs)
        print(f"made {args.blobs} blobs in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        rebuild = time_startup(cache, args.port)       # empty index: every file is recorded
        restart = min(time_startup(cache, args.port) for _ in range(3))  # the index knows them all
        (cache / "index.db").unlink()
        for suffix in ("-wal", "-shm"):
            (cache / f"index.db{suffix}").unlink(missing_ok=True)
        rebuild = min(rebuild, time_startup(cache, args.port))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'case':<40} {'seconds':>8}")
    print(f"{'restart, index knows every blob':<40} {restart:>8.2f}")
    print(f"{'index rebuilt from the files':<40} {rebuild:>8.2f}")
    ok = max(restart, rebuild) < TARGET_SECONDS
    print(f"target < {TARGET_SECONDS:.0f} s for {args.blobs} blobs: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
