"""The cluster's index in Redis: the same contract as the SQLite one (every contract test runs
against both), shared by every replica on one Redis, and a Redis that goes away costs no pull."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mirror import redisindex
from mirror.errors import CacheWriteError
from mirror.index import (
    CachedImage,
    Index,
    Miss,
    Reconciled,
    SqliteIndex,
    TagRecord,
    cached_images,
    recorded_misses,
    set_pinned,
)
from mirror.oci import OCI_INDEX, OCI_MANIFEST, Digest
from mirror.redisindex import RedisIndex
from tests.conftest import require_binary
from tests.support.redis_server import RedisServer
from tests.support.registry import free_port

UP, OTHER, KEEP = "docker.io", "ghcr.io", "keep.test"
RECOVERY_TIMEOUT = 10.0


def digest(name: str) -> Digest:
    return Digest.of(name.encode())


class Clock:
    def __init__(self) -> None:
        self.now = 1.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """An index and the operator's views of it (SQLite: the module functions on its file)."""

    index: SqliteIndex | RedisIndex
    clock: Clock
    images: Callable[[], Awaitable[list[CachedImage]]]
    misses: Callable[[], Awaitable[list[Miss]]]
    set_pinned: Callable[[str, str, str, bool], Awaitable[str | None]]


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    clock = Clock()
    if request.param == "sqlite":
        path = tmp_path / "index.db"
        sqlite = SqliteIndex(path, clock=clock)
        made = Backend(sqlite, clock, lambda: asyncio.to_thread(cached_images, path),
                       lambda: asyncio.to_thread(recorded_misses, path),
                       lambda *args: asyncio.to_thread(set_pinned, path, *args))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        redis = RedisIndex(server.url, clock=clock)
        made = Backend(redis, clock, redis.images, redis.misses, redis.set_pinned)
    await made.index.open()
    try:
        yield made
    finally:
        await made.index.close()


@pytest.fixture
async def index(backend: Backend) -> Index:
    return backend.index


async def add_blobs(backend: Backend, *blobs: tuple[Digest, int, float]) -> None:
    """(digest, size, time it is added) each."""
    for d, size, at in blobs:
        backend.clock.now = at
        assert await backend.index.add_blob(d, size)


# The Index contract, for SQLite and Redis alike


async def test_tags_are_set_moved_and_dropped(index: Index) -> None:
    a, b = digest("a"), digest("b")
    assert await index.tag(UP, "lib/x", "1") is None
    await index.set_tag(UP, "lib/x", "1", TagRecord(a, 1.5))
    await index.set_tag(UP, "lib/x", "2", TagRecord(a, 2.0))
    await index.set_tag(OTHER, "lib/x", "9", TagRecord(a, 2.0))
    assert await index.tag(UP, "lib/x", "1") == TagRecord(a, 1.5)
    assert sorted(await index.cached_tags(UP, "lib/x")) == ["1", "2"]
    assert await index.cached_tags(UP, "lib/y") == []

    await index.set_tag(UP, "lib/x", "1", TagRecord(b, 3.25))
    assert await index.tag(UP, "lib/x", "1") == TagRecord(b, 3.25)
    await index.drop_tag(UP, "lib/x", "2")
    await index.drop_tag(UP, "lib/x", "never")
    assert await index.tag(UP, "lib/x", "2") is None
    assert await index.cached_tags(UP, "lib/x") == ["1"]
    assert await index.cached_tags(OTHER, "lib/x") == ["9"]


async def test_manifests_link_their_repository_to_all_they_reference(index: Index) -> None:
    top, child, layer = digest("top"), digest("child"), digest("layer")
    await index.add_manifest(UP, "lib/x", top, OCI_INDEX, [child])
    await index.add_manifest(UP, "lib/x", child, OCI_MANIFEST, [layer])
    assert (await index.manifest_type(top), await index.manifest_type(child)) == (OCI_INDEX, OCI_MANIFEST)
    assert await index.manifest_type(layer) is None
    assert all([await index.is_linked(UP, "lib/x", d) for d in (top, child, layer)])
    assert not await index.is_linked(UP, "lib/y", layer)
    assert not await index.is_linked(OTHER, "lib/x", layer), "visibility is per upstream too"
    await index.link(UP, "lib/y", layer)
    assert await index.is_linked(UP, "lib/y", layer)
    assert await index.parents(child) == [top]
    assert await index.parents(layer) == [child]
    assert await index.parents(top) == []


