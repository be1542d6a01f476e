#!/usr/bin/env python3
"""Export and import of one image with one large layer, against `cp -r` of the same bytes on the
same disk and against skopeo, in one run.

It starts Debian's real registry on 127.0.0.1, pushes an image whose layer is `--size` bytes of
pseudo-random data (generated in pieces, never whole in memory), seeds a cache with
`mirror seed` (untimed), then, for `--repeat` interleaved rounds:

- export:        `mirror export IMAGE -o DIR` from the seeded cache (a fresh DIR each round);
- cp (export):   `cp -r` of the cache's blob tree to a fresh directory: the same bytes, same disk;
- cp+sync:       the same, then `sync -f` of the copy: the bytes on the disk, as export leaves them
                 (it fsyncs every file: a bundle must be on the stick before it is unplugged);
- skopeo export: `skopeo copy docker://REGISTRY/IMAGE oci:DIR` (a fresh DIR each round);
- import:        `mirror import DIR` into a fresh, empty cache (verifies sha256 and size, fsyncs);
- cp (import), cp+sync (import): `cp -r` of the exported layout to a fresh directory, then sync;
- skopeo import: `skopeo copy oci:DIR docker://REGISTRY/...` into a fresh, empty registry each
                 round (into the first one it would find every blob already there).

Each is timed wall-clock, with the CPU seconds of the process tree (from wait4's rusage), and
the medians are compared with the targets: export and import each at least 0.7x of cp's
throughput, and faster than skopeo. Results go to bench/results/airgap.json; the exit status is
1 if a target is missed. Only 127.0.0.1 is contacted.

    .venv/bin/python bench/airgap.py [--size 1GiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from blob_throughput import blob_chunks, blob_digest, human_size, parse_size  # noqa: E402

from tests.support.images import (  # noqa: E402
    OCI_CONFIG,
    OCI_MANIFEST,
    digest_of,
    push_blob,
    push_blob_stream,
    push_manifest,
)
from tests.support.registry import LocalRegistry, find_registry_binary  # noqa: E402

MIRROR = [sys.executable, "-m", "mirror"]
TARGET_VS_CP = 0.7


def run(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a command and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "airgap.json")
    args = parser.parse_args(argv)
    skopeo, registry_binary = shutil.which("skopeo"), find_registry_binary()
    if skopeo is None or registry_binary is None:
        print("needs skopeo and docker-registry: apt-get install skopeo docker-registry", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="airgap-bench-", dir=os.environ.get("BENCH_DIR")) as scratch:
        work = Path(scratch)
        with LocalRegistry(work / "registry", binary=registry_binary) as registry:
            layer_digest = blob_digest(args.size, 7)
            push_blob_stream(registry.url, "library/airgap", blob_chunks(args.size, 7), layer_digest, args.size)
            config = json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
            push_blob(registry.url, "library/airgap", config)
            manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": {"mediaType": OCI_CONFIG, "size": len(config),
                                              "digest": digest_of(config)},
                                   "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                               "size": args.size, "digest": layer_digest}]}).encode()
            push_manifest(registry.url, "library/airgap", "v1", manifest, OCI_MANIFEST)
            upstream = ["--upstream", f"docker.io={registry.url}"]
            cache = work / "cache"
            subprocess.run([*MIRROR, "seed", "airgap:v1", "--cache-dir", str(cache), *upstream], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in (
                "export", "cp (export)", "cp+sync (export)", "skopeo export",
                "import", "cp (import)", "cp+sync (import)", "skopeo import")}
            for round_ in range(args.repeat):
                bundle, copy, oci = work / "bundle", work / "cp", work / "oci"
                for path in (bundle, copy, oci):
                    drop(path)
                times["export"].append(run([*MIRROR, "export", "airgap:v1", "-o", str(bundle), "--json",
                                            "--cache-dir", str(cache), *upstream]))
                times["cp (export)"].append(run(["cp", "-r", str(cache / "blobs"), str(copy)]))
                drop(copy)
                times["cp+sync (export)"].append(run(["sh", "-c", 'cp -r "$1" "$2" && sync -f "$2"', "cp",
                                                      str(cache / "blobs"), str(copy)]))
                times["skopeo export"].append(run([skopeo, "copy", "--src-tls-verify=false",
                                                   f"docker://{registry.host}/library/airgap:v1",
                                                   f"oci:{oci}:v1"]))
                far, copy2 = work / "far", work / "cp2"
                for path in (far, copy2):
                    drop(path)
                times["import"].append(run([*MIRROR, "import", str(bundle), "--json", "--cache-dir", str(far)]))
                times["cp (import)"].append(run(["cp", "-r", str(bundle), str(copy2)]))
                drop(copy2)
                times["cp+sync (import)"].append(run(["sh", "-c", 'cp -r "$1" "$2" && sync -f "$2"', "cp",
                                                      str(bundle), str(copy2)]))
                with LocalRegistry(work / f"target{round_}", binary=registry_binary) as target:
                    times["skopeo import"].append(run([skopeo, "copy", "--dest-tls-verify=false", f"oci:{oci}:v1",
                                                       f"docker://{target.host}/library/airgap:v1"]))
                drop(work / f"target{round_}")
    medians = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    rate = {k: args.size / wall / (1 << 20) for k, (wall, _) in medians.items()}
    results: dict[str, Any] = {"size": args.size, "repeat": args.repeat, "medians": {
        k: {"wall_seconds": round(w, 3), "cpu_seconds": round(c, 3), "mib_per_second": round(rate[k], 1),
            "cpu_seconds_per_gib": round(c / (args.size / (1 << 30)), 3)} for k, (w, c) in medians.items()}}
    checks = {
        "export >= 0.7x cp": rate["export"] >= TARGET_VS_CP * rate["cp (export)"],
        "import >= 0.7x cp": rate["import"] >= TARGET_VS_CP * rate["cp (import)"],
        "export >= 0.7x cp+sync": rate["export"] >= TARGET_VS_CP * rate["cp+sync (export)"],
        "import >= 0.7x cp+sync": rate["import"] >= TARGET_VS_CP * rate["cp+sync (import)"],
        "export faster than skopeo": rate["export"] > rate["skopeo export"],
        "import faster than skopeo": rate["import"] > rate["skopeo import"],
    }
    results["ratios"] = {"export_vs_cp": round(rate["export"] / rate["cp (export)"], 2),
                         "import_vs_cp": round(rate["import"] / rate["cp (import)"], 2),
                         "export_vs_cp_sync": round(rate["export"] / rate["cp+sync (export)"], 2),
                         "import_vs_cp_sync": round(rate["import"] / rate["cp+sync (import)"], 2),
                         "export_vs_skopeo": round(rate["export"] / rate["skopeo export"], 2),
                         "import_vs_skopeo": round(rate["import"] / rate["skopeo import"], 2)}
    results["checks"] = checks
    print(f"{human_size(args.size)} layer, medians of {args.repeat} interleaved rounds")
    print(f"{'':18} {'wall s':>8} {'MiB/s':>8} {'CPU s':>8} {'CPU s/GiB':>10}")
    for key, (wall, cpu) in medians.items():
        print(f"{key:18} {wall:8.2f} {rate[key]:8.1f} {cpu:8.2f} {cpu / (args.size / (1 << 30)):10.2f}")
    print("ratios:", ", ".join(f"{k} {v}x" for k, v in results["ratios"].items()))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'} {name}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
