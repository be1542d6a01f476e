"""Upstream credentials from every source, each against a loopback stand-in that speaks the real
protocol (tests/support/clouds.py), pulled through a real mirror from the fake upstream: the
upstream gets exactly the expected credential, expiring ones are renewed before they expire (on
a clock the test moves) and once when the upstream rejects them, a token realm outside the
allow-list gets nothing, and no secret reaches a log record or anything a client sees.

Nothing sleeps to synchronise; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import google.auth.compute_engine._metadata as gce_metadata
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from mirror import credentials
from mirror.config import load
from mirror.credentials import (
    ACR_USERNAME,
    DOCKER_HUB_SERVER,
    GCP_USERNAME,
    AcrCredentials,
    DockerConfigCredentials,
    EcrCredentials,
    GcrCredentials,
    TokenRealms,
)
from mirror.errors import ConfigError
from tests.conftest import MirrorFactory
from tests.support.clouds import AzureAd, EcrApi, GceMetadata, GoogleOAuth, serve, url
from tests.support.fake_upstream import FakeUpstream
from tests.support.pulls import NAME, OTHER, Clock, Fetched, add_image, pull_blob, pull_manifest

basic = aiohttp.encode_basic_auth
AWS_KEY_ID, AWS_SECRET = "AKIDMIRRORTEST", "aws-secret-key-never-sent"


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(credentials, "wall_clock", clock)
    return clock


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
async def servers() -> AsyncIterator[list[TestServer]]:
    started: list[TestServer] = []
    yield started
    for server in started:
        await server.close()


async def start(servers: list[TestServer], app: web.Application) -> str:
    servers.append(await serve(app))
    return url(servers[-1])


def assert_no_secret(logs: pytest.LogCaptureFixture, seen: Iterable[Fetched], secrets: Iterable[str],
                     pairs: Iterable[tuple[str, str]] = ()) -> None:
    """No secret (nor a pair's Basic or base64 form) in a log record, traceback included, or in
    what a client got."""
    every = {s for s in secrets if s}
    for username, secret in pairs:
        every |= {secret, basic(username, secret), base64.b64encode(f"{username}:{secret}".encode()).decode()}
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    records = [formatter.format(record) for record in logs.records]
    assert records, "nothing was logged: the capture is not working"
    leaks = [(secret, line) for line in records for secret in every if secret in line]
    assert not leaks, leaks
    for response in seen:
        text = response.body.decode(errors="replace") + repr(dict(response.headers))
        assert not [secret for secret in every if secret in text], text[:300]


@pytest.fixture
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The AWS credential chain finds these variables, and nothing on this machine or network."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_ECR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def ecr_stand_in(servers: list[TestServer], clock: Clock) -> tuple[EcrApi, EcrCredentials]:
    api = EcrApi(prefix="ecr-password-", lifetime=12 * 3600.0, clock=clock, access_key=AWS_KEY_ID,
                 secret_key=AWS_SECRET)
    endpoint = await start(servers, api.app())
    return api, EcrCredentials(region="us-east-1", registry_id="123456789012", endpoint_url=endpoint)


# Amazon ECR


async def test_ecr_token_is_signed_shared_and_sent_only_to_the_registry(
        aws_environment: None, wall: Clock, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, servers: list[TestServer], logs: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    api, spec = await ecr_stand_in(servers, wall)
    fake.auth, fake.credentials = "basic", ("AWS", api.secret(1))
    image = add_image(fake, layers=[b"ecr layer"])
    for tag in ("a", "b", "c"):
        add_image(fake, tag=tag, seed=ord(tag))
    token = tmp_path / "admin.token"
    token.write_text("admin-token-0123456789")
    token.chmod(0o600)
    mirror = await make_mirror({"123456789012.dkr.ecr.us-east-1.amazonaws.com": fake.url}, credentials=spec,
                               admin_token_file=token)

    # Concurrent first pulls share one GetAuthorizationToken.
    results = list(await asyncio.gather(
        pull_manifest(client, mirror, NAME, "latest"), *(pull_manifest(client, mirror, NAME, tag) for tag in "abc"),
        pull_blob(client, mirror, NAME, image.layers[0])))
    assert [r.status for r in results] == [200] * 5, [r.body[:200] for r in results]
    assert results[-1].body == b"ecr layer"
    assert api.issued == [api.secret(1)]
    assert api.signers == [AWS_KEY_ID], "signed with SigV4 by the access key from the environment"
    assert api.bodies == [{"registryIds": ["123456789012"]}]
    assert {a for a in fake.authorizations if a is not None} == {basic("AWS", api.secret(1))}
    assert_no_secret(logs, results, [AWS_SECRET], [("AWS", api.secret(1))])

    # The status API says when the credentials expire, where they come from to an administrator
    # only, and never what they are.
    for headers, source in (({}, "configured"), ({"Authorization": "Bearer admin-token-0123456789"}, "ECR")):
        async with client.get(f"{mirror.url}/api/v1/upstreams", headers=headers) as response:
            text = await response.text()
        (shown,) = json.loads(text)
        assert source in shown["credentials"] and shown["credentials_expire"] == pytest.approx(wall.now + api.lifetime)
        assert api.secret(1) not in text and AWS_SECRET not in text


async def test_ecr_token_is_renewed_before_it_expires(
        aws_environment: None, wall: Clock, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, servers: list[TestServer], logs: pytest.LogCaptureFixture) -> None:
    api, spec = await ecr_stand_in(servers, wall)
    fake.auth, fake.credentials = "basic", ("AWS", api.secret(1))
    for tag in ("a", "b", "c", "d"):
        add_image(fake, tag=tag, seed=ord(tag))
    mirror = await make_mirror({"docker.io": fake.url}, credentials=spec)
    seen = [await pull_manifest(client, mirror, NAME, "a")]
    expires = wall.now + api.lifetime

    # Outside the renewal margin: the token is kept.
    wall.now = expires - credentials.REFRESH_MARGIN - 60
    seen.append(await pull_manifest(client, mirror, NAME, "b"))
    assert api.issued == [api.secret(1)]

    # Inside it, with the ECR API failing: the current token serves out its time.
    wall.now = expires - credentials.REFRESH_MARGIN + 60
    api.refuse = True
    seen.append(await pull_manifest(client, mirror, NAME, "c"))
    assert api.issued == [api.secret(1)] and len(api.signers) == 2

    # The ECR API is back, and the registry takes only the renewed token: the mirror sends it
    # straight away, before the old one expired and without being refused first.
    api.refuse = False
    fake.credentials = ("AWS", api.secret(2))
    before = len(fake.authorizations)
    seen.append(await pull_manifest(client, mirror, NAME, "d"))
    assert wall.now < expires
    assert fake.authorizations[before:] == [basic("AWS", api.secret(2))]
    assert api.issued == [api.secret(1), api.secret(2)]
    assert [r.status for r in seen] == [200] * 4
    assert_no_secret(logs, seen, [AWS_SECRET], [("AWS", api.secret(1)), ("AWS", api.secret(2))])


async def test_rejected_ecr_token_is_renewed_once(
        aws_environment: None, wall: Clock, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, servers: list[TestServer], logs: pytest.LogCaptureFixture) -> None:
    api, spec = await ecr_stand_in(servers, wall)
    fake.auth, fake.credentials = "basic", ("AWS", api.secret(1))
    for tag in ("a", "b", "c"):
        add_image(fake, tag=tag, seed=ord(tag))
    mirror = await make_mirror({"docker.io": fake.url}, credentials=spec)
    assert (await pull_manifest(client, mirror, NAME, "a")).status == 200

    # Revoked early: refused once, renewed, retried.
    fake.credentials = ("AWS", api.secret(2))
    renewed = await pull_manifest(client, mirror, NAME, "b")
    assert renewed.status == 200
    assert api.issued == [api.secret(1), api.secret(2)]

    # Refused whatever the mirror sends: one renewal, then the client is told.
    fake.credentials = ("AWS", "not-anything-ecr-issues")
    refused = await pull_manifest(client, mirror, NAME, "c")
    assert refused.status == 403 and refused.error_code() == "DENIED"
    assert len(api.issued) == 3
    assert_no_secret(logs, [renewed, refused], [AWS_SECRET], [("AWS", api.secret(n)) for n in (1, 2, 3)])


async def test_ecr_refusal_is_an_unauthorized_without_secrets(
        aws_environment: None, wall: Clock, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, servers: list[TestServer], logs: pytest.LogCaptureFixture) -> None:
    api, spec = await ecr_stand_in(servers, wall)
    api.refuse = True
    fake.auth, fake.credentials = "basic", ("AWS", api.secret(1))
    add_image(fake)
    mirror = await make_mirror({"docker.io": fake.url}, credentials=spec)
    refused = await pull_manifest(client, mirror, NAME, "latest")
    assert refused.status == 403 and refused.error_code() == "DENIED"
    assert b"ECR GetAuthorizationToken in us-east-1 for registry 123456789012 failed: AccessDeniedException" \
        in refused.body
    assert_no_secret(logs, [refused], [AWS_SECRET])


# Google Artifact Registry / Container Registry


@dataclass
class ServiceAccount:
    key_file: Path
    oauth: GoogleOAuth
    private_key_pem: str


@pytest.fixture
async def service_account(tmp_path: Path, servers: list[TestServer]) -> ServiceAccount:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    oauth = GoogleOAuth(prefix="ya29.service-account-", public_key=key.public_key())
    token_uri = f"{await start(servers, oauth.app())}/token"
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "project", "private_key_id": "key-1", "private_key": pem,
        "client_email": "mirror@project.iam.gserviceaccount.com", "client_id": "1", "token_uri": token_uri}))
    return ServiceAccount(key_file, oauth, pem)


async def test_gcr_service_account_key_file(
        service_account: ServiceAccount, wall: Clock, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, logs: pytest.LogCaptureFixture) -> None:
    oauth = service_account.oauth
    oauth.lifetime, oauth.clock = 3600.0, wall
    fake.auth, fake.credentials = "bearer", (GCP_USERNAME, oauth.secret(1))
    image = add_image(fake, layers=[b"gcr layer"])
    other = add_image(fake, OTHER, seed=1)
    mirror = await make_mirror({"us-docker.pkg.dev": fake.url}, credentials=GcrCredentials(service_account.key_file))

    seen = [await pull_manifest(client, mirror, NAME, "latest"), await pull_blob(client, mirror, NAME, image.layers[0])]
    assert [r.status for r in seen] == [200, 200] and seen[0].body == image.manifest
    (claims,) = oauth.claims
    assert (claims["iss"], claims["aud"], claims["scope"]) == (
        "mirror@project.iam.gserviceaccount.com", "https://oauth2.googleapis.com/token",
        "https://www.googleapis.com/auth/cloud-platform")

    # Another repository needs another registry token; the access token expires in a minute, so
    # it is renewed first.
    wall.now += oauth.lifetime - 60
    fake.credentials = (GCP_USERNAME, oauth.secret(2))
    seen.append(await pull_manifest(client, mirror, OTHER, "latest"))
    assert seen[-1].status == 200 and seen[-1].body == other.manifest
    assert [header for header, _ in fake.token_requests] == [basic(GCP_USERNAME, oauth.secret(n)) for n in (1, 2)]
    assert oauth.issued == [oauth.secret(1), oauth.secret(2)]
    key_lines = service_account.private_key_pem.splitlines()[1:-1]
    assert_no_secret(logs, seen, [*key_lines, *fake._tokens], [(GCP_USERNAME, oauth.secret(n)) for n in (1, 2)])


@pytest.fixture
async def metadata_server(monkeypatch: pytest.MonkeyPatch, servers: list[TestServer]) -> GceMetadata:
    metadata = GceMetadata(prefix="ya29.metadata-")
    host = urlsplit(await start(servers, metadata.app())).netloc
    monkeypatch.setenv("GCE_METADATA_HOST", host)
    # google-auth reads GCE_METADATA_HOST once, when it is first imported.
    monkeypatch.setattr(gce_metadata, "_GCE_METADATA_HOST", host)
    return metadata


async def test_gcr_metadata_server_token_is_renewed_when_rejected(
        metadata_server: GceMetadata, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, logs: pytest.LogCaptureFixture) -> None:
    fake.auth, fake.credentials = "bearer", (GCP_USERNAME, metadata_server.secret(1))
    add_image(fake)
    add_image(fake, OTHER, seed=1)
    mirror = await make_mirror({"gcr.io": fake.url}, credentials=GcrCredentials())
    seen = [await pull_manifest(client, mirror, NAME, "latest")]
    assert seen[0].status == 200
    assert metadata_server.requests and all(flavor == "Google" for _, flavor in metadata_server.requests)

    # The access token is revoked before it expires: the token service refuses it once, and
    # the mirror asks the metadata server again.
    fake.credentials = (GCP_USERNAME, metadata_server.secret(2))
    seen.append(await pull_manifest(client, mirror, OTHER, "latest"))
    assert seen[-1].status == 200
    assert [header for header, _ in fake.token_requests] == [
        basic(GCP_USERNAME, metadata_server.secret(1)), basic(GCP_USERNAME, metadata_server.secret(1)),
        basic(GCP_USERNAME, metadata_server.secret(2))]
    assert metadata_server.issued == [metadata_server.secret(1), metadata_server.secret(2)]
    assert_no_secret(logs, seen, fake._tokens, [(GCP_USERNAME, metadata_server.secret(n)) for n in (1, 2)])


@pytest.fixture
async def elsewhere(servers: list[TestServer]) -> tuple[str, list[str | None]]:
    """A token service on another port, recording the Authorization of whatever reaches it."""
    seen: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"token": "from-elsewhere"})
    app = web.Application()
    app.router.add_get("/token", record)
    return await start(servers, app), seen


async def test_token_realm_outside_the_allow_list_gets_no_credential(
        metadata_server: GceMetadata, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, elsewhere: tuple[str, list[str | None]],
        logs: pytest.LogCaptureFixture) -> None:
    realm, seen = elsewhere
    fake.auth, fake.credentials, fake.realm = "bearer", (GCP_USERNAME, metadata_server.secret(1)), f"{realm}/token"
    add_image(fake)
    mirror = await make_mirror({"gcr.io": fake.url}, credentials=GcrCredentials())
    refused = await pull_manifest(client, mirror, NAME, "latest")
    assert refused.status == 403 and b"untrusted token service" in refused.body
    assert seen == [], "nothing may reach a realm that is not allowed"
    assert metadata_server.issued == [], "no token is even fetched for it"

    # Put on the allow-list, the same realm gets the credential.
    allowed = await make_mirror({"gcr.io": fake.url}, credentials=GcrCredentials(),
                                token_realms=(urlsplit(fake.url).netloc, urlsplit(realm).netloc))
    await pull_manifest(client, allowed, NAME, "latest")
    assert seen == [basic(GCP_USERNAME, metadata_server.secret(1))]
    assert_no_secret(logs, [refused], [], [(GCP_USERNAME, metadata_server.secret(1))])


# Azure Container Registry


async def test_acr_service_principal(fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
                                     logs: pytest.LogCaptureFixture) -> None:
    fake.auth, fake.credentials = "bearer", ("app-1", "service-principal-secret")
    add_image(fake)
    mirror = await make_mirror({"mirror.azurecr.io": fake.url},
                               credentials=AcrCredentials("app-1", "service-principal-secret"))
    pulled = await pull_manifest(client, mirror, NAME, "latest")
    assert pulled.status == 200
    assert [header for header, _ in fake.token_requests] == [basic("app-1", "service-principal-secret")]
    assert_no_secret(logs, [pulled], fake._tokens, [("app-1", "service-principal-secret")])


async def test_acr_refresh_token_exchange(
        wall: Clock, fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        servers: list[TestServer], logs: pytest.LogCaptureFixture) -> None:
    azure = AzureAd(prefix="aad-access-token-", client_secret="aad-client-secret", lifetime=3 * 3600.0, clock=wall)
    authority = await start(servers, azure.app())
    # The registry itself answers /oauth2/exchange; it accepts the newest refresh token only.
    registry = fake.registry_app()
    azure.add_exchange(registry)
    fake.url = await start(servers, registry)
    fake.auth = "bearer"
    azure.exchanged = lambda token: setattr(fake, "credentials", (ACR_USERNAME, token))
    add_image(fake)
    add_image(fake, OTHER, seed=1)
    spec = AcrCredentials("app-1", "aad-client-secret", tenant_id="tenant-1", exchange=True, authority_host=authority)
    mirror = await make_mirror({"mirror.azurecr.io": fake.url}, credentials=spec)

    seen = [await pull_manifest(client, mirror, NAME, "latest")]
    assert seen[0].status == 200
    assert azure.grants == [{"grant_type": "client_credentials", "client_id": "app-1",
                             "client_secret": "aad-client-secret",
                             "scope": "https://containerregistry.azure.net/.default"}]
    assert azure.exchanges == [{"grant_type": "access_token", "service": urlsplit(fake.url).netloc,
                                "tenant": "tenant-1", "access_token": azure.secret(1)}]
    # The refresh token expires in a minute: the next token fetch renews it first.
    wall.now += azure.lifetime - 60
    seen.append(await pull_manifest(client, mirror, OTHER, "latest"))
    assert seen[-1].status == 200
    assert len(azure.refresh_tokens) == 2
    assert [header for header, _ in fake.token_requests] == [basic(ACR_USERNAME, t) for t in azure.refresh_tokens]
    assert_no_secret(logs, seen, ["aad-client-secret", *azure.issued, *azure.refresh_tokens, *fake._tokens])


# Docker config.json


def write_json(path: Path, document: object) -> None:
    """Replaced, not edited, as a mounted Kubernetes secret is."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document))
    temporary.replace(path)


async def test_docker_config_auths_are_read_again_when_the_file_changes(
        tmp_path: Path, fake: FakeUpstream, make_mirror: MirrorFactory, client: aiohttp.ClientSession,
        logs: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.json"
    hub_auth = base64.b64encode(b"hub-user:hub-password-1").decode()
    write_json(config, {"auths": {"https://index.docker.io/v1/": {"auth": hub_auth},
                                  "ghcr.io": {"auth": base64.b64encode(b"other:not-for-this-registry").decode()}}})
    fake.auth, fake.credentials = "bearer", ("hub-user", "hub-password-1")
    add_image(fake, "library/alpine")
    add_image(fake, "library/busybox", seed=1)
    mirror = await make_mirror({"docker.io": fake.url}, credentials=DockerConfigCredentials(config))
    seen = [await pull_manifest(client, mirror, "alpine", "latest")]
    assert seen[0].status == 200

    write_json(config, {"auths": {"docker.io": {"username": "hub-user", "password": "hub-password-2"}}})
    fake.credentials = ("hub-user", "hub-password-2")
    seen.append(await pull_manifest(client, mirror, "busybox", "latest"))
    assert seen[-1].status == 200
    assert [header for header, _ in fake.token_requests] == [
        basic("hub-user", "hub-password-1"), basic("hub-user", "hub-password-2")]
    assert_no_secret(logs, seen, ["not-for-this-registry", *fake._tokens],
                     [("hub-user", "hub-password-1"), ("hub-user", "hub-password-2")])


@dataclass
class Helper:
    """`docker-credential-test` on PATH: it logs the server it was asked about and answers from
    answer.json (`username`/`secret`, or `missing`, or `hang`)."""

    directory: Path

    def answer(self, **answer: object) -> None:
        write_json(self.directory / "answer.json", answer)

    @property
    def calls(self) -> list[str]:
        path = self.directory / "calls"
        return path.read_text().splitlines() if path.exists() else []


HELPER = """#!{python}
import json, os, sys, time
state = {state!r}
with open(os.path.join(state, "pid"), "w") as f:
    f.write(str(os.getpid()))
server = sys.stdin.read()
with open(os.path.join(state, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + " " + server + "\\n")
answer = json.load(open(os.path.join(state, "answer.json")))
if answer.get("hang"):
    time.sleep(3600)
if answer.get("missing"):
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({{"ServerURL": server, "Username": answer["username"], "Secret": answer["secret"]}}))
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Helper:
    directory = tmp_path / "helper"
    directory.mkdir()
    program = directory / "docker-credential-test"
    program.write_text(HELPER.format(python=sys.executable, state=str(directory)))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
    return Helper(directory)


async def test_docker_credential_helper_per_host(
        tmp_path: Path, helper: Helper, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, logs: pytest.LogCaptureFixture) -> None:
    host = urlsplit(fake.url).netloc
    config = tmp_path / "config.json"
    write_json(config, {"credHelpers": {host: "test"}, "auths": {host: {"auth": "aWdub3JlZDppZ25vcmVk"}}})
    helper.answer(username="helper-user", secret="helper-secret-1")
    fake.auth, fake.credentials = "basic", ("helper-user", "helper-secret-1")
    for tag in ("a", "b", "c"):
        add_image(fake, tag=tag, seed=ord(tag))
    mirror = await make_mirror({host: fake.url}, credentials=DockerConfigCredentials(config))

    seen = [await pull_manifest(client, mirror, NAME, tag) for tag in ("a", "b")]
    assert [r.status for r in seen] == [200, 200]
    assert helper.calls == [f"get {host}"], "asked once, with the registry host on stdin"

    # The upstream refuses the helper's answer: the helper is asked again, once.
    helper.answer(username="helper-user", secret="helper-secret-2")
    fake.credentials = ("helper-user", "helper-secret-2")
    seen.append(await pull_manifest(client, mirror, NAME, "c"))
    assert seen[-1].status == 200
    assert helper.calls == [f"get {host}"] * 2
    assert_no_secret(logs, seen, [], [("helper-user", "helper-secret-1"), ("helper-user", "helper-secret-2")])


async def test_docker_creds_store_for_docker_hub(
        tmp_path: Path, helper: Helper, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, logs: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.json"
    write_json(config, {"credsStore": "test", "auths": {"https://index.docker.io/v1/": {}}})
    helper.answer(username="hub-robot", secret="store-secret")
    fake.auth, fake.credentials = "bearer", ("hub-robot", "store-secret")
    add_image(fake, "library/alpine")
    mirror = await make_mirror({"docker.io": fake.url}, credentials=DockerConfigCredentials(config))
    pulled = await pull_manifest(client, mirror, "alpine", "latest")
    assert pulled.status == 200
    assert helper.calls == [f"get {DOCKER_HUB_SERVER}"]

    # A helper that knows no credentials for the server: the pull is anonymous.
    helper.answer(missing=True)
    anonymous = await make_mirror({"docker.io": fake.url}, credentials=DockerConfigCredentials(config))
    refused = await pull_manifest(client, anonymous, "alpine", "latest")
    assert refused.status == 403
    assert fake.token_requests[-1][0] is None
    assert_no_secret(logs, [pulled, refused], [*fake._tokens], [("hub-robot", "store-secret")])


async def test_credential_helper_that_hangs_is_killed(
        tmp_path: Path, helper: Helper, fake: FakeUpstream, make_mirror: MirrorFactory,
        client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 1.0)
    config = tmp_path / "config.json"
    write_json(config, {"credsStore": "test"})
    helper.answer(hang=True)
    fake.auth = "bearer"
    add_image(fake)
    mirror = await make_mirror({"docker.io": fake.url}, credentials=DockerConfigCredentials(config))
    failed = await pull_manifest(client, mirror, NAME, "latest")
    assert failed.status == 503 and b"docker-credential-test did not answer within 1 s" in failed.body
    pid = int((helper.directory / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# Configuration and the allow-list rule


def test_every_credentials_kind_loads(tmp_path: Path) -> None:
    docker_config, key_file, secret = tmp_path / "config.json", tmp_path / "key.json", tmp_path / "secret"
    docker_config.write_text("{}")
    key_file.write_text('{"type": "service_account"}')
    for private in (docker_config, key_file):  # secrets: not for every user to read
        private.chmod(0o600)
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    path = tmp_path / "mirror.yaml"
    path.write_text(f"""
default_upstream: a.example
upstreams:
  - {{name: a.example, url: "https://a.example", credentials: {{docker_config: {docker_config}}}}}
  - name: 123456789012.dkr.ecr.eu-west-1.amazonaws.com
    url: https://123456789012.dkr.ecr.eu-west-1.amazonaws.com
    credentials: {{ecr: {{region: eu-west-1, registry_id: 123456789012}}}}
  - {{name: gcr.io, url: "https://gcr.io", credentials: {{gcr: {{key_file: {key_file}}}}}}}
  - {{name: eu.gcr.io, url: "https://eu.gcr.io", credentials: {{gcr: {{metadata: true}}}}}}
  - {{name: a.azurecr.io, url: "https://a.azurecr.io", credentials: {{acr: {{client_id: c, client_secret_env: S}}}}}}
  - name: b.azurecr.io
    url: https://b.azurecr.io
    token_realms: [auth.example.com, "*.example.net:8443"]
    credentials: {{acr: {{tenant_id: t, client_id: c, client_secret_file: {secret}, exchange: true}}}}
""")
    config = load(path, environ={"S": "from-env"})
    assert [u.credentials for u in config.upstreams] == [
        DockerConfigCredentials(docker_config), EcrCredentials("eu-west-1", "123456789012"),
        GcrCredentials(key_file), GcrCredentials(), AcrCredentials("c", "from-env"),
        AcrCredentials("c", "from-file", "t", True, "https://login.microsoftonline.com")]
    assert config.upstreams[-1].token_realms == ("auth.example.com", "*.example.net:8443")
    assert "from-env" not in repr(config) and "from-file" not in repr(config)


@pytest.mark.parametrize(("credentials", "message"), [
    ("{ecr: {region: us-east-1}, username: u, password: p}", "upstreams[0].credentials: give exactly one of"),
    ("{}", "upstreams[0].credentials: give exactly one of"),
    ("{ecr: {registry_id: '123456789012'}}", "upstreams[0].credentials.ecr.region: required"),
    ("{ecr: {region: us-east-1, registry_id: 12}}", "upstreams[0].credentials.ecr.registry_id: expected a 12-digit"),
    ("{ecr: {region: us-east-1, endpoint: x}}", "upstreams[0].credentials.ecr.endpoint: unknown key"),
    ("{ecr: {region: us-east-1, endpoint_url: ftp://x}}", "upstreams[0].credentials.ecr.endpoint_url: expected an"),
    ("{gcr: {}}", "upstreams[0].credentials.gcr: give either key_file or metadata: true"),
    ("{gcr: {key_file: /nonexistent/key.json}}", "upstreams[0].credentials.gcr.key_file: cannot read"),
    ("{acr: {client_id: c}}", "upstreams[0].credentials.acr: give client_id and a client_secret"),
    ("{acr: {client_id: c, client_secret: s, exchange: true}}", "upstreams[0].credentials.acr.tenant_id: required"),
    ("{acr: {client_id: c, client_secret: s, tenant_id: t}}", "upstreams[0].credentials.acr.tenant_id: only used"),
    ("{acr: {client_id: c, client_secret: s, client_secret_env: S}}",
     "upstreams[0].credentials.acr.client_secret: give only one of"),
    ("{docker_config: /nonexistent/config.json}", "upstreams[0].credentials.docker_config: cannot read"),
])
def test_bad_credentials_name_the_key_path(tmp_path: Path, credentials: str, message: str) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(f"upstreams:\n  - {{name: docker.io, url: 'https://x.example', credentials: {credentials}}}\n")
    with pytest.raises(ConfigError) as caught:
        load(path, environ={"S": "s"})
    assert str(caught.value).startswith(message), caught.value


def test_bad_token_realm_names_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text("upstreams:\n  - {name: docker.io, url: 'https://x.example', token_realms: [ok.example, 'A B']}\n")
    with pytest.raises(ConfigError, match=r"^upstreams\[0\]\.token_realms\[1\]: 'A B' is not a host"):
        load(path, environ={})


@pytest.mark.parametrize(("upstream", "realm", "allowed"), [
    ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
    ("https://registry-1.docker.io", "https://docker.io/token", True),
    ("https://registry-1.docker.io", "https://registry-1.docker.io/token", True),
    ("https://registry-1.docker.io", "http://auth.docker.io/token", False),
    ("https://registry-1.docker.io", "https://auth.docker.io:8443/token", False),
    ("https://registry-1.docker.io", "https://docker.io.evil.example/token", False),
    ("https://ghcr.io", "https://ghcr.io/token", True),
    ("https://ghcr.io", "https://evil.io/token", False),
    ("https://registry.example.co.uk", "https://auth.example.co.uk/token", True),
    ("https://registry.example.co.uk", "https://other.co.uk/token", False),
    ("https://user.github.io", "https://other.github.io/token", False),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/token", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", False),
    ("http://127.0.0.1:5000", "https://127.0.0.1:5000/token", True),
    ("http://localhost:5000", "http://other.localhost:5000/token", False),
    ("http://[::1]:5000", "http://[::1]:5000/token", True),
])
def test_default_token_realms(upstream: str, realm: str, allowed: bool) -> None:
    assert TokenRealms(upstream, None).allows(URL(realm)) is allowed


def test_explicit_token_realms_replace_the_default() -> None:
    realms = TokenRealms("https://registry.example.com", ("auth.example.net", "*.login.example.org:8443"))
    assert realms.allows(URL("https://auth.example.net/token"))
    assert realms.allows(URL("https://eu.login.example.org:8443/token"))
    assert not realms.allows(URL("https://login.example.org:8443/token"))
    assert not realms.allows(URL("https://eu.login.example.org/token"))
    assert not realms.allows(URL("https://registry.example.com/token"))