async def test_a_blob_is_counted_once(index: Index) -> None:
    a, b = digest("a"), digest("b")
    assert await index.usage() == (0, 0)
    assert await index.add_blob(a, 10)
    assert not await index.add_blob(a, 10)
    assert await index.add_blob(b, 5)
    assert await index.usage() == (2, 15)


async def test_least_recently_used_goes_first(backend: Backend) -> None:
    index = backend.index
    a, b, c = digest("a"), digest("b"), digest("c")
    await add_blobs(backend, (a, 1, 1.0), (b, 2, 2.0), (c, 3, 3.0))
    assert await index.eviction_candidates(10) == [(a, 1), (b, 2), (c, 3)]

    backend.clock.now = 10.0
    index.touch(a)
    assert await index.eviction_candidates(10) == [(b, 2), (c, 3), (a, 1)], "touched: used last"
    backend.clock.now = 0.5
    index.touch(c)
    index.touch(digest("never recorded"))
    await index.flush_access()
    assert await index.eviction_candidates(2) == [(b, 2), (c, 3)], "an earlier access moves nothing back"
    assert await index.usage() == (3, 6), "a touch records no blob"


async def test_pinned_and_referenced_content_waits_for_its_manifest(backend: Backend) -> None:
    index = backend.index
    top, child, layer = digest("top"), digest("child"), digest("layer")
    await index.add_manifest(UP, "lib/x", top, OCI_INDEX, [child])
    await index.add_manifest(UP, "lib/x", child, OCI_MANIFEST, [layer])
    orphan, parentless = digest("orphan"), digest("its manifest is not cached")
    await index.add_manifest(UP, "lib/y", orphan, OCI_MANIFEST, [parentless])
    await add_blobs(backend, (top, 1, 1.0), (child, 2, 2.0), (layer, 3, 3.0), (parentless, 4, 4.0))
    assert await index.eviction_candidates(10) == [(top, 1), (parentless, 4)]

    assert await index.pin(top)
    assert not await index.pin(digest("unknown"))
    assert not await index.pin(orphan), "a manifest whose bytes are not cached cannot be pinned"
    assert await index.eviction_candidates(10) == [(parentless, 4)]
    assert await index.pin(top, False)
    assert await index.eviction_candidates(10) == [(top, 1), (parentless, 4)]

    assert await index.forget(top), "it referenced content"
    assert await index.eviction_candidates(10) == [(child, 2), (parentless, 4)]
    assert await index.forget(child)
    assert await index.eviction_candidates(10) == [(layer, 3), (parentless, 4)]
    assert not await index.forget(layer), "a layer references nothing"
    assert await index.usage() == (1, 4)


async def test_forget_drops_the_tags_naming_it(backend: Backend) -> None:
    index = backend.index
    a, b, layer = digest("a"), digest("b"), digest("layer")
    await index.add_manifest(UP, "lib/x", a, OCI_MANIFEST, [layer])
    await index.add_manifest(UP, "lib/x", b, OCI_MANIFEST, [])
    await add_blobs(backend, (a, 1, 1.0), (b, 2, 1.0), (layer, 3, 1.0))
    await index.set_tag(UP, "lib/x", "1", TagRecord(a, 1.0))
    await index.set_tag(UP, "lib/x", "2", TagRecord(b, 1.0))
    await index.set_tag(OTHER, "lib/z", "3", TagRecord(a, 1.0))
    await index.set_tag(UP, "lib/x", "moved", TagRecord(a, 1.0))
    await index.set_tag(UP, "lib/x", "moved", TagRecord(b, 2.0))
    assert await index.manifest_type(a) == OCI_MANIFEST  # remembered, and forgotten with it

    assert await index.forget(a)
    assert await index.tag(UP, "lib/x", "1") is None
    assert await index.tag(OTHER, "lib/z", "3") is None
    assert await index.tag(UP, "lib/x", "moved") == TagRecord(b, 2.0), "it names another digest now"
    assert sorted(await index.cached_tags(UP, "lib/x")) == ["2", "moved"]
    assert await index.cached_tags(OTHER, "lib/z") == []
    assert await index.manifest_type(a) is None
    assert not await index.is_linked(UP, "lib/x", a)
    assert await index.is_linked(UP, "lib/x", layer), "what it referenced keeps its own links"
    assert await index.parents(layer) == []
    assert await index.usage() == (2, 5)


