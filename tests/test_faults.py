"""Faults a real registry cannot produce on demand, against the scriptable fake upstream: the
token flow, a CDN on another origin, bytes that fail their digest, a connection cut mid-blob,
rate limits and 5xx (with stale-if-error), a trickling upstream, many clients on one download,
a client that walks away, Range requests, and the start-up sweep.

Nothing here sleeps to synchronise: the fake holds a blob at a byte offset until the test sets
an `asyncio.Event`, and `background.join()` waits for the mirror's own downloads. Every wait is
bounded by `asyncio.timeout` so a regression fails instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.config import TimeoutConfig
from mirror.oci import MANIFEST_MAX_BYTES, Digest
from tests.conftest import Mirror, MirrorFactory
from tests.support.fake_upstream import FakeUpstream, Forced
from tests.support.pulls import (
    ACCEPT,
    CACHE,
    NAME,
    OTHER,
    TIMEOUT,
    Clock,
    add_image,
    blob_url,
    fetch,
    manifest_url,
    pull_blob,
    pull_manifest,
)
from tests.support.registry import free_port

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stored_digest(mirror: Mirror, digest: str) -> str | None:
    """The sha256 of the store's file for `digest`, or None if the store has none."""
    path = mirror.services.store.local_path(Digest.parse(digest))
    assert path is not None
    return sha256(path.read_bytes()) if path.exists() else None


def tmp_files(mirror: Mirror) -> list[Path]:
    return sorted((mirror.services.config.cache_dir / "tmp").iterdir())


