"""The cache index in Redis, for replicas that share one bucket: what one replica records (a tag,
a link, a pin) the others see at once, and eviction on any replica knows what every one uses.

The same records as `SqliteIndex`, under a key prefix (`p`):

    {p}tags               HASH  upstream\\0name\\0tag -> "digest checked_at"
    {p}repotags:<up\\0name> SET   the repository's tags (for `cached_tags`)
    {p}tagged:<digest>    SET   tag fields naming the digest (so `forget` drops them)
    {p}manifests          HASH  digest -> media type
    {p}links              SET   upstream\\0name\\0digest
    {p}linkers:<digest>   SET   upstream\\0name linking the digest (expiry by upstream; forget)
    {p}blobs              HASH  digest -> size
    {p}access             ZSET  digest -> last access (members are exactly the blobs)
    {p}pinned             SET   digests
    {p}refs:<parent>      SET   children;  {p}parents:<child>  SET  parents
    {p}referrers:<subject>  HASH  upstream\\0name -> "list digest checked_at"
    {p}referred:<list>    SET   subjects whose referrers hash names the list (so `forget` drops them)
    {p}verdicts           HASH  subject\\0signature\\0keyring -> "1" or "0"
    {p}judged:<digest>    SET   verdict fields naming the digest, as subject or signature (for `forget`)
    {p}misses:count|kind|seen  HASH upstream\\0name\\0reference -> count, kind, last seen

Multi-key writes are MULTI/EXEC; where a write depends on what is there (moving a tag, forgetting
content, pinning only what is cached, choosing eviction candidates) it is a Lua script, so no
replica sees half of it. The scripts build some key names from the prefix: a standalone Redis
(or a primary with replicas) is what they need, not Redis Cluster's hash slots.

Redis out of reach must cost speed, never a pull: reads then answer as if nothing were recorded
(a miss, which the proxy fetches and checks), writes are skipped, and `problem` says why. After
a failure nothing waits on Redis again: calls answer at once while a background probe pings it
every second, and the first answer closes the breaker. What is memoised here stays true whatever
other replicas do (a digest's media type, a repository's confirmed link), so hits on this replica
keep working from memory; tags are not (another replica moves them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as redis
from cachetools import LRUCache
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mirror.errors import CacheWriteError
from mirror.index import CachedImage, Miss, Reconciled, TagRecord
from mirror.oci import Digest

T = TypeVar("T")
log = logging.getLogger(__name__)

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
# A dead Redis costs the call that finds out at most this long; a frozen one, the socket timeout.
_CONNECT_TIMEOUT = 1.0
_SOCKET_TIMEOUT = 2.0
# Between two probes while Redis is out of reach (calls meanwhile do not try it at all).
_PROBE_EVERY = 1.0
# An outage is logged once, then at most this often.
_LOG_EVERY = 30.0
# Access-ordered entries a candidate script looks at per call: Redis serves nothing else meanwhile.
_SCAN = 512
# Records per transaction when reconciling a whole bucket.
_BATCH = 1000
_REMEMBERED = 65536
_SEP = "\0"

_SET_TAG = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then redis.call('SREM', ARGV[1] .. 'tagged:' .. string.match(old, '^%S+'), ARGV[2]) end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[2])
"""
_DROP_TAG = """
local old = redis.call('HGET', KEYS[1], ARGV[2])
if old then
  redis.call('SREM', ARGV[1] .. 'tagged:' .. string.match(old, '^%S+'), ARGV[2])
  redis.call('HDEL', KEYS[1], ARGV[2])
end
redis.call('SREM', KEYS[2], ARGV[3])
"""
# A list hangs from its subject (refs) while any repository's record names it.
# KEYS: referrers:<subject> refs:<subject> parents:<list> referred:<list>;
# ARGV: prefix, upstream\\0name, subject, list, "list checked_at".
_SET_REFERRERS = """
local prefix, field, subject, list = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local old = redis.call('HGET', KEYS[1], field)
redis.call('HSET', KEYS[1], field, ARGV[5])
redis.call('SADD', KEYS[2], list)
redis.call('SADD', KEYS[3], subject)
redis.call('SADD', KEYS[4], subject)
if not old then return end
old = string.match(old, '^%S+')
if old == list then return end
for _, value in ipairs(redis.call('HVALS', KEYS[1])) do
  if string.match(value, '^%S+') == old then return end
end
redis.call('SREM', KEYS[2], old)
redis.call('SREM', prefix .. 'parents:' .. old, subject)
redis.call('SREM', prefix .. 'referred:' .. old, subject)
"""
# KEYS: refs:<d> blobs access pinned manifests tagged:<d> tags linkers:<d> links
#       referrers:<d> referred:<d> judged:<d> verdicts; ARGV: prefix, d.
_FORGET = """
local prefix, digest = ARGV[1], ARGV[2]
local children = redis.call('SMEMBERS', KEYS[1])
for _, child in ipairs(children) do redis.call('SREM', prefix .. 'parents:' .. child, digest) end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], digest)
redis.call('ZREM', KEYS[3], digest)
redis.call('SREM', KEYS[4], digest)
redis.call('HDEL', KEYS[5], digest)
for _, field in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  local value = redis.call('HGET', KEYS[7], field)
  if value and string.match(value, '^%S+') == digest then
    redis.call('HDEL', KEYS[7], field)
    local repo, tag = string.match(field, '^(.*)%z([^%z]*)$')
    redis.call('SREM', prefix .. 'repotags:' .. repo, tag)
  end
end
redis.call('DEL', KEYS[6])
for _, linker in ipairs(redis.call('SMEMBERS', KEYS[8])) do redis.call('SREM', KEYS[9], linker .. '\\0' .. digest) end
redis.call('DEL', KEYS[8])
for _, value in ipairs(redis.call('HVALS', KEYS[10])) do
  redis.call('SREM', prefix .. 'referred:' .. string.match(value, '^%S+'), digest)
end
redis.call('DEL', KEYS[10])
for _, subject in ipairs(redis.call('SMEMBERS', KEYS[11])) do
  local key = prefix .. 'referrers:' .. subject
  local records = redis.call('HGETALL', key)
  for i = 1, #records, 2 do
    if string.match(records[i + 1], '^%S+') == digest then redis.call('HDEL', key, records[i]) end
  end
end
redis.call('DEL', KEYS[11])
for _, field in ipairs(redis.call('SMEMBERS', KEYS[12])) do
  redis.call('HDEL', KEYS[13], field)
  local subject, signature = string.match(field, '^([^%z]*)%z([^%z]*)%z')
  local other = subject == digest and signature or subject
  if other ~= digest then redis.call('SREM', prefix .. 'judged:' .. other, field) end
end
redis.call('DEL', KEYS[12])
return children
"""
_PIN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) else redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
"""
# One window of the access order: {1 if it was the last, [digest, size, ...] that may go}.
# KEYS: access blobs pinned; ARGV: prefix, offset, count, expiring (0/1), then upstream, cutoff pairs.
_CANDIDATES = """
local prefix, offset, count, expiring = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local cutoffs, latest = {}, nil
for i = 5, #ARGV, 2 do
  local cutoff = tonumber(ARGV[i + 1])
  cutoffs[ARGV[i]] = cutoff
  if latest == nil or cutoff > latest then latest = cutoff end
