"""Who a client is and what it may pull: htpasswd (bcrypt) accounts, the short-lived tokens the
mirror's own token service signs, and the access rules. Nothing here knows HTTP.

A client proves who it is with HTTP Basic (checked against the htpasswd file), with a token the
mirror issued (the registry token flow that `docker login`, containerd and skopeo follow), or
with a TLS client certificate. Every request is then checked against the rules before the cache
is consulted, so a refusal looks the same whether or not the content is cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import jwt
from cachetools import LRUCache, TTLCache

from mirror.config import AuthConfig
from mirror.errors import ConfigError, TooManyRequests

log = logging.getLogger(__name__)

_ISSUER = "mirror"
# A good password stays good for this long without paying for bcrypt again (and a wrong one bad).
_VERIFIED_TTL = 300.0
_BCRYPT_RE = re.compile(r"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# bcrypt checks at once, checks that may wait, and failed logins an address may have per window.
_CHECKERS = 2
_MAX_WAITING = 16
_MAX_FAILURES = 10
_FAILURE_WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Identity:
    user: str | None
    """None: anonymous."""
    groups: frozenset[str] = frozenset()

    @property
    def names(self) -> frozenset[str]:
        """What an access rule's `who` may call this client."""
        if self.user is None:
            return frozenset({"*", "anonymous"})
        return frozenset({"*", "authenticated", f"user:{self.user}", *(f"group:{g}" for g in self.groups)})


ANONYMOUS = Identity(None)


class Htpasswd:
    """An Apache htpasswd file with bcrypt entries (`htpasswd -B`), as CNCF distribution takes.

    bcrypt is slow by design, which makes it a lever for whoever sends wrong passwords: checks
    run on threads of their own (never the ones blob writes and reads use), a few at a time, with
    a short queue past which logins are refused (429); a client with too many recent failures is
    refused without a check; a known-wrong password is refused from memory; and an unknown user
    costs the same check as a known one, so timing does not tell which names exist."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, bytes] = {}
        self._dummy = b""
        self._verified: TTLCache[str, str] = TTLCache(maxsize=4096, ttl=_VERIFIED_TTL)
        self._refused: TTLCache[str, bool] = TTLCache(maxsize=16384, ttl=_VERIFIED_TTL)
        self._failures: TTLCache[str, int] = TTLCache(maxsize=16384, ttl=_FAILURE_WINDOW)
        self._checkers = ThreadPoolExecutor(max_workers=_CHECKERS, thread_name_prefix="bcrypt")
        self._waiting = 0
        self._generation = 0
        self._dummy_cost = 10
        self.load()

    def load(self) -> None:
        """(Re)read the file; on an error the accounts already loaded stay."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"auth.htpasswd: cannot read {self.path}: {exc.strerror}") from exc
        users = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            user, sep, hashed = line.strip().partition(":")
            if not sep or not user or not _BCRYPT_RE.fullmatch(hashed):
                raise ConfigError(f"auth.htpasswd: {self.path} line {number}: expected user:bcrypt-hash "
                                  f"(make entries with htpasswd -B)")
            users[user] = hashed.encode()
        costs = [int(h[4:6]) for h in users.values()] or [10]
        self._dummy_cost = max(set(costs), key=costs.count)
        self._dummy = b""
        self._users = users
        self._generation += 1
        self._verified.clear()
        self._refused.clear()

    async def verify(self, user: str, password: str, client: str) -> bool:
        """Raises TooManyRequests when `client` (its address) has failed too often lately, or too
        many checks are waiting."""
        secret = password.encode()[:72]  # all bcrypt looks at, as htpasswd -B
        key = hashlib.sha256(user.encode() + b"\0" + secret).hexdigest()
        if self._verified.get(key) == user:
            return True
        if key in self._refused:
            return False
        # Per address and account: one tenant's stale pull secret locks out only that account there.
        attempts = f"{client}\0{user}"
        if self._failures.get(attempts, 0) >= _MAX_FAILURES:
            raise TooManyRequests("too many failed logins for this account from this address; try again later",
                                  retry_after=str(int(_FAILURE_WINDOW)))
        if self._waiting >= _MAX_WAITING:
            raise TooManyRequests("too many logins at once; try again", retry_after="1")
        generation, hashed = self._generation, self._users.get(user)
        self._waiting += 1
        try:
            matches = await asyncio.get_running_loop().run_in_executor(self._checkers, self._check, secret, hashed)
        finally:
            self._waiting -= 1
        if generation != self._generation:
            return matches  # the file changed meanwhile: answer, remember nothing
        if matches:
            self._verified[key] = user
            return True
        self._refused[key] = True
        self._failures[attempts] = self._failures.get(attempts, 0) + 1
        return False

    def _check(self, secret: bytes, hashed: bytes | None) -> bool:
        """On a checker thread. An unknown user is checked against a stand-in hash of the
        file's usual cost, made on first need (off the event loop)."""
        if hashed is None:
            if not self._dummy:
                self._dummy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(self._dummy_cost))
            bcrypt.checkpw(secret, self._dummy)
            return False
        return bcrypt.checkpw(secret, hashed)

    def close(self) -> None:
        self._checkers.shutdown(wait=False, cancel_futures=True)


