"""Small cached responses per second: the mirror against the registry it mirrors, on loopback.

What a cluster's pulls mostly are: manifest lookups by tag and by digest, and small blobs
(configs). Each is measured with wrk (Debian's `wrk`) against the real registry (CNCF
distribution, the reference: a Go server reading its own storage) and against `mirror serve`
with the content cached (every request a HIT), with and without client authentication (a
Bearer token from the mirror's own token service on every request). The ratio mirror/registry
is the figure; on a 2-vCPU machine wrk, the server and the mirror share the cores, so absolute
rates are low and noisy. Nothing leaves 127.0.0.1.

    .venv/bin/python bench/request_rate.py [--seconds 8] [--connections 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import bcrypt

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.support.images import populate  # noqa: E402
from tests.support.registry import LocalRegistry, find_registry_binary, free_port  # noqa: E402

ACCEPT = ("application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))




def fetch(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": ACCEPT, **(headers or {})})
    with _OPENER.open(request, timeout=30) as response:
        return bytes(response.read())


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str]) -> tuple[float, float]:
    """(requests per second, p99 latency in ms) from wrk, which must see no errors."""
    flags = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", *flags, url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return rate, float(p99.group(1)) * scale


class Mirror:
    def __init__(self, directory: Path, upstream: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(REPO_ROOT / ".venv" / "bin" / "mirror"), "serve", "--listen", f"127.0.0.1:{self.port}",
             "--cache-dir", str(directory / "cache"), "--upstream", f"docker.io={upstream}",
             "--log-level", "warning", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                _OPENER.open(f"{self.url}/healthz", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mirror serve did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None or find_registry_binary() is None:
        sys.exit("needs wrk and docker-registry: apt-get install wrk docker-registry")

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        htpasswd = root / "htpasswd"
        htpasswd.write_text(f"bench:{bcrypt.hashpw(b'bench-pw', bcrypt.gensalt()).decode()}\n")
        htpasswd.chmod(0o600)
        with LocalRegistry(root / "registry", binary=find_registry_binary()) as registry:
            image = populate(registry.url)["single"]
            config = json.loads(image.manifest)["config"]["digest"]
            paths = {"manifest by tag": f"/v2/{image.name}/manifests/{image.tag}",
                     "manifest by digest": f"/v2/{image.name}/manifests/{image.digest}",
                     f"blob ({len(image.blobs[config])} B config)": f"/v2/{image.name}/blobs/{config}"}
            results: dict[str, dict[str, tuple[float, float]]] = {}
            for label, extra, login in (("open", (), False), ("with auth", ("--htpasswd", str(htpasswd)), True)):
                mirror = Mirror(root / label.replace(" ", "-"), registry.url, *extra)
                try:
                    headers: dict[str, str] = {}
                    if login:
                        basic = base64.b64encode(b"bench:bench-pw").decode()
                        token = json.loads(fetch(f"{mirror.url}/token", {"Authorization": f"Basic {basic}"}))["token"]
                        headers = {"Authorization": f"Bearer {token}"}
                    for name, path in paths.items():
                        assert fetch(f"{mirror.url}{path}", headers) == fetch(f"{registry.url}{path}")
                        time.sleep(0.1)  # let the first fill settle; then every request is a HIT
                        results.setdefault(name, {})["registry"] = wrk(
                            f"{registry.url}{path}", args.seconds, args.connections, {"Accept": ACCEPT})
                        results[name][f"mirror {label}"] = wrk(
                            f"{mirror.url}{path}", args.seconds, args.connections, {"Accept": ACCEPT, **headers})
                finally:
                    mirror.stop()

    print(f"{'request':32} {'registry':>16} {'mirror open':>22} {'mirror with auth':>22}")
    for name, by in results.items():
        reference = by["registry"][0]
        cells = [f"{by['registry'][0]:8.0f}/s p99 {by['registry'][1]:5.1f}ms"]
        for label in ("mirror open", "mirror with auth"):
            rate, p99 = by[label]
            cells.append(f"{rate:7.0f}/s {rate / reference:4.2f}x p99 {p99:5.1f}ms")
        print(f"{name:32} " + "  ".join(cells))


if __name__ == "__main__":
    main()
