"""The status API (`/api/v1/...`): its figures against `/metrics` after a scripted run of misses,
hits, joins, stale serves and evictions; who may see and do what; the admin operations on a
running mirror, through the API and the CLI's `--server`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from mirror.app import SERVICES, create_app, create_ops_app
from mirror.config import AccessRule, AuthConfig, Config, TlsConfig, UpstreamConfig
from tests.conftest import Mirror, MirrorFactory, Registry
from tests.support.fake_upstream import FakeUpstream, Forced
from tests.support.pulls import CACHE, TIMEOUT, Clock, add_image, fetch, pull_blob, pull_manifest

MiB = 1 << 20
TOKEN = "0123456789abcdef0123456789abcdef"
REGISTRY = "registry.test"
OTHER = "other.test"


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(value for sample, tags, value in found
               if sample == name and all(tags.get(k) == v for k, v in labels.items()))


async def api(client: aiohttp.ClientSession, mirror: Mirror, view: str, method: str = "GET",
              body: dict[str, Any] | None = None, token: str | None = TOKEN,
              auth: str | None = None) -> tuple[int, Any]:
    """`token`: the admin token, sent as a bearer token; `auth`: an Authorization header (Basic)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if auth is not None:
        headers = {"Authorization": auth}
    async with asyncio.timeout(TIMEOUT), client.request(method, f"{mirror.url}/api/v1/{view}", json=body,
                                                        headers=headers) as response:
        return response.status, await response.json()


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls observable state (the API itself) until `check` holds."""
    async with asyncio.timeout(TIMEOUT):
        while not await check():
            await asyncio.sleep(0.02)


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def test_every_figure_agrees_with_metrics_after_misses_hits_joins_stale_serves_and_evictions(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    clock = Clock()
    app = add_image(fake, "team/app", "v1", [random.Random(1).randbytes(300_000)])
    big = add_image(fake, "team/big", "v1", [random.Random(2).randbytes(2 * MiB)], seed=1)
    fake.headers_for_manifests = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"}
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", REGISTRY: fake.url, OTHER: fake.url},
                               clock=clock, tag_ttl=60, max_ages={REGISTRY: 3600, OTHER: 3600},
                               stale_while_revalidate=False, admin_token_file=token_file(tmp_path))

    # Misses, then hits, on two upstreams.
    for upstream in (REGISTRY, OTHER):
        for _ in range(2):
            assert (await pull_manifest(client, mirror, f"{upstream}/team/app", "v1")).status == 200
            for digest in (app.config, *app.layers):
                assert (await pull_blob(client, mirror, f"{upstream}/team/app", digest)).status == 200

    # Two clients on one download: the page shows it, with both readers, while it runs.
    gate = asyncio.Event()
    fake.gates[big.layers[0]] = (MiB, gate)
    assert (await pull_manifest(client, mirror, f"{REGISTRY}/team/big", "v1")).status == 200
    pulls = [asyncio.create_task(pull_blob(client, mirror, f"{REGISTRY}/team/big", big.layers[0])) for _ in range(2)]

    async def both_reading() -> bool:
        _, downloads = await api(client, mirror, "downloads")
        return bool(downloads) and downloads[0]["readers"] == 2 and downloads[0]["bytes"] >= MiB
    await until(both_reading, "the download with two readers")
    _, downloads = await api(client, mirror, "downloads")
    assert [(d["upstream"], d["name"], d["digest"], d["size"]) for d in downloads] == \
        [(REGISTRY, "team/big", big.layers[0], 2 * MiB)]
    assert total(await metrics(client, mirror), "mirror_downloads_in_flight") == 1
    gate.set()
    results = await asyncio.gather(*pulls)
    assert sorted(r.headers[CACHE] for r in results) == ["JOINED", "MISS"]

    # The tag is past its TTL and the upstream is down: served stale.
    clock.advance(120)
    fake.failing = Forced(503)
    stale = await pull_manifest(client, mirror, f"{REGISTRY}/team/app", "v1")
    assert (stale.status, stale.headers[CACHE]) == (200, "STALE")
    fake.failing = None
    # A failure, as the client saw it.
    assert (await pull_manifest(client, mirror, f"{REGISTRY}/team/absent", "v1")).status == 404

    # Pin one image, then collect what has gone unused past max_age: the other goes.
    status, pinned = await api(client, mirror, "pin", "POST", {"image": f"{REGISTRY}/team/app:v1"})
    assert (status, pinned) == (200, {"upstream": REGISTRY, "name": "team/app", "digest": app.digest, "pinned": True})
    clock.advance(7200)
    status, collected = await api(client, mirror, "gc", "POST", {"dry_run": False})
    assert status == 200
    gone = {e["digest"] for e in collected["evicted"]}
    assert gone == {big.digest, *big.layers} and not {app.digest, app.config, *app.layers} & gone
    await mirror.services.background.join()

    found = await metrics(client, mirror)
    _, everything = await api(client, mirror, "status")
    effect = everything["effectiveness"]
    since = effect["total"]["since_start"]
    assert since["requests"] == total(found, "mirror_cache_requests_total") > 0
    assert since["from_cache"] == since["requests"] - total(found, "mirror_cache_requests_total", result="miss")
    assert since["bytes_cache"] == total(found, "mirror_served_bytes_total", source="cache") > 0
    assert since["bytes_upstream"] == total(found, "mirror_served_bytes_total", source="upstream") > 0
    assert effect["total"]["last_hour"] == since
    per_upstream = effect["upstreams"]
    # Its blobs were cached through the other upstream already: only its tag was a miss.
    assert (per_upstream[OTHER]["since_start"]["requests"], per_upstream[OTHER]["since_start"]["from_cache"]) == (6, 5)
    assert sum(u["since_start"]["requests"] for u in per_upstream.values()) == since["requests"]
    assert sum(p["bytes_cache"] for p in effect["series"]) == since["bytes_cache"]
    assert since["hit_ratio"] == since["from_cache"] / since["requests"]

    upstreams = {u["name"]: u for u in everything["upstreams"]}
    for name in (REGISTRY, OTHER):
        assert upstreams[name]["requests_last_hour"] == total(found, "mirror_upstream_requests_total", upstream=name)
        assert upstreams[name]["state"] == "ok" and upstreams[name]["last_success"] is not None
    assert upstreams[REGISTRY]["errors_last_hour"] == total(found, "mirror_upstream_requests_total",
                                                           upstream=REGISTRY, status="503") == 1
    assert upstreams[REGISTRY]["last_error_reason"] == "answered 503"
    assert (upstreams[REGISTRY]["ratelimit_remaining"], upstreams[REGISTRY]["ratelimit_limit"]) == (76, 100) == \
        (total(found, "mirror_upstream_ratelimit_remaining", upstream=REGISTRY),
         total(found, "mirror_upstream_ratelimit_limit", upstream=REGISTRY))

    storage = everything["storage"]
    assert storage["used"] == total(found, "mirror_cache_size_bytes")
    assert storage["blobs"] == total(found, "mirror_cache_blobs")
    assert storage["evictions_since_start"] == total(found, "mirror_evictions_total") == len(gone)
    assert storage["evicted_bytes_since_start"] == total(found, "mirror_evicted_bytes_total")
    assert storage["evictions_last_hour"] == storage["evictions_since_start"]
    image_bytes = len(app.manifest) + sum(len(fake.blobs[d]) for d in (app.config, *app.layers))
    assert storage["pinned_bytes"] == image_bytes == storage["used"]
    assert storage["top_by_pulls"][0] == {"repository": f"{REGISTRY}/team/app", "pulls": 3}
    assert everything["downloads"] == [] and total(found, "mirror_downloads_in_flight") == 0

    failures = everything["failures"]
    assert [(f["upstream"], f["name"], f["reference"], f["status"], f["code"]) for f in failures] == \
        [(REGISTRY, "team/absent", "v1", 404, "MANIFEST_UNKNOWN")]

    _, images = await api(client, mirror, "images")
    shown = {(i["upstream"], i["name"], i["tag"]): i for i in images}
    assert set(shown) == {(REGISTRY, "team/app", "v1"), (OTHER, "team/app", "v1")}
    mine = shown[(REGISTRY, "team/app", "v1")]
    assert (mine["digest"], mine["pinned"], mine["pulls"], mine["size"]) == (app.digest, True, 3, image_bytes)
    assert shown[(OTHER, "team/app", "v1")]["pinned"] is True  # one manifest: pinned wherever it is tagged
    assert mine["ttl_left"] == 0 and mine["tag_age"] >= 7200


async def metrics(client: aiohttp.ClientSession, mirror: Mirror) -> list[tuple[str, dict[str, str], float]]:
    async with client.get(f"{mirror.url}/metrics") as response:
        return samples(await response.text())


USERS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password"}
"""alice administers everything; bob may pull team/* only; carol administers everything but secret/*."""
RULES = (AccessRule(("user:alice",), True, ("*",), frozenset({"pull", "admin"})),
         AccessRule(("user:bob",), True, (f"{REGISTRY}/team/*",)),
         AccessRule(("user:carol",), False, (f"{REGISTRY}/secret/*",), frozenset({"pull", "admin"})),
         AccessRule(("user:carol",), True, ("*",), frozenset({"pull", "admin"})))
READS = ("status", "effectiveness", "downloads", "upstreams", "storage", "images", "failures")


def write_htpasswd(path: Path) -> Path:
    # Cost 4: the check is bcrypt's either way, just quicker for tests.
    path.write_text("".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}\n"
                            for user, pw in USERS.items()))
    path.chmod(0o600)
    return path


async def test_only_an_admin_changes_anything_and_nobody_sees_what_they_may_not_pull(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    team = add_image(fake, "team/app", "v1", [b"team layer"])
    secret = add_image(fake, "secret/app", "v1", [b"secret layer"], seed=1)
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", REGISTRY: fake.url},
                               auth=AuthConfig(htpasswd=write_htpasswd(tmp_path / "htpasswd"), rules=RULES),
                               username="mirror-account", password="upstream-secret-password")
    alice, bob, carol = (aiohttp.encode_basic_auth(user, USERS[user]) for user in ("alice", "bob", "carol"))
    for image in (team, secret):
        pulled = await fetch(client, f"{mirror.url}/v2/{REGISTRY}/{image.name}/manifests/v1",
                             headers={"Authorization": alice})
        assert pulled.status == 200
    denied = await fetch(client, f"{mirror.url}/v2/{REGISTRY}/secret/absent/manifests/v1",
                         headers={"Authorization": alice})
    assert denied.status == 404

    # Anonymous: a login is needed for everything, the page included, and a browser is asked for it.
    for view in READS:
        status, body = await api(client, mirror, view, token=None)
        assert (status, body["errors"][0]["code"]) == (401, "UNAUTHORIZED")
    async with client.get(f"{mirror.url}/status") as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Basic ")
    for action, body in (("pin", {"image": f"{REGISTRY}/team/app:v1"}), ("gc", {}), ("seed", {"images": ["x"]})):
        assert (await api(client, mirror, action, "POST", body, token=None))[0] == 401
    # The admin token is not configured: a bearer token is only a bad login.
    assert (await api(client, mirror, "images", token=TOKEN))[0] == 401

    # bob sees what he may pull, and changes nothing.
    async with client.get(f"{mirror.url}/status", headers={"Authorization": bob}) as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    seen = {view: (await api(client, mirror, view, token=None, auth=bob)) for view in READS}
    assert all(status == 200 for status, _ in seen.values())
    assert [(i["name"], i["tag"]) for i in seen["images"][1]] == [("team/app", "v1")]
    assert seen["failures"][1] == []
    assert [r["repository"] for r in seen["storage"][1]["top_by_size"]] == [f"{REGISTRY}/team/app"]
    assert seen["status"][1]["viewer"] == {"user": "bob", "admin": False}
    for action, body in (("pin", {"image": f"{REGISTRY}/team/app:v1"}), ("unpin", {"image": f"{REGISTRY}/team/app:v1"}),
                         ("gc", {"dry_run": True}), ("seed", {"images": [f"{REGISTRY}/team/app:v1"]})):
        status, answer = await api(client, mirror, action, "POST", body, token=None, auth=bob)
        assert (status, answer["errors"][0]["code"]) == (403, "DENIED"), action
    _, images = await api(client, mirror, "images", token=None, auth=alice)
    assert not any(i["pinned"] for i in images)
    _, upstreams = await api(client, mirror, "upstreams", token=None, auth=bob)
    assert {u["name"]: u["credentials"] for u in upstreams}[REGISTRY] == "configured"

    # carol administers all but secret/*: she pins team images, and never a secret one, not even
    # by naming its digest under a repository of hers; gc (everywhere, no exception) is not hers.
    _, images = await api(client, mirror, "images", token=None, auth=carol)
    assert [(i["name"], i["can_pin"]) for i in images] == [("team/app", True)]
    status, answer = await api(client, mirror, "pin", "POST", {"image": f"{REGISTRY}/team/app@{secret.digest}"},
                               token=None, auth=carol)
    assert (status, answer["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")
    for action, body in (("pin", {"image": f"{REGISTRY}/secret/app:v1"}), ("gc", {"dry_run": True}),
                         ("seed", {"images": [f"{REGISTRY}/team/app:v1", f"{REGISTRY}/secret/app:v1"]})):
        status, answer = await api(client, mirror, action, "POST", body, token=None, auth=carol)
        assert (status, answer["errors"][0]["code"]) == (403, "DENIED"), action
    status, pinned = await api(client, mirror, "pin", "POST", {"image": f"{REGISTRY}/team/app@{team.digest}"},
                               token=None, auth=carol)
    assert (status, pinned["pinned"]) == (200, True)
    status, pinned = await api(client, mirror, "unpin", "POST", {"image": f"{REGISTRY}/team/app:v1"},
                               token=None, auth=carol)
    assert (status, pinned["pinned"]) == (200, False)
    _, images = await api(client, mirror, "images", token=None, auth=alice)
    assert not any(i["pinned"] for i in images)
    async with client.get(f"{mirror.url}/api/v1/images", headers={"Authorization": "Bearer \udcff"}) as response:
        assert response.status == 401

    # alice sees everything and may do anything.
    _, images = await api(client, mirror, "images", token=None, auth=alice)
    assert sorted(i["name"] for i in images) == ["secret/app", "team/app"]
    _, failures = await api(client, mirror, "failures", token=None, auth=alice)
    assert [f["name"] for f in failures] == ["secret/absent"]
    status, pinned = await api(client, mirror, "pin", "POST", {"image": f"{REGISTRY}/secret/app:v1"},
                               token=None, auth=alice)
    assert (status, pinned["digest"], pinned["pinned"]) == (200, secret.digest, True)
    status, answer = await api(client, mirror, "gc", "POST", {"dry_run": True}, token=None, auth=alice)
    assert (status, answer["errors"][0]["code"]) == (400, "UNSUPPORTED")  # no budget, no max_age: nothing to do

    # Nothing anywhere reveals the upstream's credentials.
    for view in READS:
        _, body = await api(client, mirror, view, token=None, auth=alice)
        assert "upstream-secret-password" not in json.dumps(body)
    _, upstreams = await api(client, mirror, "upstreams", token=None, auth=alice)
    assert {u["name"]: u["credentials"] for u in upstreams}[REGISTRY] == "username mirror-account"


async def test_without_accounts_the_api_is_read_only_except_to_the_admin_token(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    add_image(fake, "team/app", "v1", [b"layer"])
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", REGISTRY: fake.url},
                               admin_token_file=token_file(tmp_path))
    assert (await pull_manifest(client, mirror, f"{REGISTRY}/team/app", "v1")).status == 200
    for view in READS:
        assert (await api(client, mirror, view, token=None))[0] == 200
    body = {"image": f"{REGISTRY}/team/app:v1"}
    for token in (None, "wrong-token-0123456789abcdef"):
        status, answer = await api(client, mirror, "pin", "POST", body, token=token)
        assert (status, answer["errors"][0]["code"]) == (403, "DENIED")
    assert (await api(client, mirror, "pin", "POST", body))[1]["pinned"] is True
    # Bad requests are told, and change nothing.
    for bad, code in (({"image": ""}, "UNSUPPORTED"), ({"image": "team/../x:v1"}, "NAME_INVALID"),
                      ({"image": f"{REGISTRY}/team/absent:v1"}, "MANIFEST_UNKNOWN")):
        status, answer = await api(client, mirror, "unpin", "POST", bad)
        assert answer["errors"][0]["code"] == code and status in (400, 404), (bad, answer)
    async with client.post(f"{mirror.url}/api/v1/pin", data=b"image=x",
                           headers={"Authorization": f"Bearer {TOKEN}",
                                    "Content-Type": "application/x-www-form-urlencoded"}) as response:
        assert response.status == 400  # a form (another site's) is not the API's JSON
    _, images = await api(client, mirror, "images", token=None)
    assert [i["pinned"] for i in images] == [True]

    # Seeding through the API fetches and pins at once; a bad reference is told.
    seeded = add_image(fake, "team/seeded", "v2", [b"seeded layer"], seed=2)
    status, results = await api(client, mirror, "seed", "POST", {"images": [f"{REGISTRY}/team/seeded:v2"]})
    assert (status, [(r["digest"], r["pinned"]) for r in results]) == (200, [(seeded.digest, True)])
    status, answer = await api(client, mirror, "seed", "POST", {"images": ["UPPER/Case:v1"]})
    assert (status, answer["errors"][0]["code"]) == (400, "UNSUPPORTED")
    _, images = await api(client, mirror, "images", token=None)
    assert {(i["name"], i["pinned"]) for i in images} == {("team/app", True), ("team/seeded", True)}
    assert (await pull_blob(client, mirror, f"{REGISTRY}/team/seeded", seeded.layers[0])).headers[CACHE] == "HIT"


async def mirror_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_pin_unpin_gc_and_ls_against_a_running_mirror(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    clock = Clock()
    kept = add_image(fake, "team/kept", "v1", [random.Random(3).randbytes(100_000)])
    dropped = add_image(fake, "team/dropped", "v1", [random.Random(4).randbytes(100_000)], seed=1)
    cache = tmp_path / "cache"
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", REGISTRY: fake.url}, cache_dir=cache,
                               clock=clock, max_ages={REGISTRY: 3600}, admin_token_file=token_file(tmp_path))
    for image in (kept, dropped):
        assert (await pull_manifest(client, mirror, f"{REGISTRY}/{image.name}", "v1")).status == 200
        for digest in (image.config, *image.layers):
            assert (await pull_blob(client, mirror, f"{REGISTRY}/{image.name}", digest)).status == 200
    server = ["--server", mirror.url, "--token-file", str(tmp_path / "admin.token")]

    # Beside the serving mirror, a cache-directory gc refuses, and says what to do instead.
    code, _, err = await mirror_cli("gc", "--cache-dir", str(cache), "--max-size", "1GiB")
    assert code == 1 and "--server" in err

    code, out, err = await mirror_cli("pin", *server, f"{REGISTRY}/team/dropped:v1")
    assert code == 0, err
    assert out.split() == ["pinned", f"{REGISTRY}/team/dropped", dropped.digest]
    code, out, _ = await mirror_cli("unpin", *server, "--json", f"{REGISTRY}/team/dropped:v1")
    assert json.loads(out)["pinned"] is False
    code, out, err = await mirror_cli("pin", *server, f"{REGISTRY}/team/kept:v1")
    assert code == 0, err
    code, out, err = await mirror_cli("ls", *server, "--json")
    assert code == 0, err
    assert {(i["name"], i["pinned"]) for i in json.loads(out)} == {("team/kept", True), ("team/dropped", False)}
    code, out, _ = await mirror_cli("ls", *server)
    assert [line.split()[-1] for line in out.splitlines() if "team/kept" in line] == ["yes"]

    clock.advance(7200)
    code, out, err = await mirror_cli("gc", *server, "--dry-run", "--json")
    assert code == 0, err
    planned = {e["digest"] for e in json.loads(out)["evicted"]}
    assert planned == {dropped.digest, dropped.config, *dropped.layers}
    assert all((await api(client, mirror, "images"))[1])  # a dry run changes nothing
    code, out, err = await mirror_cli("gc", *server, "--json")
    assert code == 0, err
    assert {e["digest"] for e in json.loads(out)["evicted"]} == planned
    files = {p.name for p in cache.rglob("*") if p.is_file()}
    assert not {d.removeprefix("sha256:") for d in planned} & files
    assert {d.removeprefix("sha256:") for d in (kept.digest, kept.config, *kept.layers)} <= files
    code, out, _ = await mirror_cli("ls", *server, "--json")
    assert [i["name"] for i in json.loads(out)] == ["team/kept"]
    assert (await pull_blob(client, mirror, f"{REGISTRY}/team/kept", kept.layers[0])).headers[CACHE] == "HIT"

    # Without the token: refused, and said so.
    code, _, err = await mirror_cli("pin", "--server", mirror.url, f"{REGISTRY}/team/kept:v1")
    assert code == 1 and "admin" in err
    code, _, err = await mirror_cli("gc", "--server", mirror.url, "--max-size", "1GiB")
    assert code == 2 and "--max-size" in err
    code, _, err = await mirror_cli("pin", "--token-file", str(tmp_path / "admin.token"), "alpine:3.19")
    assert code == 2 and "--server" in err
    code, _, err = await mirror_cli("ls", *server, "--user", "alice")
    assert code == 2 and "not both" in err
    code, _, err = await mirror_cli("pin", *server, "team/UPPER:v1")
    assert code == 2 and "UPPER" in err


async def test_recent_failures_say_why_a_pull_failed(
        make_mirror: MirrorFactory, fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """An upstream 404, a refusal, a blob whose bytes do not match its digest (cut after its
    headers went out), an offline miss: each is listed with what the client was told."""
    broken = add_image(fake, "team/broken", "v1", [random.Random(5).randbytes(200_000)])
    fake.corrupt.add(broken.layers[0])
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", REGISTRY: fake.url},
                               admin_token_file=token_file(tmp_path),
                               auth=AuthConfig(rules=(AccessRule(("*",), False, (f"{REGISTRY}/private/*",)),
                                                      AccessRule(("*",), True, ("*",)))))
    assert (await pull_manifest(client, mirror, f"{REGISTRY}/team/absent", "v1")).status == 404
    assert (await pull_manifest(client, mirror, f"{REGISTRY}/private/app", "v1")).status == 403
    assert (await pull_manifest(client, mirror, f"{REGISTRY}/team/broken", "v1")).status == 200
    try:
        await pull_blob(client, mirror, f"{REGISTRY}/team/broken", broken.layers[0])
    except aiohttp.ClientPayloadError:
        pass  # cut short, as it must be
    else:
        raise AssertionError("a blob that does not match its digest was served whole")
    _, failures = await api(client, mirror, "failures")
    assert [(f["name"], f["status"], f["code"]) for f in failures] == [
        ("team/broken", 502, "UNAVAILABLE"), ("private/app", 403, "DENIED"), ("team/absent", 404, "MANIFEST_UNKNOWN")]
    assert "digest" in failures[0]["message"]
    # Anonymous callers may pull team/* but not private/*: they do not see that one.
    _, shown = await api(client, mirror, "failures", token=None)
    assert [f["name"] for f in shown] == ["team/broken", "team/absent"]

    offline = await make_mirror({"docker.io": "http://127.0.0.1:9", REGISTRY: fake.url}, offline=True,
                                admin_token_file=token_file(tmp_path))
    assert (await pull_manifest(client, offline, f"{REGISTRY}/team/never", "v1")).status == 404
    _, failures = await api(client, offline, "failures")
    assert [(f["name"], f["code"]) for f in failures] == [("team/never", "MANIFEST_UNKNOWN")]
    assert "offline" in failures[0]["message"]
    _, upstreams = await api(client, offline, "upstreams")
    assert {u["name"]: u["state"] for u in upstreams}[REGISTRY] == "offline"


async def test_an_index_lists_which_platforms_are_cached(make_mirror: MirrorFactory, registry: Registry,
                                                         client: aiohttp.ClientSession) -> None:
    index = registry.images["index"]
    amd64 = index.children[0]
    mirror = await make_mirror({"docker.io": registry.url})
    assert (await pull_manifest(client, mirror, "library/multi", "1.0")).status == 200
    assert (await pull_manifest(client, mirror, "library/multi", amd64.digest)).status == 200
    _, images = await api(client, mirror, "images", token=None)
    assert [(i["name"], i["tag"], i["platforms"]) for i in images] == [
        ("library/multi", "1.0", [{"platform": "linux/amd64", "present": True},
                                  {"platform": "linux/arm64", "present": False}])]


async def test_the_metrics_listener_shows_the_page_and_changes_only_without_tls(
        fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Beside a TLS API, the plain-HTTP metrics listener only shows: an administrator's token
    would cross it in the clear."""
    add_image(fake, "team/app", "v1", [b"layer"])
    for tls, may_change in ((None, True), (TlsConfig(tmp_path / "tls.crt", tmp_path / "tls.key"), False)):
        config = Config(host="127.0.0.1", port=0, cache_dir=tmp_path / f"cache-{may_change}",
                        default_upstream=REGISTRY, admin_token_file=token_file(tmp_path), tls=tls,
                        upstreams=(UpstreamConfig(name=REGISTRY, url=fake.url),))
        app = create_app(config)
        api_server, ops_server = TestServer(app, host="127.0.0.1"), TestServer(create_ops_app(app, config),
                                                                              host="127.0.0.1")
        await api_server.start_server()
        await ops_server.start_server()
        try:
            assert (await pull_manifest(client, Mirror(api_server, app[SERVICES]), "team/app", "v1")).status == 200
            ops = Mirror(ops_server, app[SERVICES])
            async with client.get(f"{ops.url}/status") as response:
                assert response.status == 200
            status, images = await api(client, ops, "images")
            assert (status, [i["can_pin"] for i in images]) == (200, [may_change])
            status, answer = await api(client, ops, "pin", "POST", {"image": f"{REGISTRY}/team/app:v1"})
            assert (status == 200) is may_change, answer
        finally:
            await ops_server.close()
            await api_server.close()