async def wait_for_signals(signals: Sequence[asyncio.Event], tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Until every signal is set; raises at once if a task fails first."""
    everything = asyncio.ensure_future(asyncio.gather(*(s.wait() for s in signals)))
    pending: set[asyncio.Future[Any]] = {everything, *tasks}
    try:
        async with asyncio.timeout(TIMEOUT):
            while not everything.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    if finished is not everything:
                        finished.result()
    finally:
        everything.cancel()


# 1. Token flow


async def test_bearer_token_is_fetched_once_per_repository_scope(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    fake.auth = "bearer"
    layers = [random.Random(n).randbytes(4096) for n in range(3)]
    image = add_image(fake, layers=layers)
    other = add_image(fake, OTHER, layers=[b"other layer"], seed=1)
    for tag in ("a", "b", "c", "d"):
        add_image(fake, tag=tag, seed=ord(tag))
    mirror = await make_mirror({"docker.io": fake.url})

    # Concurrent first requests all meet the 401 at once: still a single token request.
    results = await asyncio.gather(*(pull_manifest(client, mirror, NAME, tag) for tag in ("a", "b", "c", "d")))
    assert [r.status for r in results] == [200] * 4
    assert len(fake.token_requests) == 1

    manifest = await pull_manifest(client, mirror, NAME, "latest")
    assert manifest.status == 200 and manifest.body == image.manifest
    for digest in (image.config, *image.layers):
        blob = await pull_blob(client, mirror, NAME, digest)
        assert blob.status == 200 and blob.body == fake.blobs[digest]
    extra = fake.add_blob(b"not referenced by any manifest")
    head = await fetch(client, blob_url(mirror, NAME, extra), "HEAD")
    assert head.status == 200 and head.headers["Content-Length"] == "30"
    assert fake.count("GET", "blobs") == 4
    assert len(fake.token_requests) == 1
    assert fake.token_requests[0][1]["scope"] == f"repository:{NAME}:pull"

    # Another repository is another scope: exactly one more token.
    assert (await pull_manifest(client, mirror, OTHER, "latest")).body == other.manifest
    assert (await pull_blob(client, mirror, OTHER, other.layers[0])).body == b"other layer"
    assert len(fake.token_requests) == 2
    assert fake.token_requests[1][1]["scope"] == f"repository:{OTHER}:pull"
    # Anonymous: the token endpoint was asked without credentials.
    assert [header for header, _ in fake.token_requests] == [None, None]


async def test_bearer_credentials_go_to_the_token_realm_only(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    fake.auth = "bearer"
    fake.credentials = ("u", "p")
    image = add_image(fake, layers=[b"layer one"])
    mirror = await make_mirror({"docker.io": fake.url}, username="u", password="p")

    manifest = await pull_manifest(client, mirror, NAME, "latest")
    assert manifest.status == 200 and manifest.body == image.manifest
    blob = await pull_blob(client, mirror, NAME, image.layers[0])
    assert blob.status == 200 and blob.body == b"layer one"

    assert [header for header, _ in fake.token_requests] == [aiohttp.encode_basic_auth("u", "p")]
    sent = [a for a in fake.authorizations if a is not None]
    assert sent, "the registry never saw the token"
    assert all(a.startswith("Bearer ") for a in sent), sent
    # The client never sees anything of the mirror's credentials.
    for response in (manifest, blob):
        assert "WWW-Authenticate" not in response.headers
        assert not any("Basic" in value or "Bearer" in value for value in response.headers.values())


async def test_bearer_reauthenticates_when_the_upstream_forgets_its_token(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    fake.auth = "bearer"
    image = add_image(fake, layers=[b"first layer", b"second layer"])
    mirror = await make_mirror({"docker.io": fake.url})
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    assert (await pull_blob(client, mirror, NAME, image.layers[0])).body == b"first layer"
    assert len(fake.token_requests) == 1

    # The token expires (or is revoked) upstream before the mirror thinks it should.
    fake._tokens.clear()
    blob = await pull_blob(client, mirror, NAME, image.layers[1])
    assert blob.status == 200, blob.body
    assert blob.body == b"second layer"
    assert len(fake.token_requests) == 2


# 2. Basic auth


async def test_basic_auth_upstream(fake: FakeUpstream, make_mirror: MirrorFactory,
                                   client: aiohttp.ClientSession) -> None:
    fake.auth = "basic"
    fake.credentials = ("u", "p")
    image = add_image(fake, layers=[b"basic layer"])
    for tag in ("a", "b", "c"):
        add_image(fake, tag=tag, seed=ord(tag))
    mirror = await make_mirror({"docker.io": fake.url}, username="u", password="p")

    # Several first requests at once all meet the Basic challenge before any has answered it.
    results = await asyncio.gather(
        pull_manifest(client, mirror, NAME, "latest"),
        *(pull_manifest(client, mirror, NAME, tag) for tag in ("a", "b", "c")),
        pull_blob(client, mirror, NAME, image.layers[0]),
    )
    assert [r.status for r in results] == [200] * 5, [r.body[:200] for r in results]
    assert results[0].body == image.manifest
    assert results[-1].body == b"basic layer"
    assert fake.token_requests == []
    assert aiohttp.encode_basic_auth("u", "p") in fake.authorizations

    anonymous = await make_mirror({"docker.io": fake.url})
    refused = await pull_manifest(client, anonymous, NAME, "latest")
    assert refused.status == 403
    assert refused.error_code() == "DENIED"
    refused_blob = await pull_blob(client, anonymous, NAME, image.layers[0])
    assert refused_blob.status == 403
    assert refused_blob.error_code() == "DENIED"


# 3. CDN redirect


async def test_blob_redirect_to_cdn_carries_no_authorization(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    fake.auth = "bearer"
    fake.redirect_blobs = True
    data = random.Random(3).randbytes(3 * MiB + 17)
    image = add_image(fake, layers=[data])
    mirror = await make_mirror({"docker.io": fake.url})

    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    blob = await pull_blob(client, mirror, NAME, image.layers[0])
    assert blob.status == 200
    assert blob.body == data
    assert fake.cdn_requests == [None]
    # The registry itself did get the token: the redirect came after authentication.
    assert any(a is not None and a.startswith("Bearer ") for a in fake.authorizations)
    await mirror.services.background.join()
    assert stored_digest(mirror, image.layers[0]) == image.layers[0]


@pytest.fixture
async def third_host() -> AsyncIterator[tuple[str, list[str | None]]]:
    """Some other host on loopback, recording the Authorization of whatever reaches it."""
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"token": "stolen"})
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), seen
    await server.close()


async def test_challenge_from_a_redirect_target_gets_no_credentials(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        third_host: tuple[str, list[str | None]]) -> None:
    """A CDN the upstream redirects to may answer 401 and name a token service of its own: the
    mirror's credentials must not follow."""
    url, seen = third_host
    fake.auth, fake.credentials, fake.redirect_blobs = "bearer", ("u", "p"), True
    fake.cdn_challenge = f'Bearer realm="{url}/token",service="cdn"'
    image = add_image(fake, layers=[b"layer"])
    mirror = await make_mirror({"docker.io": fake.url}, username="u", password="p")
    # With a token already in hand, the blob GET goes straight to the redirect.
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    refused = await pull_blob(client, mirror, NAME, image.layers[0])
    assert refused.status == 403
    assert refused.error_code() == "DENIED"
    assert seen == [], "nothing may reach the host the CDN named"


async def test_credentials_go_only_to_a_trusted_token_realm(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        third_host: tuple[str, list[str | None]]) -> None:
    url, seen = third_host
    fake.auth, fake.credentials = "bearer", ("u", "p")
    fake.realm = f"{url}/token"
    add_image(fake, layers=[b"layer"])
    mirror = await make_mirror({"docker.io": fake.url}, username="u", password="p")
    refused = await pull_manifest(client, mirror, NAME, "latest")
    assert refused.status == 403
    assert b"untrusted token service" in refused.body
    assert seen == []


@pytest.mark.parametrize("body", [b'{"errors": null}', b"5", b"not json", b'{"errors": [1, {"code": 7}]}'])
async def test_odd_upstream_error_bodies_are_still_oci_errors(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, body: bytes) -> None:
    digest = "sha256:" + "1" * 64
    fake.forced[f"/v2/{NAME}/manifests/latest"] = Forced(404, body=body)
    fake.forced[f"/v2/{NAME}/blobs/{digest}"] = Forced(404, body=body)
    mirror = await make_mirror({"docker.io": fake.url})
    manifest = await pull_manifest(client, mirror, NAME, "latest")
    assert (manifest.status, manifest.error_code()) == (404, "MANIFEST_UNKNOWN")
    blob = await pull_blob(client, mirror, NAME, digest)
    assert (blob.status, blob.error_code()) == (404, "BLOB_UNKNOWN")


# 4. Wrong digest


async def test_blob_with_wrong_digest_is_never_delivered_nor_published(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(4).randbytes(2 * MiB + 5)
    digest = fake.add_blob(data)
    fake.corrupt = {digest}
    mirror = await make_mirror({"docker.io": fake.url})

    received = bytearray()
    status, cut = 0, False
    try:
        async with asyncio.timeout(TIMEOUT), client.get(blob_url(mirror, NAME, digest)) as response:
            status = response.status
            async for chunk in response.content.iter_any():
                received += chunk
    except aiohttp.ClientPayloadError:
        cut = True
    if status == 200:
        # Headers were out when the digest failed: the connection is cut one byte short (or
        # more), so the client sees fewer bytes than Content-Length and rejects the blob.
        assert cut, "the client received a complete body of bad content"
        assert len(received) < len(data)
    else:
        assert status in (502, 503), status
        assert json.loads(received)["errors"][0]["code"] == "UNAVAILABLE"
    await mirror.services.background.join()
    assert stored_digest(mirror, digest) is None
    assert tmp_files(mirror) == []

    fake.corrupt.clear()
    again = await pull_blob(client, mirror, NAME, digest)
    assert again.status == 200
    assert again.body == data
    assert again.headers[CACHE] == "MISS"
    await mirror.services.background.join()
    assert stored_digest(mirror, digest) == digest


async def test_blob_without_content_length_is_verified_too(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """An upstream that streams a blob chunked, without announcing its size: good content is
    served and cached; bad content is cut off before the end, since there is no length for the
    client to check against."""
    fake.chunked_blobs = True
    good = random.Random(41).randbytes(3 * MiB + 7)
    good_digest = fake.add_blob(good)
    bad = random.Random(42).randbytes(3 * MiB + 7)
    bad_digest = fake.add_blob(bad)
    fake.corrupt = {bad_digest}
    mirror = await make_mirror({"docker.io": fake.url})

    served = await pull_blob(client, mirror, NAME, good_digest)
    assert served.status == 200 and served.body == good

    with pytest.raises(aiohttp.ClientPayloadError):
        await pull_blob(client, mirror, NAME, bad_digest)
    await mirror.services.background.join()
    assert stored_digest(mirror, good_digest) == good_digest
    assert stored_digest(mirror, bad_digest) is None
    assert tmp_files(mirror) == []


async def test_manifest_with_wrong_digest_is_refused_and_not_cached(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    image = add_image(fake, layers=[b"layer"])
    fake.corrupt_manifests = {image.digest}
    mirror = await make_mirror({"docker.io": fake.url})

    for reference in ("latest", image.digest):
        refused = await pull_manifest(client, mirror, NAME, reference)
        assert refused.status == 502  # a bad gateway, not a crash
        assert refused.error_code() == "UNAVAILABLE"
        assert image.manifest not in refused.body
    assert stored_digest(mirror, image.digest) is None
    assert stored_digest(mirror, sha256(image.manifest + b"\n")) is None
    assert tmp_files(mirror) == []

    fake.corrupt_manifests.clear()
    good = await pull_manifest(client, mirror, NAME, "latest")
    assert good.status == 200
    assert good.headers[CACHE] == "MISS"  # nothing of the bad answer was remembered
    assert good.body == image.manifest
    assert good.headers["Docker-Content-Digest"] == image.digest


# 5. Dropped connection mid-blob


@pytest.mark.parametrize("ignore_range", [False, True], ids=["range", "range-ignored"])
async def test_dropped_upstream_connection_is_resumed(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, ignore_range: bool) -> None:
    data = random.Random(5).randbytes(5 * MiB + 321)
    digest = fake.add_blob(data)
    # The upstream pauses at 2 MiB, then cuts the connection at 3.5 MiB. The pause lets the test
    # know bytes reached the cache before the cut (the client has read some); without it, aiohttp
    # may still hold every byte unread when the cut arrives and then discards them all, and the
    # mirror rightly restarts from zero instead of resuming.
    gate = asyncio.Event()
    fake.gates[digest] = (2 * MiB, gate)
    drop = 3 * MiB + MiB // 2
    fake.drop_after = {digest: drop}
    fake.ignore_range = ignore_range
    mirror = await make_mirror({"docker.io": fake.url})

    async with asyncio.timeout(TIMEOUT), client.get(blob_url(mirror, NAME, digest)) as response:
        assert response.status == 200
        assert response.content_length == len(data)
        first = await response.content.readany()
        assert first
        gate.set()
        body = first + await response.read()
    assert body == data
    assert fake.count("GET", "blobs") == 2
    first_range, resume_range = fake.blob_ranges
    assert first_range is None
    assert resume_range is not None and resume_range.startswith("bytes=") and resume_range.endswith("-")
    resumed_at = int(resume_range.removeprefix("bytes=").removesuffix("-"))
    assert len(first) < resumed_at <= drop
    await mirror.services.background.join()
    assert stored_digest(mirror, digest) == digest
    assert tmp_files(mirror) == []


async def test_connection_dropped_before_the_first_byte_is_retried(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(50).randbytes(2 * MiB)
    digest = fake.add_blob(data)
    fake.drop_after = {digest: 0}  # headers, then nothing
    mirror = await make_mirror({"docker.io": fake.url})

    blob = await pull_blob(client, mirror, NAME, digest)
    assert blob.status == 200
    assert blob.body == data
    assert fake.blob_ranges == [None, None]  # nothing to resume from: asked again from the start
    await mirror.services.background.join()
    assert stored_digest(mirror, digest) == digest


# 6. Upstream errors


async def test_upstream_errors_become_oci_errors(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """Each failure on a mirror of its own, so that no breaker opened by one hides the next."""
    clock = Clock()
    cases = {"limited": (Forced(429, {"Retry-After": "7"}), 429, "TOOMANYREQUESTS"),
             "broken": (Forced(500), 503, "UNAVAILABLE"),
             "secret": (Forced(403), 403, "DENIED"),
             "gone": (Forced(401, {"WWW-Authenticate": 'Basic realm="upstream"'}), 403, "DENIED")}
    mirrors = {}
    for seed, (tag, (forced, status, code)) in enumerate(cases.items()):
        add_image(fake, tag=tag, seed=seed)
        fake.forced[f"/v2/{NAME}/manifests/{tag}"] = forced
        mirrors[tag] = mirror = await make_mirror({"docker.io": fake.url}, clock=clock)
        failed = await pull_manifest(client, mirror, NAME, tag)
        assert (failed.status, failed.error_code()) == (status, code)
        # A 401 reaches a client only with the mirror's own challenge; the upstream's never.
        assert "WWW-Authenticate" not in failed.headers
    assert (await pull_manifest(client, mirrors["limited"], NAME, "limited")).headers["Retry-After"] == "7"

    missing = await pull_blob(client, mirrors["broken"], NAME, sha256(b"nobody has this"))
    assert missing.status == 404
    assert missing.error_code() == "BLOB_UNKNOWN"

    unreachable = await make_mirror({"docker.io": f"http://127.0.0.1:{free_port()}"})
    for response in (await pull_manifest(client, unreachable, NAME, "latest"),
                     await pull_blob(client, unreachable, NAME, sha256(b"anything"))):
        assert response.status == 503
        assert response.error_code() == "UNAVAILABLE"
    # None of the failures was cached: once the upstream recovers and the backoffs are over,
    # the tags are served.
    fake.forced.clear()
    clock.advance(600)
    for tag, mirror in mirrors.items():
        assert (await pull_manifest(client, mirror, NAME, tag)).status == 200


# 7. Stale-if-error and tag freshness


@pytest.mark.parametrize("status", [500, 429])
async def test_cached_tag_is_served_stale_when_the_upstream_fails(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, status: int) -> None:
    image = add_image(fake)
    clock = Clock()
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=10, clock=clock, stale_while_revalidate=False)
    first = await pull_manifest(client, mirror, NAME, "latest")
    assert first.status == 200 and first.headers[CACHE] == "MISS"

    path = f"/v2/{NAME}/manifests/latest"
    fake.forced[path] = Forced(status, {"Retry-After": "30"} if status == 429 else {})
    heads_before = fake.requests[("HEAD", path)]
    clock.advance(11)
    for _ in range(2):
        stale = await pull_manifest(client, mirror, NAME, "latest")
        assert stale.status == 200
        assert stale.body == image.manifest
        assert stale.headers["Docker-Content-Digest"] == image.digest
        assert stale.headers[CACHE] == "STALE"
    # It did try, once: a failed check counts as a check until the TTL passes again.
    assert fake.requests[("HEAD", path)] == heads_before + 1
    # HEAD of the tag is served stale as well.
    head = await fetch(client, manifest_url(mirror, NAME, "latest"), "HEAD", {"Accept": ACCEPT})
    assert head.status == 200 and head.headers[CACHE] == "STALE"
    assert head.headers["Docker-Content-Digest"] == image.digest
    assert fake.requests[("HEAD", path)] == heads_before + 1
    # Past the TTL and the backoff, with the upstream well again: revalidated.
    fake.forced.clear()
    clock.advance(31)
    again = await pull_manifest(client, mirror, NAME, "latest")
    assert again.status == 200 and again.headers[CACHE] == "REVALIDATED"


async def test_tag_whose_digest_moved_is_fetched_again(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    old = add_image(fake)
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=0, stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).body == old.manifest

    unchanged = await pull_manifest(client, mirror, NAME, "latest")
    assert unchanged.body == old.manifest and unchanged.headers[CACHE] == "REVALIDATED"

    new = add_image(fake, seed=99)
    assert new.digest != old.digest
    moved = await pull_manifest(client, mirror, NAME, "latest")
    assert moved.status == 200
    assert moved.body == new.manifest
    assert moved.headers["Docker-Content-Digest"] == new.digest
    assert moved.headers[CACHE] == "MISS"
    # The old content is still reachable by digest, from the cache.
    by_digest = await pull_manifest(client, mirror, NAME, old.digest)
    assert by_digest.body == old.manifest and by_digest.headers[CACHE] == "HIT"


async def test_fresh_tag_is_served_without_asking_the_upstream(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    image = add_image(fake, layers=[b"fresh layer"])
    mirror = await make_mirror({"docker.io": fake.url})
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    assert (await pull_blob(client, mirror, NAME, image.layers[0])).body == b"fresh layer"
    await mirror.services.background.join()
    before = Counter(fake.requests)

    again = await pull_manifest(client, mirror, NAME, "latest")
    assert again.status == 200 and again.body == image.manifest and again.headers[CACHE] == "HIT"
    head = await fetch(client, manifest_url(mirror, NAME, "latest"), "HEAD", {"Accept": ACCEPT})
    assert head.status == 200 and head.headers["Docker-Content-Digest"] == image.digest
    blob = await pull_blob(client, mirror, NAME, image.layers[0])
    assert blob.body == b"fresh layer" and blob.headers[CACHE] == "HIT"
    assert fake.requests == before


# 8. Streaming a slow upstream


async def test_client_gets_bytes_before_the_upstream_has_finished(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(8).randbytes(8 * MiB)
    digest = fake.add_blob(data)
    gate = asyncio.Event()
    fake.gates[digest] = (MiB, gate)
    mirror = await make_mirror({"docker.io": fake.url})

    async with asyncio.timeout(TIMEOUT), client.get(blob_url(mirror, NAME, digest)) as response:
        assert response.status == 200
        assert response.content_length == len(data)
        first = await response.content.readany()
        assert first, "no body before the upstream finished"
        assert not gate.is_set()
        assert len(first) <= MiB and data.startswith(first)
        gate.set()
        rest = await response.read()
    assert first + rest == data


async def test_small_blob_streams_before_the_upstream_has_finished(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(81).randbytes(512 * 1024)
    digest = fake.add_blob(data)
    gate = asyncio.Event()
    fake.gates[digest] = (128 * 1024, gate)
    mirror = await make_mirror({"docker.io": fake.url})

    # Smaller than any sensible write buffer: the mirror must pass bytes on as they arrive,
    # not when it has collected "enough" (it would wait for the gate forever).
    async with asyncio.timeout(TIMEOUT), client.get(blob_url(mirror, NAME, digest)) as response:
        assert response.status == 200
        first = await response.content.readany()
        assert first and data.startswith(first)
        assert not gate.is_set()
        gate.set()
        assert first + await response.read() == data


# 9. Many clients, one download


async def test_twenty_clients_stream_one_download(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    clients = 20
    data = random.Random(1).randbytes(64 * MiB)
    expected = hashlib.sha256(data).hexdigest()
    digest = fake.add_blob(data)
    del data  # each client hashes as it reads; nothing holds 20 copies
    gate = asyncio.Event()
    fake.gates[digest] = (32 * MiB, gate)
    mirror = await make_mirror({"docker.io": fake.url})
    url = blob_url(mirror, NAME, digest)
    got_first = [asyncio.Event() for _ in range(clients)]

    async def pull(i: int) -> tuple[str, int, str]:
        async with client.get(url) as response:
            assert response.status == 200
            hasher = hashlib.sha256()
            first = await response.content.readany()
            assert first and not gate.is_set()
            hasher.update(first)
            received = len(first)
            got_first[i].set()
            async for chunk in response.content.iter_chunked(4 * MiB):
                hasher.update(chunk)
                received += len(chunk)
            return hasher.hexdigest(), received, response.headers[CACHE]

    tasks = [asyncio.create_task(pull(i)) for i in range(clients)]
    try:
        await wait_for_signals(got_first, tasks)
        assert not gate.is_set()
        gate.set()
        async with asyncio.timeout(TIMEOUT):
            results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    assert [(h, n) for h, n, _ in results] == [(expected, 64 * MiB)] * clients
    assert sorted(c for _, _, c in results) == ["JOINED"] * (clients - 1) + ["MISS"]
    assert fake.count("GET", "blobs") == 1
    await mirror.services.background.join()
    assert stored_digest(mirror, digest) == digest


# 10. A client that walks away


async def test_download_survives_the_client_that_started_it(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(10).randbytes(6 * MiB + 99)
    digest = fake.add_blob(data)
    gate = asyncio.Event()
    fake.gates[digest] = (2 * MiB, gate)
    mirror = await make_mirror({"docker.io": fake.url})

    async with asyncio.timeout(TIMEOUT):
        response = await client.get(blob_url(mirror, NAME, digest))
        assert response.status == 200
        assert await response.content.readany()
        response.close()  # drops the connection with the blob half sent
        gate.set()
        await mirror.services.background.join()

    assert await mirror.services.store.size(Digest.parse(digest)) == len(data)
    assert stored_digest(mirror, digest) == digest
    assert tmp_files(mirror) == []
    before = fake.count("GET", "blobs")
    assert before == 1

    hit = await pull_blob(client, mirror, NAME, digest)
    assert hit.status == 200
    assert hit.headers[CACHE] == "HIT"
    assert hit.body == data
    assert fake.count("GET", "blobs") == before


# 11. Range requests


async def test_range_requests_on_a_miss_and_on_a_hit(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(11).randbytes(5000)
    digest = fake.add_blob(data)
    other = random.Random(12).randbytes(3000)
    other_digest = fake.add_blob(other)
    mirror = await make_mirror({"docker.io": fake.url})
    url = blob_url(mirror, NAME, digest)

    miss = await fetch(client, url, headers={"Range": "bytes=100-199"})
    assert miss.status == 206
    assert miss.headers[CACHE] == "MISS"
    assert miss.body == data[100:200]
    assert miss.headers["Content-Range"] == f"bytes 100-199/{len(data)}"

    beyond = await fetch(client, blob_url(mirror, NAME, other_digest), headers={"Range": "bytes=3000-3100"})
    assert beyond.status == 416
    assert beyond.error_code() == "RANGE_INVALID"
    assert beyond.headers["Content-Range"] == f"bytes */{len(other)}"

    await mirror.services.background.join()
    assert stored_digest(mirror, digest) == digest
    hit = await fetch(client, url, headers={"Range": "bytes=100-199"})
    assert hit.status == 206
    assert hit.headers[CACHE] == "HIT"
    assert hit.body == data[100:200]
    assert hit.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert fake.count("GET", "blobs") == 2  # one download each, none for the hit


# 12. HEAD of an uncached blob


async def test_head_of_uncached_blob_does_not_download_it(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(12).randbytes(3 * MiB)
    digest = fake.add_blob(data)
    mirror = await make_mirror({"docker.io": fake.url})

    head = await fetch(client, blob_url(mirror, NAME, digest), "HEAD")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.body == b""
    await mirror.services.background.join()
    assert fake.count("HEAD", "blobs") == 1
    assert fake.count("GET", "blobs") == 0
    assert await mirror.services.store.size(Digest.parse(digest)) is None

    missing = await fetch(client, blob_url(mirror, NAME, sha256(b"absent")), "HEAD")
    assert missing.status == 404


# 13. Start-up sweep


async def test_startup_sweeps_unfinished_downloads(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    cache_dir = tmp_path / "swept"
    data = b"a blob published before the restart"
    digest = fake.add_blob(data)
    published = cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    published.parent.mkdir(parents=True)
    published.write_bytes(data)
    leftover = cache_dir / "tmp" / f"{digest[7:]}.0123456789abcdef.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(data[:10])

    mirror = await make_mirror({"docker.io": fake.url}, cache_dir=cache_dir)
    assert not leftover.exists()
    assert tmp_files(mirror) == []
    # What was published survives the sweep and is served from the cache.
    blob = await pull_blob(client, mirror, NAME, digest)
    assert blob.status == 200 and blob.body == data and blob.headers[CACHE] == "HIT"
    assert fake.count("GET", "blobs") == 0


# 14. Oversized manifests


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_manifest_is_refused(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, chunked: bool) -> None:
    image = add_image(fake, tag="huge", pad=MANIFEST_MAX_BYTES)
    assert len(image.manifest) > MANIFEST_MAX_BYTES
    fake.chunked_manifests = chunked
    mirror = await make_mirror({"docker.io": fake.url})

    for reference in ("huge", image.digest):
        refused = await pull_manifest(client, mirror, NAME, reference)
        assert 400 <= refused.status < 600 and refused.status != 500, refused.status
        assert refused.headers["Content-Type"].startswith("application/json")
        assert refused.error_code() == "MANIFEST_INVALID"
    await mirror.services.background.join()
    assert stored_digest(mirror, image.digest) is None
    assert tmp_files(mirror) == []


# Review findings: no window of unverified bytes may look complete to a client.


async def test_ranged_miss_of_a_corrupt_blob_is_cut_short(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """A Range that ends before the blob does still waits for the whole blob's verification:
    its last byte is never sent for content that fails its digest."""
    data = random.Random(91).randbytes(100_000)
    digest = fake.add_blob(data)
    fake.blobs[digest] = random.Random(92).randbytes(100_000)  # wrong from the first byte
    gate = asyncio.Event()
    fake.gates[digest] = (50_000, gate)  # the range is all there while the blob is unverified
    mirror = await make_mirror({"docker.io": fake.url})
    async with client.get(blob_url(mirror, NAME, digest), headers={"Range": "bytes=0-99"}) as response:
        assert response.status == 206
        gate.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await mirror.services.background.join()
    assert stored_digest(mirror, digest) is None

    fake.blobs[digest] = data
    async with client.get(blob_url(mirror, NAME, digest), headers={"Range": "bytes=0-99"}) as response:
        assert (response.status, await response.read()) == (206, data[:100])


async def test_empty_body_for_a_non_empty_digest_is_refused(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """Content-Length 0 makes the headers the whole response: they wait for verification."""
    digest = "sha256:" + hashlib.sha256(b"not empty").hexdigest()
    fake.blobs[digest] = b""
    mirror = await make_mirror({"docker.io": fake.url})
    refused = await pull_blob(client, mirror, NAME, digest)
    assert refused.status == 502
    assert refused.error_code() == "UNAVAILABLE"
    assert stored_digest(mirror, digest) is None

    empty = fake.add_blob(b"")
    served = await pull_blob(client, mirror, NAME, empty)
    assert (served.status, served.body) == (200, b"")


async def test_shutdown_mid_download_leaves_nothing_partial(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    data = random.Random(93).randbytes(4 * MiB)
    digest = fake.add_blob(data)
    gate = asyncio.Event()
    fake.gates[digest] = (2 * MiB, gate)
    mirror = await make_mirror({"docker.io": fake.url})
    async with client.get(blob_url(mirror, NAME, digest)) as response:
        assert response.status == 200
        assert await response.content.readany()
        await mirror.services.background.close()  # what shutdown does to downloads still running
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert stored_digest(mirror, digest) is None
    assert tmp_files(mirror) == []


async def test_slow_revalidation_serves_the_cached_tag_stale(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """Slow is treated like down: past its bound, a revalidation gives way to the cached copy."""
    image = add_image(fake, layers=[b"layer"])
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=0, timeouts=TimeoutConfig(revalidate=0.2),
                               stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    gate = asyncio.Event()
    fake.forced[f"/v2/{NAME}/manifests/latest"] = Forced(500, gate=gate)
    stale = await pull_manifest(client, mirror, NAME, "latest")
    assert (stale.status, stale.body, stale.headers[CACHE]) == (200, image.manifest, "STALE")
    gate.set()


async def test_manifests_do_not_queue_behind_layer_downloads(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    """More layer downloads in flight than a connection pool holds: a manifest, and the
    revalidation of a cached tag, still go straight to the upstream."""
    gate = asyncio.Event()
    digests = [fake.add_blob(random.Random(100 + i).randbytes(64 * 1024)) for i in range(120)]
    for digest in digests:
        fake.gates[digest] = (1024, gate)
    image = add_image(fake, layers=[b"layer"])
    mirror = await make_mirror({"docker.io": fake.url}, tag_ttl=0, stale_while_revalidate=False)
    assert (await pull_manifest(client, mirror, NAME, "latest")).status == 200
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as many:
        responses = await asyncio.gather(*(many.get(blob_url(mirror, NAME, d)) for d in digests))
        assert all(r.status == 200 for r in responses), "every download has its upstream connection"
        revalidated = await pull_manifest(client, mirror, NAME, "latest")
        assert (revalidated.status, revalidated.body, revalidated.headers[CACHE]) == (
            200, image.manifest, "REVALIDATED")
        gate.set()
        for response in responses:
            await response.read()
            response.release()