async def test_expiry_needs_every_linking_upstream_past_its_cutoff(backend: Backend) -> None:
    index = backend.index
    cutoffs = {UP: 100.0, OTHER: 50.0}
    old_here = digest("linked by docker.io only, used at 80")
    kept_there = digest("linked by both, used at 80: ghcr.io keeps it")
    old_both = digest("linked by both, used at 40")
    kept_forever = digest("linked by keep.test, which has no cutoff")
    unlinked = digest("linked by no one")
    pinned = digest("pinned")
    at_cutoff = digest("used exactly at the cutoff")
    for d, upstreams in ((old_here, [UP]), (kept_there, [UP, OTHER]), (old_both, [UP, OTHER]),
                         (kept_forever, [UP, KEEP]), (pinned, [UP]), (at_cutoff, [UP])):
        for upstream in upstreams:
            await index.link(upstream, "lib/x", d)
    await add_blobs(backend, (kept_forever, 1, 10.0), (unlinked, 2, 10.0), (pinned, 3, 10.0), (old_both, 4, 40.0),
                    (old_here, 5, 80.0), (kept_there, 6, 80.0), (at_cutoff, 7, 100.0))
    assert await index.pin(pinned)

    assert await index.expired_candidates(cutoffs, 10) == [(old_both, 4), (old_here, 5)]
    assert await index.expired_candidates(cutoffs, 1) == [(old_both, 4)]
    assert await index.expired_candidates({KEEP: 1000.0}, 10) == []


async def test_reconcile_makes_the_records_match_the_files(backend: Backend) -> None:
    index = backend.index
    kept, gone, found = digest("kept"), digest("gone"), digest("found")
    await add_blobs(backend, (kept, 20, 1.0), (gone, 10, 1.0))
    files = {str(kept): (20, 5.0), str(found): (30, 0.5)}
    assert await index.reconcile(files) == Reconciled(added=1, removed=1)
    assert await index.usage() == (2, 50)
    assert await index.eviction_candidates(10) == [(found, 30), (kept, 20)], "a found file was last used at its mtime"
    assert await index.reconcile(files) == Reconciled(0, 0)


async def test_misses_are_counted_most_asked_first_and_cleared(backend: Backend) -> None:
    index, clock = backend.index, backend.clock
    layer = str(digest("layer"))
    clock.now = 1.0
    await index.record_miss(UP, "lib/y", layer, "blob")
    for now in (2.0, 3.5):
        clock.now = now
        await index.record_miss(UP, "lib/x", "1", "manifest")
    assert await backend.misses() == [Miss(UP, "lib/x", "1", "manifest", 2, 3.5),
                                      Miss(UP, "lib/y", layer, "blob", 1, 1.0)]
    await index.clear_miss(UP, "lib/x", "1")
    await index.clear_miss(UP, "lib/x", "never asked")
    assert await backend.misses() == [Miss(UP, "lib/y", layer, "blob", 1, 1.0)]


