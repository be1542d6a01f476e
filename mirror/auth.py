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
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import jwt
from cachetools import TTLCache

from mirror.config import AccessRule, AuthConfig
from mirror.errors import ConfigError

log = logging.getLogger(__name__)

_ISSUER = "mirror"
# A good password stays good for this long without paying for bcrypt again.
_VERIFIED_TTL = 300.0


@dataclass(frozen=True, slots=True)
class Identity:
    user: str | None
    """None: anonymous."""
    groups: frozenset[str] = frozenset()


ANONYMOUS = Identity(None)


class Htpasswd:
    """An Apache htpasswd file with bcrypt entries (`htpasswd -B`), as CNCF distribution takes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, bytes] = {}
        self._verified: TTLCache[str, str] = TTLCache(maxsize=4096, ttl=_VERIFIED_TTL)
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
            if not sep or not user or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ConfigError(f"auth.htpasswd: {self.path} line {number}: expected user:bcrypt-hash "
                                  f"(make entries with htpasswd -B)")
            users[user] = hashed.encode()
        self._users = users
        self._verified.clear()

    async def verify(self, user: str, password: str) -> bool:
        key = hashlib.sha256(f"{user}\0{password}".encode()).hexdigest()
        if self._verified.get(key) == user:
            return True
        hashed = self._users.get(user)
        if hashed is None:
            return False
        # bcrypt is slow by design: off the event loop.
        if not await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed):
            return False
        self._verified[key] = user
        return True


class Tokens:
    """Short-lived HS256 tokens naming the user they were issued to. Replicas that share a key
    file accept each other's tokens."""

    def __init__(self, lifetime: float, key_file: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = lifetime
        self._clock = clock
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
        """The user a valid token was issued to ("" for anonymous); None for any other token."""
        try:
            # Times are checked against the mirror's own clock below.
            claims = jwt.decode(token, self._key, algorithms=["HS256"], audience=service, issuer=_ISSUER,
                                options={"require": ["exp", "sub"], "verify_exp": False, "verify_iat": False,
                                         "verify_nbf": False})
        except jwt.PyJWTError:
            return None
        expires = claims["exp"]
        if not isinstance(expires, int | float) or expires <= self._clock():
            return None
        sub = claims["sub"]
        return sub if isinstance(sub, str) else None


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

    def allows(self, identity: Identity, upstream: str, name: str) -> bool:
        """The first rule naming this client and this repository decides; none: refused. With no
        rules, authentication alone decides."""
        if not self._rules:
            return identity.user is not None or not self.required
        repository = f"{upstream}/{name}"
        for rule in self._rules:
            if _names(rule, identity) and any(fnmatch.fnmatchcase(repository, p) for p in rule.repositories):
                return rule.allow
        return False


def _names(rule: AccessRule, identity: Identity) -> bool:
    if identity.user is None:
        return any(who in ("*", "anonymous") for who in rule.who)
    names = {"*", "authenticated", f"user:{identity.user}", *(f"group:{g}" for g in identity.groups)}
    return not names.isdisjoint(rule.who)


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) from `Basic base64(user:password)`; None if it is not that."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None