class Tokens:
    """Short-lived HS256 tokens naming the user they were issued to. Replicas that share a key
    file accept each other's tokens."""

    def __init__(self, lifetime: float, key_file: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._checked: LRUCache[tuple[str, str], tuple[str, float]] = LRUCache(maxsize=4096)
        if key_file is None:
            self._key = secrets.token_bytes(32)
        else:
            try:
                self._key = key_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"auth.token.key_file: cannot read {key_file}: {exc.strerror}") from exc
            if len(self._key) < 32:
                raise ConfigError(f"auth.token.key_file: {key_file} holds under 32 bytes; use a longer key")

    def issue(self, identity: Identity, service: str) -> str:
        now = int(self._clock())
        claims = {"iss": _ISSUER, "aud": service, "sub": identity.user or "", "iat": now, "nbf": now,
                  "exp": now + int(self.lifetime), "jti": secrets.token_hex(8)}
        return jwt.encode(claims, self._key, algorithm="HS256")

    def user(self, token: str, service: str) -> str | None:
        """The user a valid token was issued to ("" for anonymous); None for any other token.
        A client presents the same token on every request of a pull: its checked claims are
        remembered, and only its expiry is checked again."""
        known = self._checked.get((token, service))
        if known is None:
            try:
                # Times are checked against the mirror's own clock below.
                claims = jwt.decode(token, self._key, algorithms=["HS256"], audience=service, issuer=_ISSUER,
                                    options={"require": ["exp", "sub"], "verify_exp": False, "verify_iat": False,
                                             "verify_nbf": False})
            except jwt.PyJWTError:
                return None
            expires, sub = claims["exp"], claims["sub"]
            if not isinstance(expires, int | float) or not isinstance(sub, str):
                return None
            known = self._checked[(token, service)] = (sub, float(expires))
        sub, expires = known
        return sub if expires > self._clock() else None


class Policy:
    def __init__(self, config: AuthConfig) -> None:
        self.required = config.htpasswd is not None
        self._groups: dict[str, set[str]] = {}
        for group, users in config.groups:
            for user in users:
                self._groups.setdefault(user, set()).add(group)
        self._rules = config.rules

    def identity(self, user: str | None) -> Identity:
        if not user:
            return ANONYMOUS
        return Identity(user, frozenset(self._groups.get(user, ())))

    def allows(self, identity: Identity, upstream: str, name: str, permission: str = "pull") -> bool:
        """The first rule naming this client, this repository and `permission` decides; none:
        refused. With no rules, authentication alone decides a pull, and nobody administers."""
        return self._decide(identity, f"{upstream}/{name}", permission)

    def allows_everywhere(self, identity: Identity, permission: str) -> bool:
        """`permission` over the whole cache, with no exception (gc): a rule with the pattern `*`
        grants it, unless a deny rule for this client comes first."""
        names = identity.names
        for rule in self._rules:
            if permission in rule.permissions and not names.isdisjoint(rule.who):
                if not rule.allow:
                    return False
                if "*" in rule.repositories:
                    return True
        return False

    def _decide(self, identity: Identity, repository: str, permission: str) -> bool:
        if not self._rules:
            return permission == "pull" and (identity.user is not None or not self.required)
        names = identity.names
        for rule in self._rules:
            if (permission in rule.permissions and not names.isdisjoint(rule.who)
                    and any(fnmatch.fnmatchcase(repository, p) for p in rule.repositories)):
                return rule.allow
        return False


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) from `Basic base64(user:password)`; None if it is not that."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):  # ValueError: not ASCII, or not UTF-8
        return None
    return (user, password) if sep and user else None
