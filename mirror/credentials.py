"""Where an upstream's credentials come from, and which token services they may go to.

A `CredentialSource` gives the upstream client a (username, secret) pair whenever it is about to
send one, so a source may change its answer: a Docker `config.json` that was edited, a credential
helper run again, a cloud token renewed. Cloud tokens (ECR, Google, ACR exchange) are fetched on
first use, shared by concurrent callers (one refresh at a time), renewed `REFRESH_MARGIN` before
they expire, and dropped as soon as the upstream rejects them. The SDKs (botocore, google-auth)
block, so they run in a thread, and are imported on first use: an upstream that does not use them
does not load them.

No secret is ever logged, put in an error message or shown in a repr: errors name the source
(`describe()`) and what failed, never what was sent or received.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit

import aiohttp
from publicsuffixlist import PublicSuffixList
from yarl import URL

from mirror.errors import MirrorError, Unavailable, UpstreamRefused

if TYPE_CHECKING:
    from mirror.config import UpstreamConfig

log = logging.getLogger(__name__)

Credential = tuple[str, str]
"""(username, secret)."""

# An expiring credential is renewed this long before it expires.
REFRESH_MARGIN = 300.0
# A credential helper's answer is used this long before the helper is asked again.
HELPER_TTL = 300.0
# A credential helper that has not answered by then is killed.
HELPER_TIMEOUT = 10.0
# Calls to a cloud's token service give up after this long.
CLOUD_TIMEOUT = 30.0
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
GCP_USERNAME = "oauth2accesstoken"
GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
ACR_USERNAME = "00000000-0000-0000-0000-000000000000"
ACR_SCOPE = "https://containerregistry.azure.net/.default"
AZURE_AUTHORITY = "https://login.microsoftonline.com"
_HELPER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# What the configuration says (values; the sources below are what runs).


@dataclass(frozen=True, slots=True)
class DockerConfigCredentials:
    """A Docker `config.json`: `auths`, `credHelpers` and `credsStore`, as the Docker CLI reads them."""

    path: Path


@dataclass(frozen=True, slots=True)
class EcrCredentials:
    """Amazon ECR: a `GetAuthorizationToken` token, with the AWS SDK's credential chain."""

    region: str
    registry_id: str | None = None
    endpoint_url: str | None = None


@dataclass(frozen=True, slots=True)
class GcrCredentials:
    """Google Artifact Registry / Container Registry: an OAuth access token from a service-account
    key file, or (no key file) from the metadata server."""

    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AcrCredentials:
    """Azure Container Registry: a service principal's id and secret as they are, or, with
    `exchange`, an Azure AD token exchanged for an ACR refresh token."""

    client_id: str
    client_secret: str = field(repr=False)
    tenant_id: str | None = None
    exchange: bool = False
    authority_host: str = AZURE_AUTHORITY


CredentialsConfig = DockerConfigCredentials | EcrCredentials | GcrCredentials | AcrCredentials


class CredentialSource(Protocol):
    async def get(self) -> Credential | None:
        """The credential to send now; None: none for this upstream (anonymous)."""

    def rejected(self, credential: Credential) -> bool:
        """The upstream refused `credential`: forget it. True if `get()` may now give another."""

    def describe(self) -> str:
        """What the credentials come from, for logs and errors (never a secret)."""

    @property
    def expires(self) -> float | None:
        """When the current credential expires (epoch seconds); None: it does not, or none is held yet."""


def credential_source(upstream: UpstreamConfig) -> CredentialSource | None:
    spec = upstream.credentials
    if isinstance(spec, DockerConfigCredentials):
        return DockerConfigSource(spec.path, upstream.name, upstream.url)
    if isinstance(spec, EcrCredentials):
        return EcrSource(spec)
    if isinstance(spec, GcrCredentials):
        return GcrSource(spec)
    if isinstance(spec, AcrCredentials):
        if spec.exchange:
            return AcrExchangeSource(spec, upstream.url)
        return StaticSource(spec.client_id, spec.client_secret, f"ACR service principal {spec.client_id}")
    if upstream.username is not None:
        return StaticSource(upstream.username, upstream.password or "", f"username {upstream.username}")
    return None


