"""Client authentication and access rules: htpasswd accounts, the mirror's own token service,
rules by user, group and repository, and the clients that use them (skopeo --creds, docker login,
ctr --user). A refusal happens before the cache is consulted: it never reaches the upstream or
the cache, and it looks the same whether or not the content is cached."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from mirror.auth import Htpasswd, Identity, Tokens, parse_basic
from mirror.config import AccessRule, AuthConfig, load
from mirror.errors import ConfigError
from mirror.proxy import Proxy
from tests.conftest import Captured, Counting, CountingFactory, Mirror, MirrorFactory, Registry, require_binary
from tests.support.clients import Containerd, DockerDaemon, Sandbox
from tests.support.pulls import exchange
from tests.support.snippets import snippet

ACCEPT = ", ".join(["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
RULES = (
    AccessRule(("group:admin",), True, ("*",)),
    AccessRule(("user:carol",), False, ("docker.io/library/busybox",)),
    AccessRule(("group:ci",), True, ("quay.io/team/*",)),
    AccessRule(("anonymous", "authenticated"), True, ("docker.io/library/*",)),
)
GROUPS = (("ci", ("alice",)), ("admin", ("bob",)))
# (image label, path the client asks for)
REPOSITORIES = {"alpine": ("single", "/v2/library/alpine"), "busybox": ("docker", "/v2/library/busybox"),
                "team": ("team", "/v2/quay.io/team/app")}
# Who may pull what, as the rules above say: 200 allowed, 401 log in first, 403 denied.
EXPECTED = {
    None: {"alpine": 200, "busybox": 200, "team": 401},
    "alice": {"alpine": 200, "busybox": 200, "team": 200},
    "bob": {"alpine": 200, "busybox": 200, "team": 200},
    "carol": {"alpine": 200, "busybox": 403, "team": 403},
    "mallory": {"alpine": 401, "busybox": 401, "team": 401},
}


def write_htpasswd(path: Path) -> Path:
    # Cost 4: the check is bcrypt's either way, just quicker for tests. `$2y$` as htpasswd -B writes.
    lines = [f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode().replace('$2b$', '$2y$', 1)}"
             for user, pw in PASSWORDS.items()]
    path.write_text("# made by the test\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


basic = aiohttp.encode_basic_auth


class ProxyCalls:
    """Every call the handlers make into the cache and upstream logic."""

    def __init__(self, proxy: Proxy) -> None:
        self.calls: list[str] = []
        for name in ("manifest", "blob", "blob_head", "tags"):
            setattr(proxy, name, self._recording(name, getattr(proxy, name)))

    def _recording(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)
        return call


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    return write_htpasswd(tmp_path / "htpasswd")


@pytest.fixture
async def guarded(htpasswd: Path, registry: Registry, make_counting: CountingFactory,
                  make_mirror: MirrorFactory) -> tuple[Mirror, Counting]:
    upstream = await make_counting(registry.url)
    mirror = await make_mirror({"docker.io": upstream.url, "quay.io": upstream.url},
                               auth=AuthConfig(htpasswd=htpasswd, groups=GROUPS, rules=RULES))
    return mirror, upstream


async def credential(client: aiohttp.ClientSession, mirror: Mirror, user: str | None) -> dict[str, str]:
    """The Authorization a client of `user` sends: a token from the mirror's token service for the
    known accounts, a wrong password (sent directly as Basic) for mallory."""
    if user is None:
        return {}
    if user not in PASSWORDS:
        return {"Authorization": basic(user, "guess")}
    async with client.get(f"{mirror.url}/token?service=mirror&scope=repository:x:pull",
                          headers={"Authorization": basic(user, PASSWORDS[user])}) as response:
        assert response.status == 200
        body = await response.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    return {"Authorization": f"Bearer {body['token']}"}


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
async def test_access_matrix(cached: bool, guarded: tuple[Mirror, Counting], registry: Registry,
                             client: aiohttp.ClientSession, captured: Captured) -> None:
    mirror, upstream = guarded
    if cached:  # bob, an admin, pulls everything first
        headers = await credential(client, mirror, "bob")
        for label, path in REPOSITORIES.values():
            image = registry.images[label]
            async with client.get(f"{mirror.url}{path}/manifests/{image.tag}",
                                  headers={**headers, "Accept": ACCEPT}) as response:
                assert response.status == 200
            for digest in image.blobs:
                async with client.get(f"{mirror.url}{path}/blobs/{digest}", headers=headers) as response:
                    assert response.status == 200
                    await response.read()
        await mirror.services.background.join()
    calls = ProxyCalls(mirror.services.proxy)
    secrets: set[str] = set(PASSWORDS.values())

    for user, expected in EXPECTED.items():
        headers = await credential(client, mirror, user)
        secrets |= {h.partition(" ")[2] for h in headers.values()}
        for repository, (label, path) in REPOSITORIES.items():
            image = registry.images[label]
            digest = next(iter(image.blobs))
            for url in (f"{path}/manifests/{image.tag}", f"{path}/blobs/{digest}", f"{path}/tags/list"):
                upstream.reset()
                before = len(calls.calls)
                async with client.get(f"{mirror.url}{url}", headers={**headers, "Accept": ACCEPT}) as response:
                    body = await response.read()
                    status = response.status
                    challenge = response.headers.get("WWW-Authenticate")
                assert status == expected[repository], (user, url, status)
                assert not [secret for secret in secrets if secret.encode() in body], "a secret in a response"
                if status != 200:
                    assert json.loads(body)["errors"][0]["code"] == ("UNAUTHORIZED" if status == 401 else "DENIED")
                    assert len(calls.calls) == before, f"a refused request reached the cache: {calls.calls[before:]}"
                    assert upstream.count() == 0, "a refused request reached the upstream"
                if status == 401:
                    assert challenge == (f'Bearer realm="{mirror.url}/token",service="mirror",'
                                         f'scope="repository:{path.removeprefix("/v2/").removeprefix("quay.io/")}'
                                         f':pull"')
    lines = list(captured.lines())
    assert not [line for line in lines for secret in secrets if secret in line]
    users = {entry["user"] for entry in captured.access()}
    assert {"alice", "bob", "carol", None} <= users and "mallory" not in users


async def test_api_base_sends_clients_to_log_in(guarded: tuple[Mirror, Counting],
                                                client: aiohttp.ClientSession) -> None:
    mirror, _ = guarded
    async with client.get(f"{mirror.url}/v2/") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == f'Bearer realm="{mirror.url}/token",service="mirror"'
    async with client.get(f"{mirror.url}/v2/", headers=await credential(client, mirror, "carol")) as response:
        assert response.status == 200
    async with client.get(f"{mirror.url}/v2/", headers={"Authorization": basic("carol", "wrong")}) as response:
        assert response.status == 401


async def test_token_service(guarded: tuple[Mirror, Counting], client: aiohttp.ClientSession) -> None:
    mirror, _ = guarded
    form = {"grant_type": "password", "username": "alice", "password": PASSWORDS["alice"], "service": "mirror",
            "scope": "repository:quay.io/team/app:pull"}
    async with client.post(f"{mirror.url}/token", data=form) as response:
        assert response.status == 200
        token = (await response.json())["access_token"]
        assert response.headers["Cache-Control"] == "no-store"
    async with client.get(f"{mirror.url}/v2/quay.io/team/app/tags/list",
                          headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
    for data, headers, status in (
            ({**form, "password": "wrong"}, {}, 401),
            ({**form, "grant_type": "refresh_token"}, {}, 400),
            (None, {"Authorization": basic("alice", "wrong")}, 401),
            (None, {"Authorization": "Basic !!notbase64"}, 401)):
        method = client.post if data else client.get
        async with method(f"{mirror.url}/token", data=data, headers=headers) as response:
            assert response.status == status
            assert "errors" in await response.json()
    # An anonymous token is only as good as anonymous access.
    async with client.get(f"{mirror.url}/token") as response:
        anonymous = (await response.json())["token"]
    async with client.get(f"{mirror.url}/v2/quay.io/team/app/tags/list",
                          headers={"Authorization": f"Bearer {anonymous}"}) as response:
        assert response.status == 401
    # A token signed with another key, or tampered with, is refused.
    forged = Tokens(300, None).issue(Identity("bob", frozenset({"admin"})), "mirror")
    for bad in (forged, token[:-2] + ("AA" if not token.endswith("AA") else "BB")):
        async with client.get(f"{mirror.url}/v2/quay.io/team/app/tags/list",
                              headers={"Authorization": f"Bearer {bad}"}) as response:
            assert response.status == 401


async def test_tokens_expire(htpasswd: Path, registry: Registry, make_mirror: MirrorFactory,
                             client: aiohttp.ClientSession) -> None:
    now = [1000.0]
    mirror = await make_mirror({"docker.io": registry.url}, clock=lambda: now[0],
                               auth=AuthConfig(htpasswd=htpasswd, token_lifetime=60))
    alice = {"Authorization": basic("alice", PASSWORDS["alice"])}
    async with client.get(f"{mirror.url}/token", headers=alice) as response:
        body = await response.json()
        assert body["expires_in"] == 60
    headers = {"Authorization": f"Bearer {body['token']}"}
    url = f"{mirror.url}/v2/library/alpine/tags/list"
    async with client.get(url, headers=headers) as response:
        assert response.status == 200
    now[0] += 61
    async with client.get(url, headers=headers) as response:
        assert response.status == 401


async def test_rules_without_accounts_restrict_anonymous_pulls(registry: Registry, make_mirror: MirrorFactory,
                                                               client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": registry.url}, auth=AuthConfig(
        rules=(AccessRule(("anonymous",), True, ("docker.io/library/*",)),)))
    async with client.get(f"{mirror.url}/v2/library/alpine/tags/list") as response:
        assert response.status == 200
    async with client.get(f"{mirror.url}/v2/team/app/tags/list") as response:
        assert response.status == 403, "no accounts to log in with: denied, not challenged"
    async with client.get(f"{mirror.url}/v2/") as response:
        assert response.status == 200


async def test_htpasswd_without_rules_lets_every_account_pull_everything(
        htpasswd: Path, registry: Registry, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": registry.url}, auth=AuthConfig(htpasswd=htpasswd))
    url = f"{mirror.url}/v2/team/app/tags/list"
    async with client.get(url) as response:
        assert response.status == 401
    async with client.get(url, headers={"Authorization": basic("carol", PASSWORDS["carol"])}) as response:
        assert response.status == 200


# Real clients.


async def test_skopeo_with_creds(skopeo: str, guarded: tuple[Mirror, Counting], registry: Registry,
                                 tmp_path: Path) -> None:
    mirror, _ = guarded
    image = registry.images["team"]

    async def copy(*creds: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            skopeo, "copy", "--src-tls-verify=false", *creds, f"docker://{mirror.host}/quay.io/team/app:v1",
            f"dir:{tmp_path / 'copy'}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await process.communicate()
        return process.returncode or 0, err.decode()

    status, err = await copy()
    assert status != 0 and "unauthorized" in err, err
    status, err = await copy("--src-creds", f"carol:{PASSWORDS['carol']}")
    assert status != 0 and "denied" in err, err
    status, err = await copy("--src-creds", f"alice:{PASSWORDS['alice']}")
    assert status == 0, err
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == image.manifest


async def test_docker_login_and_pull(sandbox: Sandbox, guarded: tuple[Mirror, Counting], registry: Registry,
                                     tmp_path: Path) -> None:
    require_binary("dockerd")
    mirror, _ = guarded
    image = registry.images["team"]
    async with DockerDaemon(sandbox, tmp_path / "docker", "{}") as daemon:
        refused = await daemon.docker("pull", f"{mirror.host}/quay.io/team/app:v1", check=False)
        assert refused.returncode != 0
        login = await daemon.sandbox.run(
            "sh", "-c",
            f'printf %s "$PW" | docker --host {daemon.socket} login -u alice --password-stdin {mirror.host}',
            env={"PW": PASSWORDS["alice"], "DOCKER_CONFIG": str(tmp_path / "docker" / "client")})
        assert "Login Succeeded" in login.stdout
        await daemon.docker("pull", f"{mirror.host}/quay.io/team/app:v1")
        info = await daemon.inspect(f"{mirror.host}/quay.io/team/app:v1")
    assert info["Id"] == json.loads(image.manifest)["config"]["digest"]


async def test_docker_daemon_presents_its_docker_hub_login_to_a_mirror(
        sandbox: Sandbox, htpasswd: Path, registry: Registry, make_mirror: MirrorFactory, tmp_path: Path) -> None:
    """What the README says of registry-mirrors and accounts: the daemon has none for the mirror,
    and sends the one stored for Docker Hub."""
    require_binary("dockerd")
    mirror = await make_mirror({"docker.io": registry.url}, auth=AuthConfig(htpasswd=htpasswd))
    async with DockerDaemon(sandbox, tmp_path / "docker", snippet("docker/daemon.json", mirror.host)) as daemon:
        refused = await daemon.docker("pull", "alpine:3.19", check=False)
        assert refused.returncode != 0, "anonymous, and the mirror wants an account"
        hub_login = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
        (tmp_path / "docker" / "client" / "config.json").write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub_login}}}))
        await daemon.docker("pull", "alpine:3.19")


async def test_ctr_with_user(sandbox: Sandbox, guarded: tuple[Mirror, Counting], registry: Registry,
                             tmp_path: Path) -> None:
    require_binary("containerd")
    mirror, _ = guarded
    hosts = tmp_path / "certs.d" / "quay.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(snippet("containerd/quay.io/hosts.toml", mirror.host))
    async with Containerd(sandbox, tmp_path / "containerd") as containerd:
        refused = await containerd.pull("quay.io/team/app:v1", tmp_path / "certs.d", check=False)
        assert refused.returncode != 0
        await containerd.ctr("images", "pull", "--hosts-dir", str(tmp_path / "certs.d"), "--snapshotter", "native",
                             "--user", f"alice:{PASSWORDS['alice']}", "quay.io/team/app:v1")
        assert registry.images["team"].digest in (await containerd.ctr("images", "ls")).stdout
    # The README's hosts.toml with an Authorization header: alice's account, for every pull.
    snippet_text = snippet("containerd/credentials/hosts.toml", mirror.host)
    assert basic("alice", PASSWORDS["alice"]) in snippet_text
    (hosts / "hosts.toml").write_text(snippet_text)
    async with Containerd(sandbox, tmp_path / "containerd-header") as containerd:
        await containerd.pull("quay.io/team/app:v1", tmp_path / "certs.d")
        assert registry.images["team"].digest in (await containerd.ctr("images", "ls")).stdout


def test_world_readable_secrets_are_refused_as_root_and_warned_about_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    key = tmp_path / "token.key"
    key.write_text("k" * 40)
    config = tmp_path / "config.yaml"
    config.write_text(f"auth: {{htpasswd: {htpasswd}, token: {{key_file: {key}}}}}\n")
    for path, what in ((htpasswd, "auth.htpasswd"), (key, "auth.token.key_file")):
        path.chmod(0o644)
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        with pytest.raises(ConfigError, match=f"{what}: .* is readable by every user; chmod o-r"):
            load(config, environ={})
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        with caplog.at_level(logging.WARNING):
            load(config, environ={})
        assert f"{what}: {path} is readable by every user" in caplog.text
        path.chmod(0o640)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert load(config, environ={}).auth.htpasswd == htpasswd



def test_basic_credentials_that_are_not_text_are_no_credentials() -> None:
    assert parse_basic("Basic \u00e9") is None
    assert parse_basic("Basic " + base64.b64encode(b"\xff:\xfe").decode()) is None
    assert parse_basic("Basic " + base64.b64encode(b"no-colon").decode()) is None
    assert parse_basic(basic("alice", "pw:with:colons")) == ("alice", "pw:with:colons")


@pytest.mark.parametrize("authorization", [
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), "Basic " + "A" * 4000,
    "Bearer not.a.token", "Bearer ", "Digest username=alice", basic("alice", "x" * 1000),
])
async def test_odd_credentials_get_401_not_500(authorization: str, guarded: tuple[Mirror, Counting],
                                               client: aiohttp.ClientSession) -> None:
    mirror, upstream = guarded
    for path in ("/v2/", "/v2/quay.io/team/app/tags/list", "/token"):
        async with client.get(f"{mirror.url}{path}", headers={"Authorization": authorization}) as response:
            assert response.status == 401, (path, response.status)
            assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    assert upstream.count() == 0


async def test_passwords_count_their_first_72_bytes_as_htpasswd_does(
        tmp_path: Path, registry: Registry, make_mirror: MirrorFactory, client: aiohttp.ClientSession) -> None:
    long_password = "p" * 72
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"long:{bcrypt.hashpw(long_password.encode(), bcrypt.gensalt(4)).decode()}\n")
    mirror = await make_mirror({"docker.io": registry.url}, auth=AuthConfig(htpasswd=htpasswd))
    for password, status in ((long_password, 200), (long_password + "and more", 200), ("p" * 71, 401)):
        async with client.get(f"{mirror.url}/v2/", headers={"Authorization": basic("long", password)}) as response:
            assert response.status == status


@pytest.mark.parametrize(("content_type", "body", "status"), [
    ("multipart/form-data", b"grant_type=password", 400),
    ("application/x-www-form-urlencoded", b"grant_type=password&username=\xff\xfe", 400),
    ("application/x-www-form-urlencoded", b"grant_type=password&password=" + b"x" * 100_000, 400),
    ("application/json", b'{"grant_type": "password"}', 400),
    ("application/x-www-form-urlencoded; charset=nope", b"grant_type=password&username=a&password=b", 401),
])
async def test_malformed_token_requests_get_a_4xx(content_type: str, body: bytes, status: int,
                                                  guarded: tuple[Mirror, Counting],
                                                  client: aiohttp.ClientSession) -> None:
    mirror, _ = guarded
    async with client.post(f"{mirror.url}/token", data=body, headers={"Content-Type": content_type}) as response:
        assert response.status == status
        assert (await response.json())["errors"][0]["code"] == ("UNSUPPORTED" if status == 400 else "UNAUTHORIZED")


async def test_wrong_password_floods_are_refused_without_bcrypt(
        guarded: tuple[Mirror, Counting], client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror, _ = guarded
    checks: list[bytes] = []
    checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)

    async def attempt(user: str, password: str) -> int:
        async with client.get(f"{mirror.url}/v2/", headers={"Authorization": basic(user, password)}) as response:
            return response.status

    # The same wrong password again costs no check; an unknown user costs one, like a known user.
    assert [await attempt("alice", "wrong") for _ in range(3)] == [401] * 3
    assert await attempt("nobody", "wrong") == 401
    assert len(checks) == 2
    # Ten failures for one account from one address, then refusals that cost nothing.
    statuses = [await attempt("alice", f"guess-{i}") for i in range(20)]
    assert statuses == [401] * 9 + [429] * 11
    assert len(checks) == 11
    # Other accounts from the same address are not locked out.
    assert await attempt("bob", PASSWORDS["bob"]) == 200
    async with client.get(f"{mirror.url}/v2/", headers={"Authorization": basic("alice", "guess-99")}) as response:
        assert (response.status, response.headers["Retry-After"]) == (429, "60")


async def test_malformed_requests_leave_no_credential_in_the_log(
        guarded: tuple[Mirror, Counting], captured: Captured) -> None:
    mirror, _ = guarded
    secret = base64.b64encode(b"alice:alice-pw-1").decode()
    for head in (f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {secret}\x01\r\n\r\n",
                 f"GET /v2/ HTTP/1.1\nHost: x\nAuthorization: Basic {secret}\n\n"):
        status_line = (await exchange(mirror.host, head.encode())).split(b"\r\n", 1)[0]
        assert status_line in (b"HTTP/1.0 400 Bad Request", b"HTTP/1.1 400 Bad Request")
    lines = list(captured.lines())
    assert any("refused a malformed request" in line for line in lines)
    assert not [line for line in lines if secret in line]


async def test_a_password_check_that_races_a_reload_is_not_remembered(tmp_path: Path) -> None:
    path = write_htpasswd(tmp_path / "htpasswd")
    accounts = Htpasswd(path)
    try:
        checking = asyncio.create_task(accounts.verify("alice", PASSWORDS["alice"], "10.0.0.1"))
        await asyncio.sleep(0)  # the check is under way against the old password
        path.write_text(f"alice:{bcrypt.hashpw(b'rotated', bcrypt.gensalt(4)).decode()}\n")
        accounts.load()
        assert await checking, "the check answers for the file it started with"
        assert not await accounts.verify("alice", PASSWORDS["alice"], "10.0.0.1"), "the old password is gone"
        assert await accounts.verify("alice", "rotated", "10.0.0.1")
    finally:
        accounts.close()
