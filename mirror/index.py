"""What is cached, beyond the bytes: tags, manifest media types, and which repository is known
to reference which content. `Index` is the seam: SQLite here for one process, Redis
(mirror.redisindex) for replicas that share one bucket.

SQLite (WAL) in one file next to the blobs; every call runs on one dedicated thread, so the
event loop never blocks on the database and the connection is never shared across threads.
Manifest and tag rows are written only after the bytes they name are published, so after a
crash the index can name at most content that is missing (treated as a miss), never content
that is wrong. A repository link records what the upstream confirmed that repository may see,
which holds whether or not the bytes are cached yet.

What a hit looks up (a tag, a manifest's media type, a repository link) is remembered once
read, so a hit costs no trip to the database thread. That is sound because this process is the
only writer of those tables (the cache lock; operator commands write only pins) and every write
goes through here: a tag write unremembers the tag (and a read that raced a write is not
remembered), and forgetting content (eviction, rare) clears it all.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from cachetools import LRUCache

from mirror.errors import CacheWriteError
from mirror.oci import Digest

T = TypeVar("T")
log = logging.getLogger(__name__)

INDEX_FILE = "index.db"
"""The index's file name in the cache directory."""

# Tags, media types and links remembered each (a few MB at most).
_REMEMBERED = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL,
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, name, tag)
);
CREATE TABLE IF NOT EXISTS links (
    upstream TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (upstream, name, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS refs (
    parent TEXT NOT NULL,
    child TEXT NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS misses (
    upstream TEXT NOT NULL,
    name TEXT NOT NULL,
    reference TEXT NOT NULL,
    kind TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (upstream, name, reference)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS referrers (
    upstream TEXT NOT NULL,
    name TEXT NOT NULL,
    subject TEXT NOT NULL,
    digest TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, name, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verdicts (
    subject TEXT NOT NULL,
    signature TEXT NOT NULL,
    keyring TEXT NOT NULL,
    valid INTEGER NOT NULL,
    PRIMARY KEY (subject, signature, keyring)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_by_child ON refs (child);
CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs (last_access);
"""
# Every digest a manifest reaches, itself included: an image's whole content.
_TREE = """
WITH RECURSIVE tree(digest) AS (
    SELECT :root UNION SELECT refs.child FROM refs JOIN tree ON refs.parent = tree.digest
)
SELECT COUNT(blobs.digest), COALESCE(SUM(blobs.size), 0) FROM tree JOIN blobs ON blobs.digest = tree.digest
"""
# Everything pinned manifests keep, each blob once.
_PINNED_TREE = """
WITH RECURSIVE tree(digest) AS (
    SELECT digest FROM blobs WHERE pinned UNION SELECT refs.child FROM refs JOIN tree ON refs.parent = tree.digest
)
SELECT COUNT(blobs.digest), COALESCE(SUM(blobs.size), 0) FROM tree JOIN blobs ON blobs.digest = tree.digest
"""


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    checked_at: float


@dataclass(frozen=True, slots=True)
class CachedImage:
    """A cached tag as an operator sees it."""

    upstream: str
    name: str
    tag: str
    digest: str
    media_type: str
    blobs: int
    size: int
    """Bytes on disk for the manifest and everything it reaches (shared blobs count in full)."""
    last_pulled: float | None
    checked_at: float
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Reconciled:
    added: int
    """Published files the index did not know (a crash between publishing and recording)."""
    removed: int
    """Rows whose file is gone."""


class Index(Protocol):
    """What the proxy, eviction and the commands need to know beyond the bytes. Manifest and tag
    records are written only after the bytes they name are published."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises unless the index answers (for the readiness probe)."""

    async def tag(self, upstream: str, name: str, tag: str) -> TagRecord | None: ...
    async def set_tag(self, upstream: str, name: str, tag: str, record: TagRecord) -> None: ...
    async def drop_tag(self, upstream: str, name: str, tag: str) -> None: ...
    async def cached_tags(self, upstream: str, name: str) -> list[str]: ...
    async def manifest_type(self, digest: Digest) -> str | None: ...

    async def add_manifest(self, upstream: str, name: str, digest: Digest, media_type: str,
                           references: Iterable[Digest]) -> None:
        """A stored manifest; the repository it came from is known to reference it and all it
        references."""

    async def parents(self, digest: Digest) -> list[Digest]:
        """The cached manifests (indexes) that reference `digest`."""

    async def referrers(self, upstream: str, name: str, subject: Digest) -> TagRecord | None:
        """The stored list of `subject`'s referrers in a repository, and when it was checked."""

    async def set_referrers(self, upstream: str, name: str, subject: Digest, record: TagRecord) -> None:
        """Replace a repository's list of `subject`'s referrers. The list hangs from its subject
        (evicted and pinned with it); a list no repository uses any more hangs from nothing."""

    async def attach(self, subject: Digest, attachment: Digest) -> None:
        """`attachment` (a signature, an SBOM, a referrers list) goes with `subject`: evicted
        and pinned with it."""

    async def verdict(self, subject: Digest, signature: Digest, keyring: str) -> bool | None:
        """Whether a signature manifest was found to sign `subject` by a key of `keyring` (a key
        set's fingerprint); None if it was never checked. Every part is content-addressed, so a
        verdict never goes stale."""

    async def set_verdict(self, subject: Digest, signature: Digest, keyring: str, valid: bool) -> None: ...

    async def add_blob(self, digest: Digest, size: int) -> bool:
        """A published blob; True if it was not known (its size is counted once)."""

    def touch(self, digest: Digest) -> None:
        """`digest` was read now (recorded by `flush_access`)."""

    async def flush_access(self) -> None: ...

    async def reconcile(self, files: Mapping[str, tuple[int, float]]) -> Reconciled:
        """Make the blob records match what the store holds ({digest: (size, mtime)})."""

    async def eviction_candidates(self, limit: int) -> list[tuple[Digest, int]]:
        """(digest, size) of unpinned content no cached manifest references, least recently
        used first."""

    async def expired_candidates(self, cutoffs: Mapping[str, float], limit: int) -> list[tuple[Digest, int]]:
        """As `eviction_candidates`, last accessed before the cutoff of every upstream that links
        it; an upstream without a cutoff keeps what it links."""

    async def forget(self, digest: Digest) -> list[Digest]:
        """Drop all that is recorded about evicted content and the tags naming it; what it
        referenced, which may now be free to go too."""

    async def evictable(self, digests: Sequence[Digest]) -> list[tuple[Digest, int]]:
        """(digest, size) of those of `digests` that are cached, unpinned and referenced by no
        cached manifest."""

    async def usage(self) -> tuple[int, int]:
        """(blobs, bytes) the cache holds."""

    async def pin(self, digest: Digest, pinned: bool = True) -> bool:
        """Keep a manifest (and all it references) from eviction; False if it is not cached."""

    async def is_linked(self, upstream: str, name: str, digest: Digest) -> bool: ...
    async def images(self) -> list[CachedImage]:
        """Every cached tag, with the size of all its manifest reaches."""
    async def set_pinned(self, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
        """Pin (or unpin) a cached image by tag or digest: its manifest's digest, or None if it is not cached."""
    async def pinned_usage(self) -> tuple[int, int]:
        """(blobs, bytes) that pinned images keep, each blob once."""
    async def link(self, upstream: str, name: str, digest: Digest) -> None: ...

    async def record_miss(self, upstream: str, name: str, reference: str, kind: str) -> None:
        """What an offline mirror was asked for and did not have, for the next image list."""

    async def clear_miss(self, upstream: str, name: str, reference: str) -> None: ...


class SqliteIndex:
    def __init__(self, path: Path, clock: Callable[[], float] | None = None, read_only: bool = False) -> None:
        """`read_only`: an index file that can be read but not written (a read-only or failing
        disk); every write then fails as a full disk's does."""
        self._path = path
        self._read_only = read_only
        self._clock = clock or time.time
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-index")
        self._db: sqlite3.Connection | None = None
        # Access times wait here for `flush_access`: a hit costs no disk write.
        self._accessed: dict[str, float] = {}
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(_REMEMBERED)
        # Tags dropped while the database could not take it: gone all the same.
        self._gone: LRUCache[tuple[str, str, str], bool] = LRUCache(_REMEMBERED)
        self._tag_writes = 0
        self._types: LRUCache[str, str] = LRUCache(_REMEMBERED)
        self._links: LRUCache[tuple[str, str, str], bool] = LRUCache(_REMEMBERED)

    async def open(self) -> None:
        await self._run(self._connect)

    def _connect(self) -> None:
        if self._read_only:
            db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, isolation_level=None)
        else:
            db = sqlite3.connect(self._path, isolation_level=None)
        try:
            if self._read_only:
                db.execute("SELECT 1 FROM blobs LIMIT 1").fetchall()
            else:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        try:
            await self.flush_access()
        except CacheWriteError as exc:
            # Access times only order eviction: losing the last batch is no reason not to close.
            log.warning("could not record access times: %s", exc.message)

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        """Raises sqlite3.Error unless the index answers (for the readiness probe)."""
        await self._run(lambda: self.db.execute("SELECT 1 FROM blobs LIMIT 1").fetchall())

    async def _run(self, fn: Callable[[], T]) -> T:
        """`fn` on the database thread. A database that fails (a full disk, an I/O error) is the
        cache failing: callers decide whether the request can be answered without it."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise CacheWriteError(f"the cache index failed: {exc}", _index_detail(exc)) from exc

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "index used before open()"
        return self._db

    async def tag(self, upstream: str, name: str, tag: str) -> TagRecord | None:
        key = (upstream, name, tag)
        if (known := self._tags.get(key)) is not None:
            return known
        if key in self._gone:
            return None
        writes = self._tag_writes

        def query() -> TagRecord | None:
            row = self.db.execute("SELECT digest, checked_at FROM tags WHERE upstream=? AND name=? AND tag=?",
                                  key).fetchone()
            return TagRecord(Digest.parse(row[0]), row[1]) if row else None
        record = await self._run(query)
        # A tag written meanwhile makes what was read stale: it is answered, not remembered.
        if record is not None and writes == self._tag_writes:
            self._tags[key] = record
        return record

    async def set_tag(self, upstream: str, name: str, tag: str, record: TagRecord) -> None:
        """Record a tag; if the database cannot take it, it is still remembered in memory (with
        the tags recently used), so a full disk does not make every request revalidate again."""
        key = (upstream, name, tag)
        self._tag_writes += 1
        self._tags.pop(key, None)
        self._gone.pop(key, None)
        try:
            await self._run(lambda: self.db.execute(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
                (upstream, name, tag, str(record.digest), record.checked_at)))
        except CacheWriteError:
            self._tags[key] = record
            raise

    async def drop_tag(self, upstream: str, name: str, tag: str) -> None:
        """Forget a tag; if the database cannot take it, the tag is gone from memory all the
        same, so content deleted upstream is not served again from the row that stayed."""
        key = (upstream, name, tag)
        self._tag_writes += 1
        self._tags.pop(key, None)
        self._gone[key] = True
        await self._run(lambda: self.db.execute(
            "DELETE FROM tags WHERE upstream=? AND name=? AND tag=?", key))
        self._gone.pop(key, None)

    async def manifest_type(self, digest: Digest) -> str | None:
        if (known := self._types.get(str(digest))) is not None:
            return known

        def query() -> str | None:
            row = self.db.execute("SELECT media_type FROM manifests WHERE digest=?", (str(digest),)).fetchone()
            return str(row[0]) if row else None
        media_type = await self._run(query)
        if media_type is not None:
            self._types[str(digest)] = media_type
        return media_type

    async def add_manifest(self, upstream: str, name: str, digest: Digest, media_type: str,
                           references: Iterable[Digest]) -> None:
        """Record a stored manifest; the repository it came from is known to reference it and
        everything it references."""
        linked = [(upstream, name, str(d)) for d in (digest, *references)]

        children = [(str(digest), str(d)) for d in references]

        def write() -> None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?)", (str(digest), media_type))
                self.db.executemany("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", linked)
                self.db.executemany("INSERT OR IGNORE INTO refs VALUES (?, ?)", children)
        await self._run(write)
        self._types[str(digest)] = media_type
        for link in linked:
            self._links[link] = True

    async def add_blob(self, digest: Digest, size: int) -> bool:
        """Record a published file (a layer, a config or a manifest); True if it was not known,
        so the caller counts its size once however often it is fetched again."""
        now = self._clock()

        def add() -> bool:
            known = self.db.execute("SELECT 1 FROM blobs WHERE digest = ?", (str(digest),)).fetchone()
            self.db.execute(
                "INSERT INTO blobs (digest, size, last_access) VALUES (?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET size = excluded.size, last_access = excluded.last_access",
                (str(digest), size, now))
            return known is None
        return await self._run(add)

    def touch(self, digest: Digest) -> None:
        self._accessed[str(digest)] = self._clock()

    async def flush_access(self) -> None:
        """Write the access times gathered since the last flush, in one transaction."""
        if not self._accessed:
            return
        accessed, self._accessed = self._accessed, {}

        def write() -> None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("UPDATE blobs SET last_access = MAX(last_access, ?) WHERE digest = ?",
                                    [(at, digest) for digest, at in accessed.items()])
        await self._run(write)

    async def reconcile(self, files: Mapping[str, tuple[int, float]]) -> Reconciled:
        """Make the blob rows match the published files ({digest: (size, mtime)}): after a crash
        either may be ahead of the other."""
        def write() -> Reconciled:
            known = {row[0] for row in self.db.execute("SELECT digest FROM blobs")}
            missing = [(d, size, mtime) for d, (size, mtime) in files.items() if d not in known]
            gone = [(d,) for d in known if d not in files]
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT INTO blobs (digest, size, last_access) VALUES (?, ?, ?)", missing)
                self.db.executemany("DELETE FROM blobs WHERE digest = ?", gone)
            return Reconciled(len(missing), len(gone))
        return await self._run(write)

    async def eviction_candidates(self, limit: int) -> list[tuple[Digest, int]]:
        """(digest, size) of what may go, least recently used first: unpinned content that no
        cached manifest references. A manifest's blobs become candidates once it is gone."""
        await self.flush_access()

        def query() -> list[tuple[Digest, int]]:
            rows = self.db.execute(
                "SELECT b.digest, b.size FROM blobs b WHERE b.pinned = 0 AND NOT EXISTS ("
                "SELECT 1 FROM refs r JOIN blobs p ON p.digest = r.parent WHERE r.child = b.digest) "
                "ORDER BY b.last_access LIMIT ?", (limit,)).fetchall()
            return [(Digest.parse(digest), int(size)) for digest, size in rows]
        return await self._run(query)

    async def expired_candidates(self, cutoffs: Mapping[str, float], limit: int) -> list[tuple[Digest, int]]:
        """(digest, size) of unpinned content no cached manifest references, last accessed
        before the cutoff of every upstream that links it; an upstream without a cutoff keeps
        what it links."""
        await self.flush_access()
        keeps = " ".join("WHEN ? THEN ?" for _ in cutoffs)
        arguments = [value for upstream, cutoff in cutoffs.items() for value in (upstream, cutoff)]

        def query() -> list[tuple[Digest, int]]:
            rows = self.db.execute(
                "SELECT b.digest, b.size FROM blobs b WHERE b.pinned = 0 AND NOT EXISTS ("
                "SELECT 1 FROM refs r JOIN blobs p ON p.digest = r.parent WHERE r.child = b.digest) "
                "AND EXISTS (SELECT 1 FROM links l WHERE l.digest = b.digest) "
                "AND NOT EXISTS (SELECT 1 FROM links l WHERE l.digest = b.digest "
                f"AND b.last_access >= CASE l.upstream {keeps} ELSE -1e300 END) "
                "ORDER BY b.last_access LIMIT ?", (*arguments, limit)).fetchall()
            return [(Digest.parse(digest), int(size)) for digest, size in rows]
        return await self._run(query)

    async def forget(self, digest: Digest) -> list[Digest]:
        key = (str(digest),)

        def write() -> list[Digest]:
            with self.db:
                self.db.execute("BEGIN")
                released = [Digest.parse(row[0]) for row in self.db.execute(
                    "DELETE FROM refs WHERE parent = ? RETURNING child", key)]
                for statement in ("DELETE FROM blobs WHERE digest = ?", "DELETE FROM manifests WHERE digest = ?",
                                  "DELETE FROM tags WHERE digest = ?", "DELETE FROM links WHERE digest = ?",
                                  "DELETE FROM referrers WHERE digest = ?1 OR subject = ?1",
                                  "DELETE FROM verdicts WHERE subject = ?1 OR signature = ?1"):
                    self.db.execute(statement, key)
            return released
        # Before the rows go, and again after: a lookup that read them meanwhile may have remembered them.
        self._forget_remembered()
        try:
            return await self._run(write)
        finally:
            self._forget_remembered()

    async def evictable(self, digests: Sequence[Digest]) -> list[tuple[Digest, int]]:
        wanted = [str(d) for d in digests]

        def query() -> list[tuple[Digest, int]]:
            rows = self.db.execute(
                "SELECT b.digest, b.size FROM blobs b WHERE b.pinned = 0 "
                f"AND b.digest IN ({', '.join('?' for _ in wanted)}) AND NOT EXISTS ("
                "SELECT 1 FROM refs r JOIN blobs p ON p.digest = r.parent WHERE r.child = b.digest)",
                wanted).fetchall()
            return [(Digest.parse(digest), int(size)) for digest, size in rows]
        return await self._run(query) if wanted else []

    def _forget_remembered(self) -> None:
        self._tag_writes += 1
        self._tags.clear()
        self._types.clear()
        self._links.clear()

    async def usage(self) -> tuple[int, int]:
        """(files, bytes) the cache holds."""
        def query() -> tuple[int, int]:
            count, size = self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blobs").fetchone()
            return int(count), int(size)
        return await self._run(query)

    async def record_miss(self, upstream: str, name: str, reference: str, kind: str) -> None:
        """What an offline mirror was asked for and did not have, for the next image list."""
        await self._run(lambda: self.db.execute(
            "INSERT INTO misses VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (upstream, name, reference) "
            "DO UPDATE SET count = count + 1, last_seen = excluded.last_seen",
            (upstream, name, reference, kind, self._clock())))

    async def clear_miss(self, upstream: str, name: str, reference: str) -> None:
        """A miss that seeding or an import has since filled."""
        await self._run(lambda: self.db.execute(
            "DELETE FROM misses WHERE upstream = ? AND name = ? AND reference = ?", (upstream, name, reference)))

    async def cached_tags(self, upstream: str, name: str) -> list[str]:
        return await self._run(lambda: [row[0] for row in self.db.execute(
            "SELECT tag FROM tags WHERE upstream = ? AND name = ?", (upstream, name))])

    async def parents(self, digest: Digest) -> list[Digest]:
        """The cached manifests (indexes) that reference `digest`."""
        return await self._run(lambda: [Digest.parse(row[0]) for row in self.db.execute(
            "SELECT parent FROM refs WHERE child = ?", (str(digest),))])

    async def referrers(self, upstream: str, name: str, subject: Digest) -> TagRecord | None:
        def query() -> TagRecord | None:
            row = self.db.execute("SELECT digest, checked_at FROM referrers WHERE upstream=? AND name=? AND subject=?",
                                  (upstream, name, str(subject))).fetchone()
            return TagRecord(Digest.parse(row[0]), row[1]) if row else None
        return await self._run(query)

    async def set_referrers(self, upstream: str, name: str, subject: Digest, record: TagRecord) -> None:
        key = (upstream, name, str(subject))

        def write() -> None:
            with self.db:
                self.db.execute("BEGIN")
                old = self.db.execute("SELECT digest FROM referrers WHERE upstream=? AND name=? AND subject=?",
                                      key).fetchone()
                self.db.execute("INSERT OR REPLACE INTO referrers VALUES (?, ?, ?, ?, ?)",
                                (*key, str(record.digest), record.checked_at))
                self.db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?)", (str(subject), str(record.digest)))
                if old is not None and old[0] != str(record.digest):
                    self.db.execute("DELETE FROM refs WHERE parent = ?1 AND child = ?2 AND NOT EXISTS ("
                                    "SELECT 1 FROM referrers WHERE subject = ?1 AND digest = ?2)",
                                    (str(subject), old[0]))
        await self._run(write)

    async def attach(self, subject: Digest, attachment: Digest) -> None:
        await self._run(lambda: self.db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?)",
                                                (str(subject), str(attachment))))

    async def verdict(self, subject: Digest, signature: Digest, keyring: str) -> bool | None:
        def query() -> bool | None:
            row = self.db.execute("SELECT valid FROM verdicts WHERE subject=? AND signature=? AND keyring=?",
                                  (str(subject), str(signature), keyring)).fetchone()
            return None if row is None else bool(row[0])
        return await self._run(query)

    async def set_verdict(self, subject: Digest, signature: Digest, keyring: str, valid: bool) -> None:
        await self._run(lambda: self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                                                (str(subject), str(signature), keyring, int(valid))))

    async def pin(self, digest: Digest, pinned: bool = True) -> bool:
        """Keep a manifest (and so all it references) out of eviction's reach; False if it is not cached."""
        return await self._run(lambda: self.db.execute(
            "UPDATE blobs SET pinned = ? WHERE digest = ?", (int(pinned), str(digest))).rowcount > 0)

    async def is_linked(self, upstream: str, name: str, digest: Digest) -> bool:
        key = (upstream, name, str(digest))
        if key in self._links:
            return True
        linked = await self._run(lambda: self.db.execute(
            "SELECT 1 FROM links WHERE upstream=? AND name=? AND digest=?", key).fetchone() is not None)
        if linked:
            self._links[key] = True
        return linked

    async def link(self, upstream: str, name: str, digest: Digest) -> None:
        key = (upstream, name, str(digest))
        await self._run(lambda: self.db.execute("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", key))
        self._links[key] = True

    async def images(self) -> list[CachedImage]:
        await self.flush_access()
        return await self._run(lambda: _images(self.db))

    async def set_pinned(self, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
        return await self._run(lambda: _set_pinned(self.db, upstream, name, reference, pinned))

    async def pinned_usage(self) -> tuple[int, int]:
        def query() -> tuple[int, int]:
            count, size = self.db.execute(_PINNED_TREE).fetchone()
            return int(count), int(size)
        return await self._run(query)


def _index_detail(error: sqlite3.Error) -> str:
    if "full" in str(error):
        return "the cache disk is full: nothing new can be cached until space is freed; cached content is still served"
    return f"the cache index failed ({type(error).__name__}); cached content is still served where it can be"


def cached_images(path: Path) -> list[CachedImage]:
    """Every cached tag with its size, read straight from the database file: for operator
    commands, which may run beside a serving mirror (WAL lets them read while it writes)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _images(db)
    finally:
        db.close()


def _images(db: sqlite3.Connection) -> list[CachedImage]:
    rows = db.execute(
        "SELECT tags.upstream, tags.name, tags.tag, tags.digest, manifests.media_type, tags.checked_at, "
        "blobs.last_access, COALESCE(blobs.pinned, 0) FROM tags JOIN manifests ON manifests.digest = tags.digest "
        "LEFT JOIN blobs ON blobs.digest = tags.digest ORDER BY tags.upstream, tags.name, tags.tag").fetchall()
    images = []
    for upstream, name, tag, digest, media_type, checked_at, last_access, pinned in rows:
        count, size = db.execute(_TREE, {"root": digest}).fetchone()
        images.append(CachedImage(upstream, name, tag, digest, media_type, count, size, last_access, checked_at,
                                  bool(pinned)))
    return images


@dataclass(frozen=True, slots=True)
class Miss:
    upstream: str
    name: str
    reference: str
    kind: str
    count: int
    last_seen: float


def recorded_misses(path: Path) -> list[Miss]:
    """What an offline mirror could not serve, most asked first (read beside a serving mirror)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT upstream, name, reference, kind, count, last_seen FROM misses "
                          "ORDER BY count DESC, upstream, name, reference").fetchall()
    except sqlite3.OperationalError:
        return []  # an index no mirror of this version has opened yet: it has no misses
    finally:
        db.close()
    return [Miss(*row) for row in rows]


def set_pinned(path: Path, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
    """Pin (or unpin) a cached image by tag or digest; the manifest's digest, or None if it is
    not cached. Pinning the manifest protects everything it references from eviction."""
    db = sqlite3.connect(path, timeout=30)
    try:
        return _set_pinned(db, upstream, name, reference, pinned)
    finally:
        db.close()


def _set_pinned(db: sqlite3.Connection, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
    with db:
        if reference.startswith("sha256:"):
            row = db.execute("SELECT digest FROM manifests WHERE digest = ?", (reference,)).fetchone()
        else:
            row = db.execute("SELECT digest FROM tags WHERE upstream = ? AND name = ? AND tag = ?",
                             (upstream, name, reference)).fetchone()
        if row is None:
            return None
        updated = db.execute("UPDATE blobs SET pinned = ? WHERE digest = ?", (int(pinned), row[0])).rowcount
        return str(row[0]) if updated else None