end
local function free(digest, at)
  if redis.call('SISMEMBER', KEYS[3], digest) == 1 then return false end
  for _, parent in ipairs(redis.call('SMEMBERS', prefix .. 'parents:' .. digest)) do
    if redis.call('HEXISTS', KEYS[2], parent) == 1 then return false end
  end
  if not expiring then return true end
  local linkers = redis.call('SMEMBERS', prefix .. 'linkers:' .. digest)
  if #linkers == 0 then return false end
  for _, linker in ipairs(linkers) do
    local cutoff = cutoffs[string.sub(linker, 1, string.find(linker, '\\0', 1, true) - 1)]
    if cutoff == nil or at >= cutoff then return false end
  end
  return true
end
local entries = redis.call('ZRANGE', KEYS[1], offset, offset + count - 1, 'WITHSCORES')
local last = #entries < 2 * count
local found = {}
for i = 1, #entries, 2 do
  local digest, at = entries[i], tonumber(entries[i + 1])
  if expiring and (latest == nil or at >= latest) then last = true; break end
  if free(digest, at) then
    local size = redis.call('HGET', KEYS[2], digest)
    if size then found[#found + 1] = digest; found[#found + 1] = size end
  end
end
return {last and 1 or 0, found}
"""


class RedisIndex:
    """`mirror.index.Index` in Redis, shared by the replicas of a cluster."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None, prefix: str = "mirror:") -> None:
        self._where = _redacted(url)
        self._clock = clock or time.time
        self._p = prefix
        # One quick retry, on a refused or reset connection only: the first command on a pooled
        # connection after a Redis restart fails. A timeout is not tried twice.
        self._redis: redis.Redis = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1, supported_errors=(RedisConnectionError,)))
        self._set_tag = self._redis.register_script(_SET_TAG)
        self._drop_tag = self._redis.register_script(_DROP_TAG)
        self._set_referrers = self._redis.register_script(_SET_REFERRERS)
        self._forget = self._redis.register_script(_FORGET)
        self._pin = self._redis.register_script(_PIN)
        self._candidates = self._redis.register_script(_CANDIDATES)
        self.problem: str | None = None
        """Why Redis is not being used right now (for readiness and logs); None while it answers."""
        self._probe: asyncio.Task[None] | None = None
        self._logged = -math.inf
        # Access times wait here for `flush_access` (and through an outage).
        self._accessed: dict[str, float] = {}
        self._types: LRUCache[str, str] = LRUCache(_REMEMBERED)
        self._links: LRUCache[tuple[str, str, str], bool] = LRUCache(_REMEMBERED)
        # A read that overlapped a `forget` may have seen what it removed: answered, not remembered.
        self._forgetting = 0
        self._forgotten = 0

    async def open(self) -> None:
        """Connect; a Redis out of reach does not stop the mirror from starting (see `problem`)."""
        await self._call(self._redis.ping, None)

    async def close(self) -> None:
        try:
            await self.flush_access()
        except CacheWriteError as exc:
            log.warning("could not record access times: %s", exc.message)
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        await self._redis.aclose()

    async def ping(self) -> None:
        """Raises CacheWriteError while Redis is out of reach (for the readiness probe)."""
        if self._probe is not None:
            raise CacheWriteError(self.problem or f"Redis at {self._where} is unreachable")
        await self._strict(self._redis.ping)

    # Calling Redis

    async def _call(self, op: Callable[[], Awaitable[T]], neutral: T) -> T:
        """`op`, or `neutral` (what "nothing recorded" is for that call) if Redis is out of reach."""
        if self._probe is not None:
            return neutral
        try:
            result = await op()
        except _UNREACHABLE as exc:
            self._trip(exc)
            return neutral
        except RedisError as exc:
            raise _failed(exc) from exc
        self._answered()
        return result

    async def _strict(self, op: Callable[[], Awaitable[T]]) -> T:
        """`op`, for an answer that would be a lie if empty (the operator's views, readiness)."""
        try:
            result = await op()
        except _UNREACHABLE as exc:
            raise CacheWriteError(self._trip(exc)) from exc
        except RedisError as exc:
            raise _failed(exc) from exc
        self._answered()
        return result

    def _answered(self) -> None:
        """Redis answered: the breaker closes, even if the probe has not seen it yet."""
        self.problem = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _trip(self, error: BaseException) -> str:
        problem = self._note(error)
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._recover(), name="redis index probe")
        return problem

    def _note(self, error: BaseException) -> str:
        self.problem = f"Redis at {self._where} is unreachable: {str(error) or type(error).__name__}"
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY:
            self._logged = now
            log.warning("%s; the index answers as if nothing were cached, and records nothing, until it is back",
                        self.problem)
        return self.problem

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(_PROBE_EVERY)
            try:
                await self._redis.ping()
            except _UNREACHABLE as exc:
                self._note(exc)
                continue
            except RedisError:
                pass  # it answered, if not with PONG: the calls themselves will say what is wrong
            break
        self._probe = None
        self.problem = None
        log.info("Redis at %s answers again", self._where)

    # Keys

    def _tag_field(self, upstream: str, name: str, tag: str) -> str:
        return _SEP.join((upstream, name, tag))

    def _repo_tags(self, upstream: str, name: str) -> str:
        return f"{self._p}repotags:{upstream}{_SEP}{name}"

    def _stable(self, forgotten: int) -> bool:
        return self._forgetting == 0 and self._forgotten == forgotten

    # Tags

    async def tag(self, upstream: str, name: str, tag: str) -> TagRecord | None:
        value = await self._call(lambda: _str(self._redis.hget(f"{self._p}tags", self._tag_field(upstream, name, tag))),
                                 None)
        if value is None:
            return None
        digest, _, checked_at = value.partition(" ")
        return TagRecord(Digest.parse(digest), float(checked_at))

    async def set_tag(self, upstream: str, name: str, tag: str, record: TagRecord) -> None:
        field = self._tag_field(upstream, name, tag)
        await self._call(lambda: self._set_tag(
            keys=[f"{self._p}tags", self._repo_tags(upstream, name), f"{self._p}tagged:{record.digest}"],
            args=[self._p, field, f"{record.digest} {record.checked_at!r}", tag]), None)

    async def drop_tag(self, upstream: str, name: str, tag: str) -> None:
        await self._call(lambda: self._drop_tag(
            keys=[f"{self._p}tags", self._repo_tags(upstream, name)],
            args=[self._p, self._tag_field(upstream, name, tag), tag]), None)

    async def cached_tags(self, upstream: str, name: str) -> list[str]:
        return sorted(await self._call(lambda: _strs(self._redis.smembers(self._repo_tags(upstream, name))),
                                       list[str]()))

    # Manifests, links and references

    async def manifest_type(self, digest: Digest) -> str | None:
        if (known := self._types.get(str(digest))) is not None:
            return known
        forgotten = self._forgotten
        media_type = await self._call(lambda: _str(self._redis.hget(f"{self._p}manifests", str(digest))), None)
        if media_type is not None and self._stable(forgotten):
            self._types[str(digest)] = media_type
        return media_type

    async def add_manifest(self, upstream: str, name: str, digest: Digest, media_type: str,
                           references: Iterable[Digest]) -> None:
        children = [str(d) for d in references]
        repo = f"{upstream}{_SEP}{name}"

        async def write() -> bool:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(f"{self._p}manifests", str(digest), media_type)
                for linked in (str(digest), *children):
                    pipe.sadd(f"{self._p}links", f"{repo}{_SEP}{linked}")
                    pipe.sadd(f"{self._p}linkers:{linked}", repo)
                if children:
                    pipe.sadd(f"{self._p}refs:{digest}", *children)
                for child in children:
                    pipe.sadd(f"{self._p}parents:{child}", str(digest))
                await pipe.execute()
            return True
        forgotten = self._forgotten
        if await self._call(write, False) and self._stable(forgotten):
            self._types[str(digest)] = media_type
            for linked in (str(digest), *children):
                self._links[(upstream, name, linked)] = True

    async def parents(self, digest: Digest) -> list[Digest]:
        found = await self._call(lambda: _strs(self._redis.smembers(f"{self._p}parents:{digest}")), list[str]())
        return [Digest.parse(parent) for parent in sorted(found)]

    async def referrers(self, upstream: str, name: str, subject: Digest) -> TagRecord | None:
        value = await self._call(lambda: _str(self._redis.hget(f"{self._p}referrers:{subject}",
                                                              f"{upstream}{_SEP}{name}")), None)
        if value is None:
            return None
        digest, _, checked_at = value.partition(" ")
        return TagRecord(Digest.parse(digest), float(checked_at))

    async def set_referrers(self, upstream: str, name: str, subject: Digest, record: TagRecord) -> None:
        """The record and its refs edge in one script: another replica replacing the same
        subject's list elsewhere must not see, or leave, an edge without its record."""
        p, listed = self._p, record.digest
        await self._call(lambda: self._set_referrers(
            keys=[f"{p}referrers:{subject}", f"{p}refs:{subject}", f"{p}parents:{listed}", f"{p}referred:{listed}"],
            args=[p, f"{upstream}{_SEP}{name}", str(subject), str(listed), f"{listed} {record.checked_at!r}"]), None)

    async def attach(self, subject: Digest, attachment: Digest) -> None:
        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(f"{self._p}refs:{subject}", str(attachment))
                pipe.sadd(f"{self._p}parents:{attachment}", str(subject))
                await pipe.execute()
        await self._call(write, None)

    async def verdict(self, subject: Digest, signature: Digest, keyring: str) -> bool | None:
        value = await self._call(lambda: _str(self._redis.hget(f"{self._p}verdicts",
                                                              _SEP.join((str(subject), str(signature), keyring)))),
                                 None)
        return None if value is None else value == "1"

    async def set_verdict(self, subject: Digest, signature: Digest, keyring: str, valid: bool) -> None:
        field = _SEP.join((str(subject), str(signature), keyring))

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(f"{self._p}verdicts", field, "1" if valid else "0")
                pipe.sadd(f"{self._p}judged:{subject}", field)
                pipe.sadd(f"{self._p}judged:{signature}", field)
                await pipe.execute()
        await self._call(write, None)

    async def is_linked(self, upstream: str, name: str, digest: Digest) -> bool:
        key = (upstream, name, str(digest))
        if key in self._links:
            return True
        forgotten = self._forgotten
        linked = await self._call(lambda: _bool(self._redis.sismember(f"{self._p}links", _SEP.join(key))), False)
        if linked and self._stable(forgotten):
            self._links[key] = True
        return linked

    async def link(self, upstream: str, name: str, digest: Digest) -> None:
        async def write() -> bool:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(f"{self._p}links", _SEP.join((upstream, name, str(digest))))
                pipe.sadd(f"{self._p}linkers:{digest}", f"{upstream}{_SEP}{name}")
                await pipe.execute()
            return True
        forgotten = self._forgotten
        if await self._call(write, False) and self._stable(forgotten):
            self._links[(upstream, name, str(digest))] = True

    # Blobs

    async def add_blob(self, digest: Digest, size: int) -> bool:
        """True if it was not known, so the caller counts its size once; False too while Redis
        is out of reach (nothing was recorded, nothing is counted)."""
        now = self._clock()

        async def write() -> bool:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(f"{self._p}blobs", str(digest), str(size))
                pipe.zadd(f"{self._p}access", {str(digest): now})
                added, _ = await pipe.execute()
            return bool(added)
        return await self._call(write, False)

    def touch(self, digest: Digest) -> None:
        self._accessed[str(digest)] = self._clock()

    async def flush_access(self) -> None:
        """Write the access times gathered since the last flush; kept for the next one while
        Redis is out of reach. Only recorded blobs get one, never earlier than they had."""
        if not self._accessed:
            return
        accessed, self._accessed = self._accessed, {}

        async def write() -> bool:
            await self._redis.zadd(f"{self._p}access", accessed, xx=True, gt=True)
            return True
        if not await self._call(write, False):
            for digest, at in accessed.items():
                self._accessed[digest] = max(at, self._accessed.get(digest, at))

    async def reconcile(self, files: Mapping[str, tuple[int, float]]) -> Reconciled:
        """Make the blob records match the files in the bucket ({digest: (size, mtime)}). Best
        run by one replica while the others are idle: a blob another replica records after
        `files` were listed is dropped here until the next reconcile (uncounted; and if it is a
        manifest, what it references is no longer held back from eviction, to be fetched again)."""
        async def write() -> Reconciled:
            known = {digest async for digest, _ in self._redis.hscan_iter(f"{self._p}blobs", count=_BATCH)}
            missing = [d for d in files if d not in known]
            gone = [d for d in known if d not in files]
            for start in range(0, max(len(missing), len(gone)), _BATCH):
                adding, removing = missing[start:start + _BATCH], gone[start:start + _BATCH]
                async with self._redis.pipeline(transaction=True) as pipe:
                    if adding:
                        pipe.hset(f"{self._p}blobs", mapping={d: str(files[d][0]) for d in adding})
                        pipe.zadd(f"{self._p}access", {d: files[d][1] for d in adding}, nx=True)
                    if removing:
                        pipe.hdel(f"{self._p}blobs", *removing)
                        pipe.zrem(f"{self._p}access", *removing)
                    await pipe.execute()
            return Reconciled(len(missing), len(gone))
        return await self._call(write, Reconciled(0, 0))

    async def usage(self) -> tuple[int, int]:
        async def query() -> tuple[int, int]:
            count = total = 0
            async for _, size in self._redis.hscan_iter(f"{self._p}blobs", count=_BATCH):
                count += 1
                total += int(size)
            return count, total
        return await self._call(query, (0, 0))

    async def pin(self, digest: Digest, pinned: bool = True) -> bool:
        """Keep a manifest (and so all it references) out of eviction's reach; False if it is not
        cached (or Redis is out of reach)."""
        return await self._call(lambda: self._pinned(str(digest), pinned), False)

    async def _pinned(self, digest: str, pinned: bool) -> bool:
        return bool(await self._pin(keys=[f"{self._p}blobs", f"{self._p}pinned"], args=[digest, int(pinned)]))

    # Eviction

    async def eviction_candidates(self, limit: int) -> list[tuple[Digest, int]]:
        """(digest, size) of what may go, least recently used first: unpinned content that no
        cached manifest references."""
        await self.flush_access()
        return await self._call(lambda: self._scan(limit, {}, expiring=False), [])

    async def expired_candidates(self, cutoffs: Mapping[str, float], limit: int) -> list[tuple[Digest, int]]:
        """As `eviction_candidates`, linked by some upstream and last accessed before the cutoff
        of every upstream that links it; an upstream without a cutoff keeps what it links."""
        await self.flush_access()
        return await self._call(lambda: self._scan(limit, cutoffs, expiring=True), [])

    async def _scan(self, limit: int, cutoffs: Mapping[str, float], expiring: bool) -> list[tuple[Digest, int]]:
        """Walk the access order a window per script call (so Redis is never busy for long)
        until `limit` candidates are found or it ends."""
        pairs = [value for upstream, cutoff in cutoffs.items() for value in (upstream, repr(cutoff))]
        found: list[tuple[Digest, int]] = []
        offset = 0
        while len(found) < limit:
            last, batch = await self._candidates(
                keys=[f"{self._p}access", f"{self._p}blobs", f"{self._p}pinned"],
                args=[self._p, offset, _SCAN, int(expiring), *pairs])
            found += [(Digest.parse(batch[i]), int(batch[i + 1])) for i in range(0, len(batch), 2)]
            if last:
                break
            offset += _SCAN
        return found[:limit]

    async def forget(self, digest: Digest) -> list[Digest]:
        """Drop everything recorded about evicted content, and the tags that named it; what it
        referenced, which may now be free to go too."""
        d = str(digest)
        p = self._p
        self._forgetting += 1
        self._types.clear()
        self._links.clear()
        try:
            children: list[str] = await self._call(lambda: self._forget(
                keys=[f"{p}refs:{d}", f"{p}blobs", f"{p}access", f"{p}pinned", f"{p}manifests", f"{p}tagged:{d}",
                      f"{p}tags", f"{p}linkers:{d}", f"{p}links", f"{p}referrers:{d}", f"{p}referred:{d}",
                      f"{p}judged:{d}", f"{p}verdicts"], args=[p, d]), [])
        finally:
            self._forgetting -= 1
            self._forgotten += 1
        return [Digest.parse(child) for child in children]

    async def evictable(self, digests: Sequence[Digest]) -> list[tuple[Digest, int]]:
        p = self._p

        async def query() -> list[tuple[Digest, int]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.hget(f"{p}blobs", str(digest))
                    pipe.sismember(f"{p}pinned", str(digest))
                    pipe.smembers(f"{p}parents:{digest}")
                found = await pipe.execute()
            held: list[tuple[Digest, int, list[str]]] = [
                (digest, int(size), sorted(parents))
                for digest, size, pinned, parents in zip(digests, found[0::3], found[1::3], found[2::3], strict=True)
                if size is not None and not pinned]
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, _, parents in held:
                    for parent in parents:
                        pipe.hexists(f"{p}blobs", parent)
                cached = iter(await pipe.execute())
            return [(digest, size) for digest, size, parents in held if not any([next(cached) for _ in parents])]
        return await self._call(query, []) if digests else []

    # Misses

    async def record_miss(self, upstream: str, name: str, reference: str, kind: str) -> None:
        """What an offline mirror was asked for and did not have, for the next image list."""
        field = _SEP.join((upstream, name, reference))
        now = self._clock()

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(f"{self._p}misses:count", field, 1)
                pipe.hsetnx(f"{self._p}misses:kind", field, kind)
                pipe.hset(f"{self._p}misses:seen", field, repr(now))
                await pipe.execute()
        await self._call(write, None)

    async def clear_miss(self, upstream: str, name: str, reference: str) -> None:
        """A miss that seeding or an import has since filled."""
        field = _SEP.join((upstream, name, reference))

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in ("count", "kind", "seen"):
                    pipe.hdel(f"{self._p}misses:{key}", field)
                await pipe.execute()
        await self._call(write, None)

    # The operator's views: Redis out of reach is an error here, not an empty cache.

    async def images(self) -> list[CachedImage]:
        """Every cached tag with the size of all its manifest reaches (as `cached_images`)."""
        return await self._strict(self._images)

    async def _images(self) -> list[CachedImage]:
        tags = {tuple(field.split(_SEP)): value.partition(" ")
                for field, value in (await _mapping(self._redis.hgetall(f"{self._p}tags"))).items()}
        roots = sorted({digest for digest, _, _ in tags.values()})
        if not roots:
            return []
        types = dict(zip(roots, _optional(await self._redis.hmget(f"{self._p}manifests", roots)), strict=True))
        pinned = set(await _strs(self._redis.smembers(f"{self._p}pinned")))
        accessed = dict(zip(roots, await self._redis.zmscore(f"{self._p}access", roots), strict=True))
        children = await self._trees(roots)
        nodes = list(children)
        sizes = dict(zip(nodes, _optional(await self._redis.hmget(f"{self._p}blobs", nodes)), strict=True))
        images = []
        for (upstream, name, tag), (digest, _, checked_at) in sorted(tags.items()):
            if (media_type := types[digest]) is None:
                continue
            tree = _reachable(digest, children)
            held = [int(size) for d in tree if (size := sizes[d]) is not None]
            images.append(CachedImage(upstream, name, tag, digest, media_type, len(held), sum(held),
                                      accessed[digest], float(checked_at), digest in pinned))
        return images

    async def _trees(self, roots: list[str]) -> dict[str, list[str]]:
        """The children of every digest `roots` reach, a level per round trip."""
        children: dict[str, list[str]] = {}
        frontier = roots
        while frontier:
            async with self._redis.pipeline(transaction=False) as pipe:
                for digest in frontier:
                    pipe.smembers(f"{self._p}refs:{digest}")
                found: list[set[str]] = await pipe.execute()
            children.update(zip(frontier, (sorted(c) for c in found), strict=True))
            frontier = sorted({c for cs in found for c in cs} - children.keys())
        return children

    async def pinned_usage(self) -> tuple[int, int]:
        async def query() -> tuple[int, int]:
            roots = sorted(await _strs(self._redis.smembers(f"{self._p}pinned")))
            if not roots:
                return 0, 0
            nodes = list(await self._trees(roots))
            held = [int(size) for size in _optional(await self._redis.hmget(f"{self._p}blobs", nodes))
                    if size is not None]
            return len(held), sum(held)
        return await self._strict(query)

    async def misses(self) -> list[Miss]:
        """What an offline mirror could not serve, most asked first (as `recorded_misses`)."""
        async def query() -> list[Miss]:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in ("count", "kind", "seen"):
                    pipe.hgetall(f"{self._p}misses:{key}")
                counts, kinds, seen = await pipe.execute()
            misses = []
            for field, count in counts.items():
                upstream, name, reference = field.split(_SEP)
                misses.append(Miss(upstream, name, reference, kinds.get(field, ""), int(count),
                                   float(seen.get(field, 0.0))))
            return sorted(misses, key=lambda m: (-m.count, m.upstream, m.name, m.reference))
        return await self._strict(query)

    async def set_pinned(self, upstream: str, name: str, reference: str, pinned: bool) -> str | None:
        """Pin (or unpin) a cached image by tag or digest (as `mirror.index.set_pinned`): the
        manifest's digest, or None if it is not cached."""
        async def write() -> str | None:
            if reference.startswith("sha256:"):
                digest = reference if await self._redis.hexists(f"{self._p}manifests", reference) else None
            else:
                value = await _str(self._redis.hget(f"{self._p}tags", self._tag_field(upstream, name, reference)))
                digest = None if value is None else value.partition(" ")[0]
            if digest is None or not await self._pinned(digest, pinned):
                return None
            return digest
        return await self._strict(write)


def _reachable(root: str, children: Mapping[str, list[str]]) -> set[str]:
    seen = {root}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _failed(error: RedisError) -> CacheWriteError:
    """Redis answered, with an error (out of memory, a read-only replica): as a failing disk."""
    return CacheWriteError(f"the cache index failed: {error}",
                           f"the cache index (Redis) failed ({type(error).__name__}); cached content is still "
                           "served where it can be")


def _redacted(url: str) -> str:
    """`url` as it can be logged: without its password (in the user part or the query)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


# redis-py types its replies as Any: these say what they are.

async def _str(reply: Awaitable[Any]) -> str | None:
    value = await reply
    return None if value is None else str(value)


async def _strs(reply: Awaitable[Any]) -> list[str]:
    return [str(value) for value in await reply]


async def _bool(reply: Awaitable[Any]) -> bool:
    return bool(await reply)


def _optional(values: Iterable[object]) -> list[str | None]:
    return [None if value is None else str(value) for value in values]


async def _mapping(reply: Awaitable[Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (await reply).items()}
