"""Replicas on one bucket (a real SeaweedFS) and one Redis (a real redis-server): one upstream
download per digest for the whole cluster, every client streaming it as it arrives."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from mirror.config import EvictionConfig, S3Config, S3Location, SignaturePolicy
from mirror.signatures import SIGNATURE_ARTIFACT
from tests.conftest import Mirror, MirrorFactory
from tests.support.artifacts import artifact_manifest
from tests.support.cosign import make_key, public_pem, sign_payload, signature_manifest
from tests.support.fake_upstream import FakeUpstream, Forced
from tests.support.images import OCI_MANIFEST
from tests.support.pulls import ACCEPT, add_image, blob_url, fetch, manifest_url
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedFS
from tests.support.served import Served

MiB = 1 << 20
TIMEOUT = 60.0
NAME = "library/app"


def settings(seaweedfs: SeaweedFS) -> S3Config:
    return S3Config(endpoint=seaweedfs.endpoint, region=seaweedfs.region, access_key_id=seaweedfs.access_key,
                    secret_access_key=seaweedfs.secret_key)


async def replicas(make_mirror: MirrorFactory, count: int, upstream: str, bucket: str, seaweedfs: SeaweedFS,
                   redis_url: str) -> list[Mirror]:
    return [await make_mirror({"docker.io": upstream}, storage=S3Location(bucket, "cluster"), s3=settings(seaweedfs),
                              redis=redis_url) for _ in range(count)]


def aws_settings(monkeypatch: pytest.MonkeyPatch, seaweedfs: SeaweedFS) -> None:
    """The bucket's endpoint and keys where `mirror serve` processes find them: the AWS settings."""
    for variable, value in (("AWS_ENDPOINT_URL_S3", seaweedfs.endpoint), ("AWS_REGION", seaweedfs.region),
                            ("AWS_ACCESS_KEY_ID", seaweedfs.access_key),
                            ("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)):
        monkeypatch.setenv(variable, value)


class Client:
    """One pull of a blob, recording when its first byte came and whether all were right."""

    def __init__(self, session: aiohttp.ClientSession, url: str, expected: bytes) -> None:
        self.first_byte = asyncio.Event()
        self.task = asyncio.ensure_future(self._pull(session, url, expected))

    async def _pull(self, session: aiohttp.ClientSession, url: str, expected: bytes) -> str:
        digest = hashlib.sha256()
        got = 0
        try:
            async with asyncio.timeout(TIMEOUT), session.get(url) as response:
                if response.status != 200:
                    return f"status {response.status}"
                async for chunk in response.content.iter_any():
                    digest.update(chunk)
                    got += len(chunk)
                    self.first_byte.set()
        except aiohttp.ClientPayloadError:
            return f"cut after {got} bytes"
        if got != len(expected) or digest.hexdigest() != hashlib.sha256(expected).hexdigest():
            return f"wrong bytes ({got} of {len(expected)})"
        return "verified"


async def test_thirty_clients_on_three_replicas_cost_one_upstream_download(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    data = random.Random("cluster").randbytes(64 * MiB)
    digest = fake.add_blob(data)
    # The upstream stops three quarters of the way until every client has had its first byte.
    release = asyncio.Event()
    fake.gates[digest] = (48 * MiB, release)
    mirrors = await replicas(make_mirror, 3, fake.url, s3_bucket, seaweedfs, redis_server.url)
    clients = [Client(client, blob_url(mirrors[i % 3], NAME, digest), data) for i in range(30)]
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(c.first_byte.wait() for c in clients))
    finally:
        release.set()
    outcomes = await asyncio.gather(*(c.task for c in clients))
    assert outcomes == ["verified"] * 30
    assert fake.count("GET", "blobs") == 1, "one upstream download for the whole cluster"
    streamed = [peer_bytes((await fetch(client, f"{m.url}/metrics")).body.decode()) for m in mirrors]
    assert sorted(streamed) == [0, len(data), len(data)], "the two followers streamed it from the leader"
    for mirror in mirrors:
        await mirror.services.background.join()
    # Published once, by the leader; every replica now serves it from the bucket.
    for mirror in mirrors:
        hit = await fetch(client, blob_url(mirror, NAME, digest))
        assert (hit.status, hit.headers["X-Mirror-Cache"]) == (200, "HIT") and hit.body == data
    assert fake.count("GET", "blobs") == 1


async def test_a_replica_without_redis_still_serves_and_says_so(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    data = random.Random("alone").randbytes(2 * MiB)
    digest = fake.add_blob(data)
    [mirror] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    redis_server.stop()
    pulled = await fetch(client, blob_url(mirror, NAME, digest))
    assert pulled.status == 200 and pulled.body == data
    ready = await fetch(client, f"{mirror.url}/readyz")
    assert ready.status == 200
    assert "Redis is out of reach" in json.loads(ready.body)["degraded"]["cluster"]
    assert "mirror_cluster_coordination 0.0" in (await fetch(client, f"{mirror.url}/metrics")).body.decode()
    redis_server.start()
    async with asyncio.timeout(TIMEOUT):
        while "mirror_cluster_coordination 1.0" not in (await fetch(client, f"{mirror.url}/metrics")).body.decode():
            again = await fetch(client, blob_url(mirror, NAME, digest))
            assert again.status == 200 and again.body == data
            await asyncio.sleep(0.1)
    assert "degraded" not in json.loads((await fetch(client, f"{mirror.url}/readyz")).body)


async def test_the_internal_endpoint_wants_the_cluster_token(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    data = random.Random("token").randbytes(MiB)
    digest = fake.add_blob(data)
    release = asyncio.Event()
    fake.gates[digest] = (MiB // 2, release)
    [mirror] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    pulling = Client(client, blob_url(mirror, NAME, digest), data)
    try:
        async with asyncio.timeout(TIMEOUT):
            await pulling.first_byte.wait()
        for headers in ({}, {"X-Mirror-Cluster-Token": "guess"}):
            refused = await fetch(client, f"{mirror.url}/_mirror/cluster/fills/{digest}", headers=headers)
            assert refused.status == 403 and refused.error_code() == "DENIED"
    finally:
        release.set()
    assert await pulling.task == "verified"


async def test_a_leader_killed_mid_download_is_taken_over_with_one_more_upstream_request(
        fake: FakeUpstream, client: aiohttp.ClientSession, seaweedfs: SeaweedFS, s3_bucket: str,
        redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three `mirror serve` processes, found through the standard AWS settings; the one that
    leads the download is killed with SIGKILL half-way."""
    aws_settings(monkeypatch, seaweedfs)
    data = random.Random("takeover").randbytes(32 * MiB)
    digest = fake.add_blob(data)
    release = asyncio.Event()
    fake.gates[digest] = (20 * MiB, release)
    served = [await Served.start("--cache-dir", tmp_path / f"spool{i}", "--storage", f"s3://{s3_bucket}/cluster",
                                 "--redis", redis_server.url, "--upstream", f"docker.io={fake.url}")
              for i in range(3)]
    try:
        urls = {s.url: f"{s.url}/v2/{NAME}/blobs/{digest}" for s in served}
        clients = {url: [Client(client, blob, data) for _ in range(3)] for url, blob in urls.items()}
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(c.first_byte.wait() for pulls in clients.values() for c in pulls))
        holder = await lease_holder(redis_server, digest)
        [leader] = [s for s in served if s.url == holder]
        await leader.kill()
        release.set()
        survivors = [s for s in served if s is not leader]
        for url, pulls in clients.items():
            outcomes = await asyncio.gather(*(c.task for c in pulls))
            if url == leader.url:
                assert all(o.startswith("cut after") for o in outcomes), outcomes
            else:
                assert outcomes == ["verified"] * 3, outcomes
        # Cut short, a client pulls again, from a replica that is still there.
        retried = await fetch(client, f"{survivors[0].url}/v2/{NAME}/blobs/{digest}")
        assert retried.status == 200 and retried.body == data
        assert fake.count("GET", "blobs") == 2, "the leader's download, and one resume after it went"
        assert fake.blob_ranges[1] is not None and fake.blob_ranges[1].startswith("bytes="), "resumed, not restarted"
    finally:
        release.set()
        for replica in served:
            await replica.kill()


async def lease_holder(redis_server: RedisServer, digest: str) -> str:
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        value = await connection.get(f"mirror:lease:blob:{digest}")
    finally:
        await connection.aclose()
    assert isinstance(value, str), "some replica leads the download"
    return value.split(" ", 1)[0]


async def test_a_rate_limit_one_replica_meets_holds_off_every_replica(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    first, second = await replicas(make_mirror, 2, fake.url, s3_bucket, seaweedfs, redis_server.url)
    fake.failing = Forced(429, {"Retry-After": "120"})
    limited = await fetch(client, manifest_url(first, NAME, "v1"), headers={"Accept": ACCEPT})
    assert limited.status == 429
    asked = fake.count()
    # The other replica hears of it (its circuit opens, untried) and answers 429 itself, with
    # the time left, asking nobody.
    async with asyncio.timeout(TIMEOUT):
        while 'mirror_upstream_circuit_state{upstream="docker.io"} 2.0' not in \
                (await fetch(client, f"{second.url}/metrics")).body.decode():
            await asyncio.sleep(0.05)
    held = await fetch(client, manifest_url(second, NAME, "v2"), headers={"Accept": ACCEPT})
    assert held.status == 429 and fake.count() == asked
    assert held.error_code() == "TOOMANYREQUESTS"
    assert 100 <= int(held.headers["Retry-After"]) <= 120
    # A replica that starts later learns it from Redis at once.
    [third] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    late = await fetch(client, manifest_url(third, NAME, "v3"), headers={"Accept": ACCEPT})
    assert late.status == 429 and fake.count() == asked


async def test_a_flushed_redis_is_rebuilt_from_the_bucket(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    layers = [random.Random(f"rebuilt{i}").randbytes(MiB + i) for i in range(3)]
    digests = [fake.add_blob(layer) for layer in layers]
    [first] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    for digest, layer in zip(digests, layers, strict=True):
        assert (await fetch(client, blob_url(first, NAME, digest))).body == layer
    await first.services.background.join()
    redis_server.flush()
    # A replica starting on the empty index lists the bucket: every blob is known again, with
    # its size, and served from the bucket; the upstream is asked only to confirm the repository
    # may see each one (the links went with Redis), never for the bytes.
    [rebuilt] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    assert await rebuilt.services.index.usage() == (3, sum(map(len, layers)))
    before = fake.count("GET", "blobs")
    for digest, layer in zip(digests, layers, strict=True):
        hit = await fetch(client, blob_url(rebuilt, NAME, digest))
        assert (hit.headers["X-Mirror-Cache"], hit.body) == ("HIT", layer)
    assert fake.count("GET", "blobs") == before


async def test_replicas_keep_the_shared_cache_under_its_cap_evicting_once(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    layers = [random.Random(f"evicted{i}").randbytes(3 * MiB) for i in range(4)]
    digests = [fake.add_blob(layer) for layer in layers]
    cap = EvictionConfig(max_size=8 * MiB, high_watermark=0.9, low_watermark=0.8)
    mirrors = [await make_mirror({"docker.io": fake.url}, storage=S3Location(s3_bucket, "capped"),
                                 s3=settings(seaweedfs), redis=redis_server.url, eviction=cap) for _ in range(2)]
    # Each replica alone holds 6 MiB, under the cap; together they hold 12 MiB, over it.
    for i, (digest, layer) in enumerate(zip(digests, layers, strict=True)):
        assert (await fetch(client, blob_url(mirrors[i % 2], NAME, digest))).body == layer
        await mirrors[i % 2].services.background.join()
    index = mirrors[0].services.index
    async with asyncio.timeout(TIMEOUT):
        while (await index.usage())[1] > 0.8 * 8 * MiB:
            await asyncio.sleep(0.2)
    for mirror in mirrors:
        await mirror.services.background.join()
    blobs, used = await index.usage()
    assert len(await objects(seaweedfs, s3_bucket)) == blobs
    evicted = sum([evicted_bytes((await fetch(client, f"{m.url}/metrics")).body.decode()) for m in mirrors])
    assert evicted == 12 * MiB - used, "what went was counted once: one replica evicted it"
    # The least recently used went first: the newest layer is still there.
    assert (await fetch(client, blob_url(mirrors[0], NAME, digests[-1]))).headers["X-Mirror-Cache"] == "HIT"


def peer_bytes(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("mirror_cluster_peer_bytes_total "))


def evicted_bytes(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("mirror_evicted_bytes_total{"))


async def objects(seaweedfs: SeaweedFS, bucket: str) -> list[str]:
    async with seaweedfs.client() as s3:
        listing = await s3.list_objects_v2(Bucket=bucket, Prefix="capped/blobs/")
    return [item["Key"] for item in listing.get("Contents", [])]


def mirror_cli(*args: str, cache: Path, env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "mirror", *args, "--cache-dir", str(cache)],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=TIMEOUT)
    return result.returncode, result.stdout or result.stderr


async def test_operator_commands_work_on_a_cluster_while_it_serves(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer, tmp_path: Path) -> None:
    kept = add_image(fake, "team/kept", "v1", [random.Random("kept").randbytes(MiB)])
    dropped = add_image(fake, "team/dropped", "v1", [random.Random("dropped").randbytes(MiB)], seed=1)
    mirrors = await replicas(make_mirror, 2, fake.url, s3_bucket, seaweedfs, redis_server.url)
    for mirror, image in zip(mirrors, (kept, dropped), strict=True):
        assert (await fetch(client, manifest_url(mirror, image.name, "v1"), headers={"Accept": ACCEPT})).status == 200
        for digest in (image.config, *image.layers):
            assert (await fetch(client, blob_url(mirror, image.name, digest))).status == 200
        await mirror.services.background.join()
    cluster = ["--storage", f"s3://{s3_bucket}/cluster", "--redis", redis_server.url]
    env = {"AWS_ENDPOINT_URL_S3": seaweedfs.endpoint, "AWS_REGION": seaweedfs.region,
           "AWS_ACCESS_KEY_ID": seaweedfs.access_key, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key}
    spool = tmp_path / "operator"

    status, listing = mirror_cli("ls", "--json", *cluster, cache=spool, env=env)
    assert status == 0, listing
    assert {(i["name"], i["tag"], i["digest"]) for i in json.loads(listing)} == {
        (kept.name, "v1", kept.digest), (dropped.name, "v1", dropped.digest)}
    status, pinned = mirror_cli("pin", f"docker.io/{kept.name}:v1", "--json", *cluster, cache=spool, env=env)
    assert status == 0 and json.loads(pinned)["digest"] == kept.digest, pinned
    # Evicting everything it may: the pinned image stays, whole; the other goes, whole.
    status, report = mirror_cli("gc", "--max-size", "1", "--json", *cluster, cache=spool, env=env)
    assert status == 0, report
    gone = {e["digest"] for e in json.loads(report)["evicted"]}
    assert gone == {dropped.digest, dropped.config, *dropped.layers}
    for digest in (kept.config, *kept.layers):
        hit = await fetch(client, blob_url(mirrors[1], kept.name, digest))
        assert (hit.status, hit.headers["X-Mirror-Cache"]) == (200, "HIT")
    status, listing = mirror_cli("ls", "--json", *cluster, cache=spool, env=env)
    assert [i["name"] for i in json.loads(listing)] == [kept.name]
    redis_server.stop()
    status, said = mirror_cli("ls", *cluster, cache=spool, env=env)
    assert status == 1 and "unreachable" in said


async def test_a_manifest_and_its_revalidation_are_fetched_once_for_the_cluster(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    image = add_image(fake, NAME, "v1", [random.Random("manifest").randbytes(1000)])
    path = f"/v2/{NAME}/manifests/v1"
    mirrors = [await make_mirror({"docker.io": fake.url}, storage=S3Location(s3_bucket, "tags"),
                                 s3=settings(seaweedfs), redis=redis_server.url, tag_ttl=0.0) for _ in range(3)]
    # Cold: three replicas asked at once, while the upstream takes its time to answer the first.
    release = fake.held[path] = asyncio.Event()
    pulls = [asyncio.ensure_future(fetch(client, manifest_url(m, NAME, "v1"), headers={"Accept": ACCEPT}))
             for m in mirrors]
    async with asyncio.timeout(TIMEOUT):
        while fake.count("GET", "manifests") == 0:
            await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(*pulls)
    assert [(a.status, a.body) for a in answers] == [(200, image.manifest)] * 3
    assert sorted(a.headers["X-Mirror-Cache"] for a in answers) == ["JOINED", "JOINED", "MISS"]
    assert fake.count("GET", "manifests") == 1 and fake.count("HEAD", "manifests") == 0

    # Past its TTL (0 s): every replica serves the cached tag at once, and one of them asks the
    # upstream whether it moved, for all three.
    release = fake.held[path] = asyncio.Event()
    stale = [asyncio.ensure_future(fetch(client, manifest_url(m, NAME, "v1"), headers={"Accept": ACCEPT}))
             for m in mirrors]
    answers = await asyncio.gather(*stale)
    assert {(a.status, a.headers["X-Mirror-Cache"], a.body) for a in answers} == {
        (200, "REVALIDATING", image.manifest)}
    release.set()
    for mirror in mirrors:
        await mirror.services.background.join()
    assert fake.count("HEAD", "manifests") == 1 and fake.count("GET", "manifests") == 1


async def test_a_replica_cut_off_from_the_leader_still_serves_right_bytes_once_it_is_published(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    """A network split: the follower cannot reach the replica that leads. It waits for the blob to
    land in the bucket and serves it from there; nobody gets wrong bytes, the upstream is asked once."""
    data = random.Random("split").randbytes(8 * MiB)
    digest = fake.add_blob(data)
    release = asyncio.Event()
    fake.gates[digest] = (4 * MiB, release)
    leader, follower = await replicas(make_mirror, 2, fake.url, s3_bucket, seaweedfs, redis_server.url)
    assert leader.services.cluster is not None
    leader.services.cluster.advertise = "http://127.0.0.1:9"  # nothing answers there: the split
    first = Client(client, blob_url(leader, NAME, digest), data)
    async with asyncio.timeout(TIMEOUT):
        await first.first_byte.wait()
    cut_off = Client(client, blob_url(follower, NAME, digest), data)
    release.set()
    assert await first.task == "verified"
    assert await cut_off.task == "verified"
    assert fake.count("GET", "blobs") == 1


async def test_a_replica_started_without_redis_joins_when_it_comes_back(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer) -> None:
    data = random.Random("late").randbytes(4 * MiB)
    digest = fake.add_blob(data)
    [early] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    redis_server.stop()
    [late] = await replicas(make_mirror, 1, fake.url, s3_bucket, seaweedfs, redis_server.url)
    assert (await fetch(client, blob_url(late, NAME, digest))).body == data, "it serves, alone"
    redis_server.start()
    async with asyncio.timeout(TIMEOUT):
        while "mirror_cluster_coordination 1.0" not in (await fetch(client, f"{late.url}/metrics")).body.decode():
            await asyncio.sleep(0.1)
    # Joined: it leads a download the other replica follows.
    other = random.Random("joined").randbytes(4 * MiB)
    other_digest = fake.add_blob(other)
    release = asyncio.Event()
    fake.gates[other_digest] = (2 * MiB, release)
    leading = Client(client, blob_url(late, NAME, other_digest), other)
    async with asyncio.timeout(TIMEOUT):
        await leading.first_byte.wait()
    following = Client(client, blob_url(early, NAME, other_digest), other)
    async with asyncio.timeout(TIMEOUT):
        await following.first_byte.wait()
    release.set()
    assert [await leading.task, await following.task] == ["verified", "verified"]
    assert fake.count("GET", "blobs") == 2, "one for each blob"
    assert peer_bytes((await fetch(client, f"{early.url}/metrics")).body.decode()) == len(other)


async def test_a_replica_restarted_while_the_others_serve_finds_the_shared_cache(
        fake: FakeUpstream, client: aiohttp.ClientSession, seaweedfs: SeaweedFS, s3_bucket: str,
        redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_settings(monkeypatch, seaweedfs)
    image = add_image(fake, NAME, "v1", [random.Random("restart").randbytes(2 * MiB)])
    flags = ["--storage", f"s3://{s3_bucket}/cluster", "--redis", redis_server.url,
             "--upstream", f"docker.io={fake.url}"]
    first = await Served.start("--cache-dir", tmp_path / "spool0", *flags)
    second = await Served.start("--cache-dir", tmp_path / "spool1", *flags)
    try:
        for digest in (image.config, *image.layers):
            assert (await fetch(client, f"{first.url}/v2/{NAME}/blobs/{digest}")).status == 200
        assert (await fetch(client, f"{first.url}/v2/{NAME}/manifests/v1", headers={"Accept": ACCEPT})).status == 200
        assert await second.terminate() == 0
        asked = fake.count()
        # While it is away the other one serves; back, it serves from the bucket and the index.
        assert (await fetch(client, f"{first.url}/v2/{NAME}/blobs/{image.layers[0]}")).headers[
            "X-Mirror-Cache"] == "HIT"
        second = await Served.start("--cache-dir", tmp_path / "spool1", *flags, host=second.host)
        manifest = await fetch(client, f"{second.url}/v2/{NAME}/manifests/v1", headers={"Accept": ACCEPT})
        assert (manifest.status, manifest.body) == (200, image.manifest)
        for digest in (image.config, *image.layers):
            hit = await fetch(client, f"{second.url}/v2/{NAME}/blobs/{digest}")
            assert (hit.status, hit.headers["X-Mirror-Cache"], hit.body) == (200, "HIT", fake.blobs[digest])
        assert fake.count() == asked, "nothing was asked of the upstream again"
    finally:
        await first.kill()
        await second.kill()


async def test_referrers_and_signature_verdicts_are_shared_by_the_replicas(
        fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession, seaweedfs: SeaweedFS,
        s3_bucket: str, redis_server: RedisServer, tmp_path: Path) -> None:
    """A referrers list one replica fetched is a hit on the others; so is a signature verdict."""
    key = make_key()
    (tmp_path / "release.pub").write_bytes(public_pem(key))
    image = add_image(fake, NAME, layers=[b"signed layer"])
    payload, signature = sign_payload(key, image.digest, "registry.test/library/app")
    body, blobs = signature_manifest([(payload, signature)])
    for blob in blobs.values():
        fake.add_blob(blob)
    subject = {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}
    fake.referrers_api = True
    fake.add_referrer(NAME, image.digest, body, SIGNATURE_ARTIFACT)
    fake.add_referrer(NAME, image.digest, artifact_manifest(subject, "application/spdx+json", b"sbom"))
    policy = SignaturePolicy("release-signed", (tmp_path / "release.pub",))
    mirrors = [await make_mirror({"docker.io": fake.url}, storage=S3Location(s3_bucket, "signed"),
                                 s3=settings(seaweedfs), redis=redis_server.url, signature_policies=(policy,))
               for _ in range(2)]
    url = f"/v2/{NAME}/referrers/{image.digest}"
    first = await fetch(client, f"{mirrors[0].url}{url}")
    assert (first.status, first.headers["X-Mirror-Cache"]) == (200, "MISS")
    second = await fetch(client, f"{mirrors[1].url}{url}")
    assert (second.status, second.headers["X-Mirror-Cache"], second.body) == (200, "HIT", first.body)
    assert fake.count("GET", "referrers") == 1

    pulled = await fetch(client, manifest_url(mirrors[0], NAME, "latest"), headers={"Accept": ACCEPT})
    assert pulled.status == 200
    await mirrors[0].services.background.join()
    asked = fake.count("GET", "blobs")
    pulled = await fetch(client, manifest_url(mirrors[1], NAME, "latest"), headers={"Accept": ACCEPT})
    assert pulled.status == 200 and fake.count("GET", "blobs") == asked, "the verdict was not computed again"
    assert 'mirror_signature_checks_total{policy="release-signed",result="cached"} 1.0' in (
        await fetch(client, f"{mirrors[1].url}/metrics")).body.decode()
