"""Hostile input: odd names, references, `ns` values and paths, abusive ranges and headers, and
slow or greedy clients. Each gets a clear 4xx or a closed connection; none a 5xx; none reaches
the upstream or touches anything outside the cache directory. Property-based tests drive the
router and the parsers with generated input on a bounded budget."""

from __future__ import annotations

import asyncio
import contextlib
import string
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from mirror.config import Config, UpstreamConfig
from mirror.errors import MirrorError
from mirror.oci import MAX_NAME_LENGTH, Digest, Reference, parse_name, parse_tag
from mirror.routing import Endpoint, Router
from mirror.storage import DiskStore
from tests.conftest import Counting, Mirror, MirrorFactory, Registry
from tests.support.pulls import exchange
from tests.support.served import Served

TIMEOUT = 30.0
ACCEPT = "application/vnd.oci.image.manifest.v1+json"
LONG = "a" * (MAX_NAME_LENGTH + 1)


@pytest.mark.parametrize(("path", "status"), [
    ("/v2/library/%00alpine/manifests/latest", 400),
    ("/v2/library/alpine%00/manifests/latest", 400),
    ("/v2/library/alpine/manifests/latest%00", 404),
    ("/v2/library/alpine/manifests/%2e%2e", 404),
    ("/v2/library/alpine/manifests/..", 404),
    ("/v2/library/alpine/manifests/latest%2f..%2f..", 404),
    ("/v2/library/alpine/manifests/sha256:..%2f..%2fetc%2fpasswd", 404),
    ("/v2/library/alpine/manifests/sha256:totallywrong", 400),
    ("/v2/..%2f..%2fetc/passwd/manifests/latest", 400),
    ("/v2/library/%2e%2e/%2e%2e/manifests/latest", 400),
    ("/v2/library/%252e%252e/manifests/latest", 400),
    ("/v2/library/alpine/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 404),
    ("/v2/library/alpine/blobs/sha256:" + "A" * 64, 400),
    ("/v2/library/alpine/blobs/sha256:" + "a" * 63, 400),
    ("/v2/library/alpine/blobs/sha256:" + "a" * 65, 400),
    ("/v2/library/alpine/manifests/" + "t" * 129, 404),
    ("/v2/library/alpine/manifests/" + "t" * 200, 404),
    ("/v2/library/alpine/manifests/-leading-dash", 404),
    (f"/v2/library/{LONG}/manifests/latest", 400),
    (f"/v2/{'a/' * 300}b/manifests/latest", 404),
    ("/v2/library\\alpine/manifests/latest", 400),
    ("/v2/library/alpine%C3%A9/manifests/latest", 400),
    ("/v2//alpine/manifests/latest", 400),
    ("/v2/library/alpine/manifests/latest?ns=..%2f..", 403),
    ("/v2/library/alpine/manifests/latest?ns=%00", 403),
    ("/v2/library/alpine/manifests/latest?ns=" + "x" * 5000, 403),
    ("/v2/library/alpine/manifests/latest?ns=http://evil.example/", 403),
    ("/v2/evil.example/x/manifests/latest", 403),
    ("/v2/127.0.0.1:22/x/manifests/latest", 403),
    ("/..%2f..%2fetc/v2/library/alpine/manifests/latest", 404),
    ("/v2/library/alpine/tags/list?n=-1", 400),
    ("/v2/library/alpine/tags/list?n=1e9", 400),
    ("/v2/library/alpine/tags/list?n=99999999999999999999", 400),
    ("/v2/library/alpine/tags/list?last=..%2f..", 400),
])
async def test_hostile_paths_get_a_clear_4xx_and_reach_nothing(
        path: str, status: int, make_mirror: MirrorFactory, counting: Counting, client: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    mirror = await make_mirror({"docker.io": counting.url}, cache_dir=tmp_path / "cache")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    async with client.get(URL(f"{mirror.url}{path}", encoded=True), headers={"Accept": ACCEPT}) as response:
        assert response.status == status
        body = await response.json()
        assert set(body["errors"][0]) == {"code", "message", "detail"}
    assert counting.count() == 0, "hostile input reached the upstream"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("range_header", [
    "bytes=" + ",".join(f"{i}-{i}" for i in range(200)),
    "bytes=99999999999999999999999-",
    "bytes=-99999999999999999999999",
    "bytes=5-2",
    "bytes=-0",
    "bytes=0-0, 0-0",
    "bytes=" + "9" * 5000 + "-",
    "pages=0-10",
    "bytes=\u00bd-1",
])
@pytest.mark.parametrize("cached", [False, True])
async def test_range_abuse_gets_the_blob_a_range_or_416(
        range_header: str, cached: bool, make_mirror: MirrorFactory, registry: Registry, counting: Counting,
        client: aiohttp.ClientSession) -> None:
    image = registry.images["single"]
    digest, data = next((d, b) for d, b in image.blobs.items() if len(b) > 1000)
    mirror = await make_mirror({"docker.io": counting.url})
    url = f"{mirror.url}/v2/{image.name}/blobs/{digest}"
    if cached:
        async with client.get(url) as response:
            assert await response.read() == data
        await mirror.services.background.join()
    async with client.get(url, headers={"Range": range_header}) as response:
        body = await response.read()
        assert response.status in (200, 206, 416), response.status
        if response.status == 200:
            assert body == data
        elif response.status == 206:
            start, _, end = response.headers["Content-Range"].removeprefix("bytes ").partition("/")[0].partition("-")
            assert body == data[int(start):int(end) + 1]
    await mirror.services.background.join()
    async with client.get(url) as response:
        assert await response.read() == data, "the cache holds the whole, right blob"


# Raw HTTP: what aiohttp's parser refuses before any handler runs.


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    config = tmp_path / "config.yaml"
    config.write_text("connections: {header_timeout: 0.5s, keepalive_timeout: 60s, max: 4}\n")
    mirror = await Served.start("--config", config, "--cache-dir", tmp_path / "cache",
                                "--upstream", "docker.io=http://127.0.0.1:9")
    yield mirror
    await mirror.terminate()


@pytest.mark.parametrize("request_bytes", [
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
    b"GET /v2/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    "GET /v2/library/alpine\u00e9/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
])
async def test_malformed_or_oversized_requests_get_400_or_a_closed_connection(
        served: Served, request_bytes: bytes) -> None:
    answer = await exchange(served.host, request_bytes)
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400", b"HTTP/1.1 505")), answer[:200]
    assert (await exchange(served.host, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            ).startswith(b"HTTP/1.1 200"), "the mirror still serves"


async def test_slow_and_silent_clients_are_cut_off(served: Served) -> None:
    address, _, port = served.host.rpartition(":")
    silent = await asyncio.open_connection(address, int(port))
    slow = await asyncio.open_connection(address, int(port))
    slow[1].write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        # A slowloris client: one header line at a time, forever.
        for i in range(200):
            await asyncio.sleep(0.05)
            slow[1].write(b"X-%d: y\r\n" % i)

    dripping = asyncio.create_task(trickle())
    try:
        for reader, _ in (silent, slow):
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b"", "closed without an answer"
    finally:
        dripping.cancel()
        for _, writer in (silent, slow):
            writer.close()
    await served.wait_for("request head took over 0.5s")


async def test_connections_past_the_limit_are_refused(served: Served) -> None:
    address, _, port = served.host.rpartition(":")
    held = []
    for _ in range(4):  # keep-alive connections, each proven accepted by a full exchange
        reader, writer = await asyncio.open_connection(address, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        held.append((reader, writer))
    assert await exchange(served.host, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    await served.wait_for("refusing connections: 4 are open")
    for _, writer in held:
        writer.close()


# Property-based: the router and the parsers take any string without a crash, and what they
# accept is safe to use as a name, a tag or a path under the cache.

ROUTER = Router(Config(default_upstream="docker.io", path_prefix="/mirror", upstreams=(
    UpstreamConfig(name="docker.io", url="http://127.0.0.1:9", aliases=("hub",), library_prefix=True),
    UpstreamConfig(name="ghcr.io", url="http://127.0.0.1:9"))))
SEGMENTS = st.sampled_from(["v2", "library", "alpine", "manifests", "blobs", "tags", "list", "uploads", "ghcr.io",
                            "hub", "..", ".", "", "mirror", "latest", "sha256:" + "a" * 64, "docker.io", "%2e",
                            "\x00", "a" * 300])
PATHS = st.one_of(st.text(max_size=600), st.lists(st.one_of(SEGMENTS, st.text(max_size=20)), max_size=12).map(
    lambda parts: "/" + "/".join(parts)))
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(path=PATHS, ns=st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["docker.io", "ghcr.io", "hub"])))
def test_router_accepts_only_safe_routes(path: str, ns: str | None) -> None:
    try:
        named, api = ROUTER.locate(path)
        route = ROUTER.resolve(api, ns, named) if api else None
    except MirrorError as error:
        assert 400 <= error.status < 500
        return
    if route is None:
        return
    assert parse_name(route.name) == route.name and len(route.name) <= MAX_NAME_LENGTH
    assert not {"..", ".", ""} & set(route.name.split("/"))
    assert "\x00" not in route.name and "\\" not in route.name
    assert route.upstream.name in ("docker.io", "ghcr.io")
    if route.endpoint is Endpoint.BLOB:
        assert route.reference is not None and route.reference.digest is not None


@FUZZ
@given(value=st.one_of(st.text(max_size=300), st.text(alphabet=string.hexdigits + "sha256:", max_size=80)))
def test_references_and_digests_parse_or_refuse(value: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    try:
        reference = Reference.parse(value)
    except MirrorError as error:
        # A bad digest is the client's error; any other non-tag names a manifest that cannot exist.
        assert (error.code, error.status) == (("DIGEST_INVALID", 400) if ":" in value else ("MANIFEST_UNKNOWN", 404))
    else:
        assert (reference.tag is None) != (reference.digest is None)
        if reference.tag is not None:
            assert reference.tag == value and "/" not in value and len(value) <= 128
    try:
        tag = parse_tag(value)
    except MirrorError as error:
        assert (error.code, error.status) == ("TAG_INVALID", 400)
    else:
        assert tag == value and not {"/", ":", "\\", "\x00"} & set(value) and not value.startswith(".")
        assert len(value) <= 128
    try:
        digest = Digest.parse(value)
    except MirrorError as error:
        assert error.status == 400
    else:
        root = Path("/cache-root")
        path = DiskStore(root).path(digest)
        assert path.resolve().is_relative_to(root / "blobs") and digest.hex in path.name


@pytest.fixture
async def unreachable(make_mirror: MirrorFactory) -> Mirror:
    """A mirror whose upstream refuses connections: whatever gets through costs nothing."""
    return await make_mirror({"docker.io": "http://127.0.0.1:9"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=PATHS.filter(lambda p: p.isprintable() and p.isascii()))
async def test_any_path_gets_oci_json_below_500(path: str, unreachable: Mirror,
                                                 client: aiohttp.ClientSession) -> None:
    mirror = unreachable
    url = URL(mirror.url + "/" + path.lstrip("/").replace(" ", "%20").replace("#", "%23").replace("?", "%3F"),
              encoded=True)
    async with client.get(url, headers={"Accept": ACCEPT}) as response:
        assert response.status < 500 or response.status == 503, (path, response.status)
        if response.status >= 400:
            assert "errors" in await response.json()
