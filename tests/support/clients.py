"""Real registry clients (dockerd, containerd with ctr, podman, skopeo) run in a private mount
namespace whose `/etc/hosts` and `resolv.conf` send every public registry host to 127.0.0.1.

Docker and containerd fall back to the real registry when a mirror fails; inside the sandbox
that fallback dies with "connection refused" on loopback instead of reaching the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_HOSTS = (
    "docker.io", "index.docker.io", "registry-1.docker.io", "registry.docker.io", "auth.docker.io",
    "production.cloudflare.docker.com", "ghcr.io", "pkg-containers.githubusercontent.com", "quay.io",
    "cdn.quay.io", "cdn01.quay.io", "gcr.io", "k8s.gcr.io", "registry.k8s.io", "mcr.microsoft.com",
    "public.ecr.aws", "nvcr.io", "registry.gitlab.com", "docker.elastic.co",
)
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_START_TIMEOUT = 60.0
_RUN_TIMEOUT = 180.0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class ClientError(AssertionError):
    pass


class Sandbox:
    """Runs programs in their own mount namespace with loopback-only name resolution."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.hosts = directory / "hosts"
        self.hosts.write_text("127.0.0.1 localhost " + " ".join(REGISTRY_HOSTS) + "\n::1 localhost\n")
        self.resolv = directory / "resolv.conf"
        self.resolv.write_text("nameserver 127.0.0.1\n")
        self.env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
        self.env["PATH"] = system_path()

    def command(self, *argv: str) -> list[str]:
        script = 'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                str(self.hosts), str(self.resolv), *argv]

    async def run(self, *argv: str, env: dict[str, str] | None = None, check: bool = True) -> Result:
        process = await asyncio.create_subprocess_exec(
            *self.command(*argv), env={**self.env, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), _RUN_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ClientError(f"{' '.join(argv)} did not finish in {_RUN_TIMEOUT:.0f} s") from None
        result = Result(process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise ClientError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    async def start(self, *argv: str, ready: str) -> Daemon:
        process = await asyncio.create_subprocess_exec(
            *self.command(*argv), env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        daemon = Daemon(argv[0], process)
        await daemon.wait_for(ready)
        return daemon


@dataclass
class Daemon:
    """A long-running client daemon; its log is drained all along (a full pipe would stall it)
    and kept for failure messages."""

    name: str
    process: asyncio.subprocess.Process
    log: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _marker: str = ""
    _ready: bool = False

    async def wait_for(self, marker: str) -> None:
        self._marker = marker
        self._drain = asyncio.create_task(self._read())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), _START_TIMEOUT)
        if not self._ready:
            await self.stop()
            raise ClientError(f"{self.name} did not start:\n" + "".join(self.log[-40:]))

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := (await self.process.stdout.readline()).decode(errors="replace"):
            self.log.append(line)
            if self._marker in line:
                self._ready = True
                self._done.set()
        self._done.set()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
        with contextlib.suppress(ProcessLookupError):
            # Children (dockerd's own containerd) go with the session.
            os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()
        if self._drain is not None:
            await self._drain


def system_path() -> str:
    """PATH with the sbin directories, where Debian puts dockerd."""
    path = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    return os.pathsep.join([*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)])


def short_directory() -> Path:
    """Unix socket paths are limited to 107 bytes; pytest's temporary paths can be longer."""
    return Path(tempfile.mkdtemp(prefix="mc-", dir="/tmp"))


class _Client:
    """A client with its data under `directory` and its sockets and run state under a short
    temporary directory, removed (with any daemon stopped) on exit."""

    def __init__(self, sandbox: Sandbox, directory: Path) -> None:
        self.sandbox = sandbox
        self.directory = directory
        self.runtime = short_directory()
        self.daemon: Daemon | None = None
        directory.mkdir(parents=True, exist_ok=True)

    async def __aexit__(self, *_: object) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)


class DockerDaemon(_Client):
    """`dockerd` with its own data, its own socket and no network set-up: it only pulls."""

    def __init__(self, sandbox: Sandbox, directory: Path, daemon_json: str) -> None:
        super().__init__(sandbox, directory)
        self.socket = f"unix://{self.runtime}/docker.sock"
        self.config = directory / "daemon.json"
        self.config.write_text(daemon_json)
        (directory / "client").mkdir(exist_ok=True)

    async def __aenter__(self) -> DockerDaemon:
        self.daemon = await self.sandbox.start(
            "dockerd", "--config-file", str(self.config), "--data-root", str(self.directory / "data"),
            "--exec-root", str(self.runtime / "exec"), "--pidfile", str(self.runtime / "pid"),
            "--host", self.socket, "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
            "--ip-masq=false", "--bridge=none", ready="API listen on")
        return self

    async def docker(self, *args: str, check: bool = True) -> Result:
        return await self.sandbox.run("docker", "--host", self.socket, *args, check=check,
                                      env={"DOCKER_CONFIG": str(self.directory / "client")})

    async def inspect(self, reference: str) -> dict[str, object]:
        return _first((await self.docker("image", "inspect", reference)).stdout)