class StaticSource:
    """A username and password from the configuration (inline, a file or a variable)."""

    def __init__(self, username: str, secret: str, what: str) -> None:
        self._credential = (username, secret)
        self._what = what

    async def get(self) -> Credential:
        return self._credential

    def rejected(self, credential: Credential) -> bool:
        return False

    @property
    def expires(self) -> float | None:
        return None

    def describe(self) -> str:
        return self._what


# Docker config.json


class DockerConfigSource:
    """Re-read whenever the file changes (a mounted Kubernetes secret is replaced, not edited); a
    credential helper's answer is kept for `HELPER_TTL` or until the upstream rejects it."""

    def __init__(self, path: Path, name: str, url: str) -> None:
        self._path = path
        hosts = {name, urlsplit(url).netloc}
        hub = bool(hosts & set(DOCKER_HUB_HOSTS))
        self._hosts = hosts | set(DOCKER_HUB_HOSTS) if hub else hosts
        # What `credsStore` is asked for: the server the Docker CLI logs in to.
        self._server = DOCKER_HUB_SERVER if hub else name
        self._lock = asyncio.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._credential: Credential | None = None
        self._valid_until: float | None = None
        """Monotonic time a helper's answer is good until; None for the file's own entries."""

    @property
    def expires(self) -> float | None:
        return None

    def describe(self) -> str:
        return f"Docker config {self._path}"

    async def get(self) -> Credential | None:
        async with self._lock:
            stamp = self._file_stamp()
            if stamp is None:
                raise Unavailable(f"{self.describe()}: cannot read it")
            stale = self._valid_until is not None and time.monotonic() >= self._valid_until
            if stamp != self._stamp or stale:
                self._credential, self._valid_until = await self._read()
                self._stamp = stamp
            return self._credential

    def rejected(self, credential: Credential) -> bool:
        if credential != self._credential:
            return True
        if self._valid_until is not None:
            self._valid_until = 0.0
            return True
        return self._file_stamp() != self._stamp

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    async def _read(self) -> tuple[Credential | None, float | None]:
        try:
            document = json.loads(self._path.read_text())
        except (OSError, ValueError):
            raise Unavailable(f"{self.describe()}: cannot read it as JSON") from None
        if not isinstance(document, dict):
            raise Unavailable(f"{self.describe()}: not a JSON object")
        helpers = document.get("credHelpers")
        matched = [(key, name) for key, name in (helpers.items() if isinstance(helpers, dict) else ())
                   if _hostname(key) in self._hosts]
        server, helper = matched[0] if matched else (self._server, document.get("credsStore"))
        if helper:
            return await self._run_helper(str(helper), server), time.monotonic() + HELPER_TTL
        auths = document.get("auths")
        for key, entry in auths.items() if isinstance(auths, dict) else ():
            if _hostname(key) in self._hosts and isinstance(entry, dict):
                return self._entry(key, entry), None
        return None, None

    def _entry(self, key: str, entry: Mapping[str, object]) -> Credential | None:
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                username, sep, secret = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise Unavailable(f"{self.describe()}: auths[{key!r}].auth is not base64 of username:password")
            return username, secret
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return str(entry["username"]), str(entry["password"])
        if entry.get("identitytoken"):
            raise Unavailable(f"{self.describe()}: auths[{key!r}] holds an identity token, which the mirror "
                              "cannot use")
        return None

    async def _run_helper(self, name: str, server: str) -> Credential | None:
        """`docker-credential-<name> get`, with the server on stdin. Its output holds the secret:
        none of it is ever logged or put in an error."""
        program = shutil.which(f"docker-credential-{name}") if _HELPER_NAME_RE.fullmatch(name) else None
        if program is None:
            raise Unavailable(f"{self.describe()}: credential helper docker-credential-{name} is not on PATH")
        what = f"{self.describe()}: docker-credential-{name}"
        try:
            process = await asyncio.create_subprocess_exec(
                program, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            raise Unavailable(f"{what} cannot be run: {exc.strerror}") from None
        try:
            async with asyncio.timeout(HELPER_TIMEOUT):
                output, _ = await process.communicate(server.encode())
        except TimeoutError:
            raise Unavailable(f"{what} did not answer within {HELPER_TIMEOUT:g} s") from None
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.returncode != 0:
            if b"credentials not found" in output:
                return None
            raise Unavailable(f"{what} failed with exit status {process.returncode}")
        try:
            answer = json.loads(output)
            username, secret = answer["Username"], answer["Secret"]
        except (ValueError, TypeError, KeyError):
            raise Unavailable(f"{what} did not answer with Username and Secret") from None
        if not isinstance(username, str) or not isinstance(secret, str):
            raise Unavailable(f"{what} did not answer with Username and Secret")
        if username == "<token>":
            raise Unavailable(f"{what} gave an identity token, which the mirror cannot use")
        return username, secret


def _hostname(key: str) -> str:
    """A config.json key as the Docker CLI matches it: `https://index.docker.io/v1/` -> the host."""
    return key.removeprefix("http://").removeprefix("https://").split("/", 1)[0].lower()


# Expiring cloud tokens


def wall_clock() -> float:
    """Now, in epoch seconds, which is what clouds give expiry times in (tests replace it)."""
    return time.time()


@dataclass(frozen=True, slots=True)
class Issued:
    credential: Credential = field(repr=False)
    expires: float
    """Wall-clock (epoch) seconds."""


class RefreshingSource(ABC):
    """A credential that expires: fetched on first use, one fetch at a time, renewed
    `REFRESH_MARGIN` before it expires. When a renewal fails, the current credential serves out
    its time."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._issued: Issued | None = None

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    async def _issue(self) -> Issued: ...

    async def get(self) -> Credential:
        async with self._lock:
            current = self._issued
            if current is None or wall_clock() >= current.expires - REFRESH_MARGIN:
                try:
                    current = self._issued = await self._issue()
                except MirrorError as exc:
                    if current is None or wall_clock() >= current.expires:
                        raise
                    log.warning("%s: renewal failed (%s); the current credential is used until it expires",
                                self.describe(), exc.message)
                else:
                    log.info("%s: new credential, valid for %.0f s", self.describe(), current.expires - wall_clock())
            return current.credential

    @property
    def expires(self) -> float | None:
        return None if self._issued is None else self._issued.expires

    def rejected(self, credential: Credential) -> bool:
        if self._issued is not None and self._issued.credential == credential:
            self._issued = None
        return True


class _EcrClient(Protocol):
    """The one botocore ECR client call used (botocore's clients are built at run time)."""

    def get_authorization_token(self, **params: Any) -> dict[str, Any]: ...


class EcrSource(RefreshingSource):
    """`GetAuthorizationToken`, signed with whatever the AWS credential chain finds (variables,
    shared files, web identity, container or instance roles); its token is `AWS:<password>`."""

    def __init__(self, spec: EcrCredentials) -> None:
        super().__init__()
        self._spec = spec
        self._client: _EcrClient | None = None

    def describe(self) -> str:
        registry = f" for registry {self._spec.registry_id}" if self._spec.registry_id else ""
        return f"ECR GetAuthorizationToken in {self._spec.region}{registry}"

    async def _issue(self) -> Issued:
        return await asyncio.to_thread(self._call)

    def _call(self) -> Issued:
        import botocore.config
        import botocore.exceptions
        import botocore.session

        try:
            if self._client is None:
                # botocore logs whole requests and responses, tokens included, at DEBUG.
                logging.getLogger("botocore").setLevel(max(logging.INFO, logging.getLogger("botocore").level))
                config = botocore.config.Config(connect_timeout=CLOUD_TIMEOUT, read_timeout=CLOUD_TIMEOUT,
                                                retries={"mode": "standard", "max_attempts": 3})
                self._client = cast(_EcrClient, botocore.session.get_session().create_client(
                    "ecr", region_name=self._spec.region, endpoint_url=self._spec.endpoint_url, config=config))
            params = {"registryIds": [self._spec.registry_id]} if self._spec.registry_id else {}
            data = self._client.get_authorization_token(**params)["authorizationData"][0]
            token = base64.b64decode(data["authorizationToken"]).decode()
            expires = data["expiresAt"].timestamp()
        except botocore.exceptions.NoCredentialsError:
            raise UpstreamRefused(f"{self.describe()}: no AWS credentials found") from None
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            refused = status < 500 and "Throttl" not in code
            raise (UpstreamRefused if refused else Unavailable)(f"{self.describe()} failed: {code}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise Unavailable(f"{self.describe()} failed: {type(exc).__name__}") from None
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise Unavailable(f"{self.describe()}: unexpected answer") from None
        username, sep, password = token.partition(":")
        if not sep:
            raise Unavailable(f"{self.describe()}: the token is not user:password")
        return Issued((username, password), expires)


class GcrSource(RefreshingSource):
    """An OAuth access token, sent as the password of `oauth2accesstoken`. The key file is read
    again at each renewal, so a rotated Kubernetes secret is picked up."""

    def __init__(self, spec: GcrCredentials) -> None:
        super().__init__()
        self._key_file = spec.key_file

    def describe(self) -> str:
        if self._key_file is None:
            return "GCE metadata server"
        return f"Google service account key {self._key_file}"

    async def _issue(self) -> Issued:
        return await asyncio.to_thread(self._refresh)

    def _refresh(self) -> Issued:
        import google.auth.compute_engine
        import google.auth.exceptions
        import google.auth.transport.requests
        import google.oauth2.service_account
        import requests

        credentials: google.auth.compute_engine.Credentials | google.oauth2.service_account.Credentials
        try:
            if self._key_file is None:
                credentials = google.auth.compute_engine.Credentials()  # type: ignore[no-untyped-call]
            else:
                credentials = google.oauth2.service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                    str(self._key_file), scopes=[GCP_SCOPE])
            with requests.Session() as session:
                credentials.refresh(google.auth.transport.requests.Request(session))  # type: ignore[no-untyped-call]
        except (OSError, ValueError) as exc:
            raise Unavailable(f"{self.describe()}: cannot use it: {type(exc).__name__}") from None
        except google.auth.exceptions.GoogleAuthError as exc:
            transport = isinstance(exc, google.auth.exceptions.TransportError) or isinstance(
                exc.__cause__, google.auth.exceptions.TransportError)
            error = Unavailable if transport or exc.retryable else UpstreamRefused
            raise error(f"{self.describe()}: no access token: {type(exc).__name__}") from None
        if not credentials.token or credentials.expiry is None:
            raise Unavailable(f"{self.describe()}: no access token")
        # google-auth keeps expiry as a naive UTC datetime.
        return Issued((GCP_USERNAME, credentials.token), credentials.expiry.replace(tzinfo=UTC).timestamp())


class AcrExchangeSource(RefreshingSource):
    """A service principal's Azure AD token (client credentials), exchanged at the registry's
    own `/oauth2/exchange` for an ACR refresh token, which is the password of the all-zero user."""

    def __init__(self, spec: AcrCredentials, url: str) -> None:
        super().__init__()
        self._spec = spec
        self._registry = URL(url).origin()

    def describe(self) -> str:
        return f"ACR token exchange for {self._spec.client_id} in tenant {self._spec.tenant_id}"

    async def _issue(self) -> Issued:
        spec = self._spec
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLOUD_TIMEOUT)) as session:
            aad = await self._post(session, URL(spec.authority_host) / str(spec.tenant_id) / "oauth2/v2.0/token", {
                "grant_type": "client_credentials", "client_id": spec.client_id,
                "client_secret": spec.client_secret, "scope": ACR_SCOPE}, "Azure AD")
            access_token, lifetime = aad.get("access_token"), aad.get("expires_in")
            if not isinstance(access_token, str):
                raise Unavailable(f"{self.describe()}: Azure AD sent no access token")
            exchanged = await self._post(session, self._registry / "oauth2/exchange", {
                "grant_type": "access_token", "service": str(self._registry.authority),
                "tenant": str(spec.tenant_id), "access_token": access_token}, "the registry's token exchange")
        refresh_token = exchanged.get("refresh_token")
        if not isinstance(refresh_token, str):
            raise Unavailable(f"{self.describe()}: the registry sent no refresh token")
        # The refresh token says when it expires; the Azure AD token's lifetime is the fallback.
        fallback = wall_clock() + (float(lifetime) if isinstance(lifetime, int | float) else 3600.0)
        return Issued((ACR_USERNAME, refresh_token), _jwt_expiry(refresh_token) or fallback)

    async def _post(self, session: aiohttp.ClientSession, url: URL, form: Mapping[str, str],
                    what: str) -> dict[str, Any]:
        try:
            async with session.post(url, data=form, allow_redirects=False) as response:
                if response.status in (400, 401, 403):
                    raise UpstreamRefused(f"{self.describe()}: {what} refused the credentials ({response.status})")
                if response.status != 200:
                    raise Unavailable(f"{self.describe()}: {what} answered {response.status}")
                body = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise Unavailable(f"{self.describe()}: {what} failed: {type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise Unavailable(f"{self.describe()}: {what} sent no JSON object")
        return body


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (only to know when to renew)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


# Where credentials may go


@dataclass(frozen=True, slots=True)
class _Allowed:
    host: str
    port: int | None
    """None: the upstream's port."""
    subdomains: bool
    """The host's subdomains, not the host itself."""


class TokenRealms:
    """The token services an upstream's credentials may be sent to. Each entry is `host`,
    `host:port` or `*.domain` (any subdomain); an entry without a port means the upstream's port.
    By default: the upstream's host, its registrable domain and that domain's subdomains
    (auth.docker.io for registry-1.docker.io), or only the upstream's host if it is an IP address
    or a single label. Credentials never go over plain http to a realm of an https upstream."""

    def __init__(self, url: str, entries: tuple[str, ...] | None) -> None:
        upstream = URL(url)
        self._scheme = upstream.scheme
        self._port = upstream.port
        host = (upstream.host or "").lower()
        self._allowed = _default_realms(host) if entries is None else [_allowed(e) for e in entries]

    def allows(self, realm: URL) -> bool:
        if realm.scheme not in (self._scheme, "https"):
            return False
        host = (realm.host or "").lower()
        return any((host.endswith(f".{a.host}") if a.subdomains else host == a.host)
                   and realm.port == (self._port if a.port is None else a.port) for a in self._allowed)


def _default_realms(host: str) -> list[_Allowed]:
    own = [_Allowed(host, None, subdomains=False)]
    try:
        ipaddress.ip_address(host)
        return own
    except ValueError:
        pass
    registrable = _public_suffixes().privatesuffix(host) if "." in host else None
    if registrable is None:
        return own
    return [*own, _Allowed(registrable, None, subdomains=False), _Allowed(registrable, None, subdomains=True)]


def _allowed(entry: str) -> _Allowed:
    url = URL(f"//{entry.removeprefix('*.')}")
    return _Allowed((url.host or "").lower(), url.explicit_port, subdomains=entry.startswith("*."))


@cache
def _public_suffixes() -> PublicSuffixList:
    """The Public Suffix List that ships with the package (never fetched), loaded once."""
    return PublicSuffixList()
