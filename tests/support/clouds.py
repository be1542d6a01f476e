"""Loopback stand-ins for the clouds' token services, each speaking its real protocol closely
enough for the real client (botocore, google-auth, the mirror's own Azure client): the ECR API's
`GetAuthorizationToken` (JSON 1.1, SigV4 checked), Google's OAuth token endpoint (a signed JWT
assertion, checked against the service account's public key), the GCE metadata server, and Azure
AD's client-credentials endpoint with ACR's `/oauth2/exchange`.

Every stand-in issues secrets numbered from 1 (`<prefix>1`, `<prefix>2`, ...) so a test knows
what the n-th refresh returns, records what it was asked, and issues them valid for `lifetime`
seconds by `clock`, the test's controllable clock.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_SIGV4_RE = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request, "
                       r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})")


@dataclass
class Issuer:
    prefix: str
    lifetime: float = 12 * 3600.0
    issued: list[str] = field(default_factory=list)
    refuse: bool = False
    """Answer every request as the service does a caller it does not accept."""
    clock: Callable[[], float] = time.time

    def expires_at(self) -> float:
        return self.clock() + self.lifetime

    def expires_in(self) -> int:
        """For google-auth, which adds `expires_in` to its own (real) clock: what makes the
        token expire `lifetime` from now by the test's clock."""
        return int(self.expires_at() - time.time())

    def issue(self) -> str:
        self.issued.append(f"{self.prefix}{len(self.issued) + 1}")
        return self.issued[-1]

    def secret(self, n: int) -> str:
        """The n-th secret this issuer hands out (1-based), issued or not yet."""
        return f"{self.prefix}{n}"


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


# Amazon ECR


@dataclass
class EcrApi(Issuer):
    """`AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken`; `signers` records, per call,
    the access key id whose secret key made a valid SigV4 signature (None if none did)."""

    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    signers: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.signers.append(self.access_key if self._signed(request, body) else None)
        self.bodies.append(json.loads(body or b"{}"))
        if request.headers.get("X-Amz-Target") != "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken":
            return _aws_error(400, "UnknownOperationException", "unknown operation")
        if self.refuse or self.signers[-1] is None:
            return _aws_error(400, "AccessDeniedException", "not authorized to perform ecr:GetAuthorizationToken")
        password = self.issue()
        token = base64.b64encode(f"AWS:{password}".encode()).decode()
        return web.json_response({"authorizationData": [{
            "authorizationToken": token, "expiresAt": self.expires_at(),
            "proxyEndpoint": "https://123456789012.dkr.ecr.us-east-1.amazonaws.com"}]},
            content_type="application/x-amz-json-1.1")

    def _signed(self, request: web.Request, body: bytes) -> bool:
        """Recompute the SigV4 signature from what arrived, with the secret key we expect."""
        match = _SIGV4_RE.fullmatch(request.headers.get("Authorization", ""))
        if match is None or match.group(1) != self.access_key:
            return False
        _, region, service, signed_headers, signature = match.groups()
        headers = {name: request.headers.get(name, "") for name in signed_headers.split(";")}
        aws = AWSRequest(method=request.method, url=str(request.url), data=body, headers=headers)
        aws.context["timestamp"] = request.headers.get("X-Amz-Date", "")
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key), service, region)
        expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
        return hmac.compare_digest(expected, signature)


def _aws_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"__type": code, "message": message}, status=status,
                             content_type="application/x-amz-json-1.1")


# Google


@dataclass
class GoogleOAuth(Issuer):
    """The `token_uri` of a service-account key: a JWT-bearer grant signed with the account's key."""

    public_key: rsa.RSAPublicKey | None = None
    claims: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        claims = self._verified(str(form.get("assertion", "")))
        if claims is None or self.refuse:
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                                     status=400)
        self.claims.append(claims)
        return web.json_response({"access_token": self.issue(), "expires_in": self.expires_in(),
                                  "token_type": "Bearer"})

    def _verified(self, assertion: str) -> dict[str, Any] | None:
        assert self.public_key is not None
        try:
            header, payload, signature = assertion.split(".")
            self.public_key.verify(_unb64(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(),
                                   hashes.SHA256())
            claims: dict[str, Any] = json.loads(_unb64(payload))
        except (ValueError, InvalidSignature):
            return None
        return claims


@dataclass
class GceMetadata(Issuer):
    """The metadata server's service-account endpoints; `requests` records (path, Metadata-Flavor)."""

    email: str = "mirror@project.iam.gserviceaccount.com"
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        flavor = request.headers.get("Metadata-Flavor")
        self.requests.append((request.path, flavor))
        if flavor != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        headers = {"Metadata-Flavor": "Google"}
        accounts = "/computeMetadata/v1/instance/service-accounts/default"
        if request.path == f"{accounts}/":
            return web.json_response({"email": self.email, "aliases": ["default"],
                                      "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}, headers=headers)
        if request.path == f"{accounts}/token":
            if self.refuse:
                return web.Response(status=404, text="no service account", headers=headers)
            return web.json_response({"access_token": self.issue(), "expires_in": self.expires_in(),
                                      "token_type": "Bearer"}, headers=headers)
        return web.Response(status=404, headers=headers)


# Azure


@dataclass
class AzureAd(Issuer):
    """Azure AD's client-credentials grant, and ACR's `/oauth2/exchange` (added to the registry's
    own app with `add_exchange`), which turns an AD access token into an ACR refresh token."""

    tenant: str = "tenant-1"
    client_id: str = "app-1"
    client_secret: str = field(default="", repr=False)
    grants: list[dict[str, str]] = field(default_factory=list)
    exchanges: list[dict[str, str]] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)
    exchanged: Callable[[str], None] = lambda token: None
    """Told each refresh token issued (the registry accepts it from then on)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        return app

    def add_exchange(self, app: web.Application) -> None:
        app.router.add_post("/oauth2/exchange", self._exchange)

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.grants.append(form)
        if (request.match_info["tenant"] != self.tenant or form.get("grant_type") != "client_credentials"
                or form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret
                or self.refuse):
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response({"token_type": "Bearer", "expires_in": 3599, "access_token": self.issue()})

    async def _exchange(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.exchanges.append(form)
        if (form.get("grant_type") != "access_token" or form.get("tenant") != self.tenant
                or form.get("access_token") not in self.issued):
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        claims = {"jti": f"refresh-{len(self.refresh_tokens) + 1}", "exp": int(self.expires_at()),
                  "grant_type": "refresh_token", "tenant": self.tenant}
        token = ".".join(_b64(json.dumps(part).encode()) for part in ({"alg": "RS256", "typ": "JWT"}, claims))
        self.refresh_tokens.append(f"{token}.{_b64(b'not-a-real-signature')}")
        self.exchanged(self.refresh_tokens[-1])
        return web.json_response({"refresh_token": self.refresh_tokens[-1]})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