CRI_NAMESPACE = "k8s.io"
"""The containerd namespace the CRI plugin keeps the kubelet's images in."""


class Containerd(_Client):
    """A `containerd` of its own, driven with `ctr`. Without `cri_hosts_dir` the CRI plugin is
    off; with it, the CRI plugin serves the kubelet's API on the same socket, reading registry
    hosts from that `certs.d`-style directory (`config_path`), as a Kubernetes node does.

    The configuration is version 2 (containerd 1.6 and 1.7; 2.x migrates it). CRI gets only what
    image pulls need: the `native` snapshotter (no overlayfs), empty CNI directories of its own
    (no pod network: it logs that and carries on) and its streaming server on loopback."""

    def __init__(self, sandbox: Sandbox, directory: Path, *, cri_hosts_dir: Path | None = None) -> None:
        super().__init__(sandbox, directory)
        self.address = str(self.runtime / "containerd.sock")
        self.config = directory / "config.toml"
        text = ("version = 2\n"
                f'root = "{directory / "root"}"\n'
                f'state = "{self.runtime / "state"}"\n')
        if cri_hosts_dir is None:
            text += 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        text += ("[grpc]\n"
                 f'  address = "{self.address}"\n'
                 "[ttrpc]\n"
                 f'  address = "{self.runtime / "ttrpc.sock"}"\n')
        if cri_hosts_dir is not None:
            cni = directory / "cni"
            for sub in ("bin", "net.d"):
                (cni / sub).mkdir(parents=True, exist_ok=True)
            cri = '[plugins."io.containerd.grpc.v1.cri"]'
            text += (f"{cri}\n"
                     '  stream_server_address = "127.0.0.1"\n'
                     '  stream_server_port = "0"\n'
                     f"{cri[:-1]}.containerd]\n"
                     '  snapshotter = "native"\n'
                     f"{cri[:-1]}.cni]\n"
                     f'  bin_dir = "{cni / "bin"}"\n'
                     f'  conf_dir = "{cni / "net.d"}"\n'
                     f"{cri[:-1]}.registry]\n"
                     f'  config_path = "{cri_hosts_dir}"\n')
        self.config.write_text(text)

    async def __aenter__(self) -> Containerd:
        self.daemon = await self.sandbox.start("containerd", "--config", str(self.config),
                                               ready="containerd successfully booted")
        return self

    async def ctr(self, *args: str, check: bool = True) -> Result:
        return await self.sandbox.run("ctr", "--address", self.address, *args, check=check)

    async def pull(self, reference: str, hosts_dir: Path, check: bool = True) -> Result:
        """Pull and unpack (so the runtime checks every layer against the config's diff_ids)."""
        return await self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native",
                              reference, check=check)

    async def snapshots(self, namespace: str | None = None) -> set[str]:
        """Keys of the unpacked layers (chain IDs), in ctr's namespace unless one is named."""
        listing = (await self.ctr(*_namespace(namespace), "snapshots", "--snapshotter", "native", "ls")
                   ).stdout.splitlines()[1:]
        return {line.split()[0] for line in listing}

    async def content(self, namespace: str | None = None) -> set[str]:
        listing = (await self.ctr(*_namespace(namespace), "content", "ls", "--quiet")).stdout
        return set(listing.split())


def _namespace(namespace: str | None) -> tuple[str, ...]:
    """ctr's global flag for a namespace (CRI_NAMESPACE for what the CRI plugin pulled)."""
    return () if namespace is None else ("--namespace", namespace)


class Podman(_Client):
    """Root `podman` with its own storage and the given registries.conf (the CRI-O mirror style:
    both read it through containers/image). No daemon: each command is a process."""

    def __init__(self, sandbox: Sandbox, directory: Path, registries_conf: Path) -> None:
        super().__init__(sandbox, directory)
        self.registries_conf = registries_conf

    async def __aenter__(self) -> Podman:
        return self

    async def podman(self, *args: str, check: bool = True) -> Result:
        return await self.sandbox.run(
            "podman", "--root", str(self.directory / "root"), "--runroot", str(self.runtime / "run"),
            "--tmpdir", str(self.runtime / "tmp"), "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", *args, check=check,
            env={"CONTAINERS_REGISTRIES_CONF": str(self.registries_conf)})

    async def inspect(self, reference: str) -> dict[str, object]:
        return _first((await self.podman("image", "inspect", reference)).stdout)


def _first(inspected: str) -> dict[str, object]:
    """The one image an `image inspect` of one reference describes."""
    info: list[dict[str, object]] = json.loads(inspected)
    return info[0]