async def test_operator_views(backend: Backend) -> None:
    """What `mirror ls` and `mirror pin` show: a tag with its whole tree, pinned by tag or digest."""
    index = backend.index
    top, child, layer, config = digest("top"), digest("child"), digest("layer"), digest("config")
    await index.add_manifest(UP, "lib/x", top, OCI_INDEX, [child])
    await index.add_manifest(UP, "lib/x", child, OCI_MANIFEST, [layer, config])
    await add_blobs(backend, (top, 100, 5.0), (child, 50, 6.0), (layer, 1000, 7.0))  # the config is not cached
    await index.set_tag(UP, "lib/x", "1", TagRecord(top, 8.0))
    await index.set_tag(UP, "lib/x", "child", TagRecord(child, 9.0))
    await index.set_tag(UP, "lib/x", "ghost", TagRecord(digest("a manifest never stored"), 9.0))
    assert await backend.images() == [
        CachedImage(UP, "lib/x", "1", str(top), OCI_INDEX, 3, 1150, 5.0, 8.0),
        CachedImage(UP, "lib/x", "child", str(child), OCI_MANIFEST, 2, 1050, 6.0, 9.0)]

    assert await backend.set_pinned(UP, "lib/x", "1", True) == str(top)
    assert await index.eviction_candidates(10) == []
    assert await backend.set_pinned(UP, "lib/x", "1", False) == str(top)
    assert await index.eviction_candidates(10) == [(top, 100)]
    assert await backend.set_pinned(UP, "lib/x", str(top), True) == str(top)
    assert await index.eviction_candidates(10) == []
    assert await backend.set_pinned(UP, "lib/x", "nope", True) is None
    assert await backend.set_pinned(UP, "lib/x", str(layer), True) is None, "a layer is no image"
    assert await backend.set_pinned(UP, "lib/x", "ghost", True) is None

    # The same through the index itself, as a running mirror's admin API asks it.
    assert [(i.tag, i.pinned) for i in await index.images()] == [("1", True), ("child", False)]
    assert await index.pinned_usage() == (3, 1150)
    assert await index.set_pinned(UP, "lib/x", "child", True) == str(child)
    assert await index.pinned_usage() == (3, 1150), "what two pinned trees share counts once"
    assert await index.set_pinned(UP, "lib/x", "1", False) == str(top)
    assert await index.pinned_usage() == (2, 1050)


async def test_operator_views_of_an_empty_index(backend: Backend) -> None:
    assert await backend.images() == []
    assert await backend.misses() == []


