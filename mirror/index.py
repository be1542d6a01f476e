"""What is cached, beyond the bytes: tags, manifest media types, and which repository is known
to reference which content.

SQLite (WAL) in one file next to the blobs; every call runs on one dedicated thread, so the
event loop never blocks on the database and the connection is never shared across threads.
Manifest and tag rows are written only after the bytes they name are published, so after a
crash the index can name at most content that is missing (treated as a miss), never content
that is wrong. A repository link records what the upstream confirmed that repository may see,
which holds whether or not the bytes are cached yet.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mirror.oci import Digest

T = TypeVar("T")

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
"""


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    checked_at: float


class Index:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirror-index")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._run(self._connect)

    def _connect(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "index used before open()"
        return self._db

    async def tag(self, upstream: str, name: str, tag: str) -> TagRecord | None:
        def query() -> TagRecord | None:
            row = self.db.execute("SELECT digest, checked_at FROM tags WHERE upstream=? AND name=? AND tag=?",
                                  (upstream, name, tag)).fetchone()
            return TagRecord(Digest.parse(row[0]), row[1]) if row else None
        return await self._run(query)

    async def set_tag(self, upstream: str, name: str, tag: str, record: TagRecord) -> None:
        await self._run(lambda: self.db.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
            (upstream, name, tag, str(record.digest), record.checked_at)))

    async def drop_tag(self, upstream: str, name: str, tag: str) -> None:
        await self._run(lambda: self.db.execute(
            "DELETE FROM tags WHERE upstream=? AND name=? AND tag=?", (upstream, name, tag)))

    async def manifest_type(self, digest: Digest) -> str | None:
        def query() -> str | None:
            row = self.db.execute("SELECT media_type FROM manifests WHERE digest=?", (str(digest),)).fetchone()
            return str(row[0]) if row else None
        return await self._run(query)

    async def add_manifest(self, upstream: str, name: str, digest: Digest, media_type: str,
                           references: Iterable[Digest]) -> None:
        """Record a stored manifest; the repository it came from is known to reference it and
        everything it references."""
        linked = [(upstream, name, str(d)) for d in (digest, *references)]

        def write() -> None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?)", (str(digest), media_type))
                self.db.executemany("INSERT OR IGNORE INTO links VALUES (?, ?, ?)", linked)
        await self._run(write)

    async def is_linked(self, upstream: str, name: str, digest: Digest) -> bool:
        return await self._run(lambda: self.db.execute(
            "SELECT 1 FROM links WHERE upstream=? AND name=? AND digest=?",
            (upstream, name, str(digest))).fetchone() is not None)

    async def link(self, upstream: str, name: str, digest: Digest) -> None:
        await self._run(lambda: self.db.execute(
            "INSERT OR IGNORE INTO links VALUES (?, ?, ?)", (upstream, name, str(digest))))
