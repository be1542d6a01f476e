"""HTTPS for the API: served from a certificate and key, re-read on SIGHUP and when the files
change, and client certificates (mTLS) as a way to authenticate. Certificates come from trustme,
made fresh by each test."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.conftest import Registry
from tests.support.served import Served

TIMEOUT = 30.0


def install(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    """A server certificate for `names` signed by `ca`, as cert.pem and key.pem (owner-only)."""
    server = ca.issue_cert(*names)
    cert, key = directory / "cert.pem", directory / "key.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def client_context(ca: trustme.CA, certificate: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if certificate is not None:
        certificate.configure_cert(context)
    return context


async def get(url: str, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, asyncio.timeout(TIMEOUT), \
            session.get(url, ssl=context if context is not None else False) as response:
        return response.status, await response.read()


async def served_certificate(host: str) -> bytes:
    """The DER certificate a new connection is shown."""
    address, _, port = host.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(address, int(port), ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()


def leaf_der(cert: Path) -> bytes:
    """The first certificate of a PEM chain file, as DER."""
    first = cert.read_text().split("-----END CERTIFICATE-----")[0]
    return ssl.PEM_cert_to_DER_cert(first + "-----END CERTIFICATE-----\n")


async def test_https_with_reload_on_sighup_and_on_file_change(registry: Registry, tmp_path: Path) -> None:
    first_ca, second_ca, third_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key = install(first_ca, tmp_path, "127.0.0.1")
    async with await Served.start("--cache-dir", tmp_path / "cache", "--upstream", f"docker.io={registry.url}",
                                  "--tls-cert", cert, "--tls-key", key) as served:
        assert (await served.wait_for("listening on")).strip().endswith(f"listening on https://{served.host}")
        url = f"https://{served.host}/v2/library/alpine/tags/list"
        status, body = await get(url, client_context(first_ca))
        assert status == 200 and json.loads(body)["name"] == "library/alpine"
        with pytest.raises(aiohttp.ClientError):
            await get(f"http://{served.host}/v2/", None)

        install(second_ca, tmp_path, "127.0.0.1")
        served.process.send_signal(1)  # SIGHUP
        await served.wait_for("reloaded the TLS certificate")
        assert await served_certificate(served.host) == leaf_der(cert)
        assert (await get(url, client_context(second_ca)))[0] == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(url, client_context(first_ca))

        # A renewal caught half way: the new certificate is there, its key not yet.
        trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
        served.process.send_signal(1)
        await served.wait_for("kept the previous TLS certificate")
        assert (await get(url, client_context(second_ca)))[0] == 200, "a pair that does not load changes nothing"

        served.log.clear()
        install(third_ca, tmp_path, "127.0.0.1")  # no signal: the watcher sees the change
        await served.wait_for("reloaded the TLS certificate")
        assert (await get(url, client_context(third_ca)))[0] == 200


@pytest.mark.parametrize("client_certs", ["optional", "required"])
async def test_client_certificates_identify_users(client_certs: str, registry: Registry, tmp_path: Path) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = install(server_ca, tmp_path, "127.0.0.1")
    client_ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "tls": {"cert": str(cert), "key": str(key), "client_ca": str(tmp_path / "clients.pem"),
                "client_certs": client_certs},
        "auth": {"access": [{"who": ["user:alice"], "allow": ["docker.io/team/*"]},
                            {"who": ["anonymous", "authenticated"], "allow": ["docker.io/library/*"]}]},
    }))
    alice = client_ca.issue_cert("alice@example.com", common_name="alice")
    bob = client_ca.issue_cert("bob@example.com", common_name="bob")
    stranger = trustme.CA().issue_cert("alice@example.com", common_name="alice")
    async with await Served.start("--config", config, "--cache-dir", tmp_path / "cache",
                                  "--upstream", f"docker.io={registry.url}") as served:
        team = f"https://{served.host}/v2/team/app/tags/list"
        library = f"https://{served.host}/v2/library/alpine/tags/list"
        assert (await get(team, client_context(server_ca, alice)))[0] == 200
        assert (await get(team, client_context(server_ca, bob)))[0] == 403
        assert (await get(library, client_context(server_ca, bob)))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await get(team, client_context(server_ca, stranger))  # a certificate from another CA
        if client_certs == "optional":
            assert (await get(team, client_context(server_ca)))[0] == 403
            assert (await get(library, client_context(server_ca)))[0] == 200
        else:
            with pytest.raises(aiohttp.ClientError):
                await get(library, client_context(server_ca))


async def test_skopeo_over_https(skopeo: str, registry: Registry, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = install(ca, tmp_path, "127.0.0.1")
    certs = tmp_path / "certs.d"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    image = registry.images["single"]
    async with await Served.start("--cache-dir", tmp_path / "cache", "--upstream", f"docker.io={registry.url}",
                                  "--tls-cert", cert, "--tls-key", key) as served:
        process = await asyncio.create_subprocess_exec(
            skopeo, "copy", "--src-cert-dir", str(certs), f"docker://{served.host}/library/alpine:3.19",
            f"dir:{tmp_path / 'copy'}", stderr=asyncio.subprocess.PIPE)
        _, err = await process.communicate()
        assert process.returncode == 0, err.decode()
    assert (tmp_path / "copy" / "manifest.json").read_bytes() == image.manifest