async def test_candidates_are_found_past_many_that_may_not_go(backend: Backend,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis walks the access order a window at a time (two entries here)."""
    monkeypatch.setattr(redisindex, "_SCAN", 2)
    index = backend.index
    pinned = [digest(f"pinned {n}") for n in range(5)]
    free = [digest(f"free {n}") for n in range(3)]
    for n, d in enumerate(pinned + free):
        await add_blobs(backend, (d, n, float(n)))
        await index.link(UP, "lib/x", d)
    for d in pinned:
        assert await index.pin(d)
    assert await index.eviction_candidates(2) == [(free[0], 5), (free[1], 6)]
    assert await index.eviction_candidates(10) == [(free[0], 5), (free[1], 6), (free[2], 7)]
    assert await index.expired_candidates({UP: 6.5}, 10) == [(free[0], 5), (free[1], 6)]


async def test_a_referrers_list_hangs_from_its_subject_until_replaced(backend: Backend) -> None:
    index = backend.index
    subject, old, new, signature = digest("subject"), digest("old list"), digest("new list"), digest("signature")
    await index.add_manifest(UP, "lib/x", subject, OCI_MANIFEST, [])
    await index.add_manifest(UP, "lib/x", old, OCI_INDEX, [signature])
    await index.add_manifest(UP, "lib/x", new, OCI_INDEX, [signature])
    await add_blobs(backend, (subject, 1, 1.0), (old, 2, 2.0), (new, 3, 3.0), (signature, 4, 4.0))
    assert await index.referrers(UP, "lib/x", subject) is None

    await index.set_referrers(UP, "lib/x", subject, TagRecord(old, 1.5))
    assert await index.referrers(UP, "lib/x", subject) == TagRecord(old, 1.5)
    assert await index.referrers(UP, "lib/y", subject) is None, "a record is per repository"
    assert await index.referrers(OTHER, "lib/x", subject) is None
    assert await index.parents(old) == [subject]
    assert await index.eviction_candidates(10) == [(subject, 1), (new, 3)]

    await index.set_referrers(UP, "lib/x", subject, TagRecord(new, 2.5))
    assert await index.referrers(UP, "lib/x", subject) == TagRecord(new, 2.5)
    assert await index.parents(old) == [], "the replaced list hangs from nothing"
    assert await index.parents(new) == [subject]
    assert await index.eviction_candidates(10) == [(subject, 1), (old, 2)]
    assert await index.evictable([old, new]) == [(old, 2)]

    await index.set_referrers(UP, "lib/x", subject, TagRecord(new, 3.5))
    assert await index.referrers(UP, "lib/x", subject) == TagRecord(new, 3.5), "checked again, the same list"
    assert await index.parents(new) == [subject]
    assert await index.forget(subject) == [new], "the list is free to go with it"
    assert await index.eviction_candidates(10) == [(old, 2), (new, 3)]


async def test_a_list_two_repositories_share_hangs_until_both_replace_it(backend: Backend) -> None:
    index = backend.index
    subject, shared, x_list, y_list = digest("subject"), digest("shared"), digest("x's"), digest("y's")
    await add_blobs(backend, (subject, 1, 1.0), (shared, 2, 2.0), (x_list, 3, 3.0), (y_list, 4, 4.0))
    await index.set_referrers(UP, "lib/x", subject, TagRecord(shared, 1.0))
    await index.set_referrers(UP, "lib/y", subject, TagRecord(shared, 1.0))

    await index.set_referrers(UP, "lib/x", subject, TagRecord(x_list, 2.0))
    assert await index.parents(shared) == [subject], "lib/y still uses it"
    assert await index.evictable([shared, x_list]) == []
    assert await index.referrers(UP, "lib/y", subject) == TagRecord(shared, 1.0)

    await index.set_referrers(UP, "lib/y", subject, TagRecord(y_list, 2.0))
    assert await index.parents(shared) == []
    assert await index.evictable([shared, x_list, y_list]) == [(shared, 2)]
    assert await index.eviction_candidates(10) == [(subject, 1), (shared, 2)]


async def test_an_attachment_goes_with_its_subject(backend: Backend) -> None:
    index = backend.index
    subject, signature, sbom = digest("subject"), digest("signature"), digest("sbom")
    await index.add_manifest(UP, "lib/x", subject, OCI_MANIFEST, [])
    await add_blobs(backend, (subject, 1, 1.0), (signature, 2, 2.0), (sbom, 3, 3.0))
    await index.attach(subject, signature)
    await index.attach(subject, signature)
    await index.attach(subject, sbom)
    assert await index.parents(signature) == [subject]
    assert await index.evictable([signature, sbom]) == []
    assert await index.eviction_candidates(10) == [(subject, 1)]

    assert await index.pin(subject)
    assert await index.eviction_candidates(10) == [], "pinned with it"
    assert await index.pin(subject, False)
    assert set(await index.forget(subject)) == {signature, sbom}
    assert await index.parents(signature) == []
    assert await index.evictable([signature, sbom]) == [(signature, 2), (sbom, 3)]


async def test_verdicts_are_kept_per_subject_signature_and_keyring(index: Index) -> None:
    subject, signature, other = digest("subject"), digest("signature"), digest("other signature")
    assert await index.verdict(subject, signature, "keys-1") is None
    await index.set_verdict(subject, signature, "keys-1", True)
    await index.set_verdict(subject, other, "keys-1", False)
    assert await index.verdict(subject, signature, "keys-1") is True
    assert await index.verdict(subject, other, "keys-1") is False
    assert await index.verdict(subject, signature, "keys-2") is None, "another key set was never asked"
    assert await index.verdict(other, signature, "keys-1") is None
    await index.set_verdict(subject, signature, "keys-1", False)
    assert await index.verdict(subject, signature, "keys-1") is False


async def test_forget_drops_referrers_and_verdicts_naming_it(index: Index) -> None:
    subject, other, listed, kept = digest("subject"), digest("other subject"), digest("list"), digest("kept list")
    signature, other_signature = digest("signature"), digest("other signature")
    await index.set_referrers(UP, "lib/x", subject, TagRecord(listed, 1.0))
    await index.set_referrers(UP, "lib/y", subject, TagRecord(kept, 1.0))
    await index.set_referrers(UP, "lib/x", other, TagRecord(listed, 1.0))
    await index.set_referrers(UP, "lib/y", other, TagRecord(kept, 1.0))
    await index.set_verdict(subject, signature, "keys", True)
    await index.set_verdict(other, signature, "keys", True)
    await index.set_verdict(other, other_signature, "keys", False)

    assert set(await index.forget(subject)) == {listed, kept}
    assert await index.referrers(UP, "lib/x", subject) is None
    assert await index.referrers(UP, "lib/y", subject) is None
    assert await index.verdict(subject, signature, "keys") is None
    assert await index.verdict(other, signature, "keys") is True, "another subject's verdict stays"

    await index.forget(listed)
    assert await index.referrers(UP, "lib/x", other) is None, "its list is gone"
    assert await index.referrers(UP, "lib/y", other) == TagRecord(kept, 1.0)

    await index.forget(signature)
    assert await index.verdict(other, signature, "keys") is None
    assert await index.verdict(other, other_signature, "keys") is False


# Redis only: one index for every replica


async def test_replicas_on_one_redis_see_each_other(redis_server: RedisServer) -> None:
    one, two, elsewhere = (RedisIndex(redis_server.url), RedisIndex(redis_server.url),
                           RedisIndex(redis_server.url, prefix="other-cluster:"))
    for index in (one, two, elsewhere):
        await index.open()
    try:
        top, layer = digest("top"), digest("layer")
        await one.set_tag(UP, "lib/x", "1", TagRecord(top, 1.0))
        assert await two.tag(UP, "lib/x", "1") == TagRecord(top, 1.0)
        await one.add_manifest(UP, "lib/x", top, OCI_MANIFEST, [layer])
        assert await two.manifest_type(top) == OCI_MANIFEST
        assert await two.is_linked(UP, "lib/x", layer)
        await two.link(UP, "lib/y", layer)
        assert await one.is_linked(UP, "lib/y", layer)
        assert await one.add_blob(top, 10)
        assert not await two.add_blob(top, 10), "recorded by the other replica"
        assert await two.pin(top)
        assert await one.eviction_candidates(10) == []
        await two.drop_tag(UP, "lib/x", "1")
        assert await one.tag(UP, "lib/x", "1") is None, "tags are never served from a replica's memory"

        assert await elsewhere.tag(UP, "lib/x", "1") is None
        assert await elsewhere.usage() == (0, 0), "another prefix is another cluster"
    finally:
        for index in (one, two, elsewhere):
            await index.close()


async def test_forget_leaves_no_referrers_or_verdict_bookkeeping(redis_server: RedisServer) -> None:
    """The per-digest sets that make `forget` cheap go with what they name, or Redis grows forever."""
    index = RedisIndex(redis_server.url)
    await index.open()
    try:
        subject, shared, replacing, signature = digest("subject"), digest("shared"), digest("new"), digest("sig")
        other, its_list = digest("other subject"), digest("its list")
        await index.set_referrers(UP, "lib/x", subject, TagRecord(shared, 1.0))
        await index.set_referrers(UP, "lib/y", subject, TagRecord(shared, 1.0))
        await index.set_referrers(UP, "lib/x", subject, TagRecord(replacing, 2.0))
        await index.set_referrers(UP, "lib/y", subject, TagRecord(replacing, 2.0))
        await index.set_referrers(UP, "lib/x", other, TagRecord(its_list, 1.0))
        await index.set_verdict(subject, signature, "keys", True)
        await index.set_verdict(shared, signature, "keys", True)
        await index.set_verdict(its_list, its_list, "keys", False)
        await index.forget(subject)  # its list stays
        await index.forget(its_list)  # before its subject
        await index.forget(other)
        await index.forget(signature)  # shared stays
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            assert [key async for key in client.scan_iter("mirror:*")] == []
        finally:
            await client.aclose()
    finally:
        await index.close()


# Redis out of reach: slower, never failing


async def wait_for_redis(index: RedisIndex) -> None:
    """Until a write and a read go through again (the breaker closes within a second or so)."""
    record = TagRecord(digest("back"), 1.0)
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while True:
        await index.set_tag(UP, "probe", "1", record)
        if await index.tag(UP, "probe", "1") == record:
            return
        assert time.monotonic() < deadline, f"Redis still unused {RECOVERY_TIMEOUT} s after it came back"
        await asyncio.sleep(0.05)


async def test_redis_stopped_answers_as_if_nothing_were_cached(redis_server: RedisServer,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    index = RedisIndex(redis_server.url)
    await index.open()
    try:
        top, layer = digest("top"), digest("layer")
        await index.add_manifest(UP, "lib/x", top, OCI_MANIFEST, [layer])
        await index.set_tag(UP, "lib/x", "1", TagRecord(top, 1.0))
        assert await index.add_blob(top, 10)
        assert await index.manifest_type(top) == OCI_MANIFEST
        assert index.problem is None
        redis_server.stop()
        caplog.set_level(logging.WARNING, logger="mirror.redisindex")

        started = time.monotonic()
        assert await index.tag(UP, "lib/x", "1") is None
        assert time.monotonic() - started < 3.0
        assert index.problem is not None and index.problem.startswith(f"Redis at {redis_server.url} is unreachable")

        started = time.monotonic()
        assert await index.tag(UP, "lib/x", "1") is None
        assert await index.cached_tags(UP, "lib/x") == []
        assert await index.manifest_type(digest("not remembered")) is None
        assert await index.manifest_type(top) == OCI_MANIFEST, "immutable: still answered from memory"
        assert await index.is_linked(UP, "lib/x", layer), "remembered too"
        assert not await index.is_linked(UP, "lib/y", layer)
        assert await index.parents(layer) == []
        assert await index.usage() == (0, 0)
        assert await index.eviction_candidates(10) == []
        assert await index.expired_candidates({UP: 1e12}, 10) == []
        assert not await index.add_blob(layer, 5)
        assert not await index.pin(top)
        assert await index.reconcile({str(layer): (5, 1.0)}) == Reconciled(0, 0)
        await index.set_tag(UP, "lib/x", "2", TagRecord(top, 2.0))
        await index.drop_tag(UP, "lib/x", "1")
        await index.link(UP, "lib/z", layer)
        await index.add_manifest(UP, "lib/x", layer, OCI_MANIFEST, [])
        await index.record_miss(UP, "lib/x", "3", "manifest")
        await index.clear_miss(UP, "lib/x", "3")
        index.touch(top)
        await index.flush_access()
        assert not await index.forget(top)
        assert await index.referrers(UP, "lib/x", top) is None
        assert await index.verdict(top, layer, "keys") is None
        await index.set_referrers(UP, "lib/x", top, TagRecord(layer, 2.0))
        await index.attach(top, layer)
        await index.set_verdict(top, layer, "keys", True)
        assert time.monotonic() - started < 0.1, "with the breaker open, nothing waits for Redis"

        with pytest.raises(CacheWriteError):
            await index.ping()
        with pytest.raises(CacheWriteError, match="unreachable"):
            await index.images()
        warnings = [r for r in caplog.records if r.name == "mirror.redisindex" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, "an outage is logged once, not per call"

        redis_server.start()  # empty: nothing is persisted
        await wait_for_redis(index)
        assert index.problem is None
        await index.ping()
        assert await index.usage() == (0, 0)
        assert await index.add_blob(top, 10)
        assert await index.usage() == (1, 10)
    finally:
        await index.close()


async def test_access_times_wait_out_an_outage(tmp_path: Path) -> None:
    """A Redis that persists and comes back gets the accesses made while it was away."""
    clock = Clock()
    with RedisServer(tmp_path / "redis", binary=require_binary("redis-server"), appendonly=True) as server:
        index = RedisIndex(server.url, clock=clock)
        await index.open()
        try:
            a, b = digest("a"), digest("b")
            clock.now = 1.0
            await index.add_blob(a, 1)
            clock.now = 2.0
            await index.add_blob(b, 1)
            server.stop()
            clock.now = 3.0
            index.touch(a)
            await index.flush_access()
            assert index.problem is not None
            server.start()
            await wait_for_redis(index)
            assert await index.eviction_candidates(10) == [(b, 1), (a, 1)]
        finally:
            await index.close()


async def test_a_redis_that_does_not_answer_costs_one_timeout() -> None:
    """A Redis that accepts connections and never answers (frozen, or a black hole in between)."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    index = RedisIndex(f"redis://127.0.0.1:{port}/0")
    try:
        started = time.monotonic()
        await index.open()
        assert time.monotonic() - started < 3.0
        assert index.problem is not None
        started = time.monotonic()
        assert await index.tag(UP, "lib/x", "1") is None
        await index.set_tag(UP, "lib/x", "1", TagRecord(digest("a"), 1.0))
        assert time.monotonic() - started < 0.1
        with pytest.raises(CacheWriteError):
            await index.ping()
    finally:
        await index.close()
        silent.close()
        await silent.wait_closed()


async def test_the_password_is_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    index = RedisIndex(f"redis://mirror:s3cret@127.0.0.1:{port}/0")
    caplog.set_level(logging.WARNING, logger="mirror.redisindex")
    await index.open()
    try:
        assert index.problem is not None
        assert index.problem.startswith(f"Redis at redis://mirror:***@127.0.0.1:{port}/0 is unreachable")
        assert "s3cret" not in caplog.text
        with pytest.raises(CacheWriteError) as raised:
            await index.ping()
        assert "s3cret" not in raised.value.message
    finally:
        await index.close()
