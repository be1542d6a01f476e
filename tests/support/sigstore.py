"""Sigstore (cosign) signatures made here, in the layout real clients read and write: keys in
cosign's files, each signature an `application/vnd.dev.cosign.simplesigning.v1+json` layer of
the OCI manifest tagged `sha256-<hex>.sig` beside the image.

The signing is done here rather than with `skopeo copy --sign-by-sigstore-private-key`:
Debian's skopeo and podman (bookworm's containers/image 5.23) are built with sigstore stubbed
out ("Debian-local change: sigstore disabled"), for signing and for checking alike. The bytes
are the ones containers/image writes (its `UntrustedSigstorePayload` and
`putSignaturesToSigstoreAttachments`), so a client that can check them reads them as its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import nacl.secret
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.images import OCI_CONFIG, OCI_MANIFEST, digest_of, push_blob, push_manifest

SIGNATURE_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"

# cosign's parameters for go-securesystemslib's `encrypted` format, which containers/image reads.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 32768, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_PRIVATE_PEM_TYPE = "ENCRYPTED COSIGN PRIVATE KEY"
# Never route loopback test traffic through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ACCEPT = f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json, " \
          "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json"


class KeyPair(NamedTuple):
    """cosign's key files: what `skopeo copy --sign-by-sigstore-private-key PRIVATE
    --sign-passphrase-file PASSPHRASE` signs with and a policy's `sigstoreSigned` `keyPath`
    (or the mirror's keyring) checks with (PUBLIC)."""

    private: Path
    passphrase: Path
    public: Path


def make_key_pair(directory: Path, name: str = "cosign") -> KeyPair:
    """A new EC P-256 key pair in `directory`: `<name>.key` (encrypted as `cosign generate-key-pair`
    writes it), `<name>.pass` and `<name>.pub` (SubjectPublicKeyInfo PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    passphrase = secrets.token_hex(16).encode()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.pass", directory / f"{name}.pub")
    pair.private.write_text(_pem(_PRIVATE_PEM_TYPE, _encrypt(der, passphrase)))
    pair.passphrase.write_bytes(passphrase)
    pair.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return pair


def load_private_key(pair: KeyPair) -> ec.EllipticCurvePrivateKey:
    """The private key of `pair`, decrypted with its passphrase as containers/image does."""
    body = "".join(line for line in pair.private.read_text().splitlines() if not line.startswith("-----"))
    envelope = json.loads(base64.b64decode(body))
    assert (envelope["kdf"]["name"], envelope["cipher"]["name"]) == ("scrypt", "nacl/secretbox"), envelope
    params = envelope["kdf"]["params"]
    key = hashlib.scrypt(pair.passphrase.read_bytes(), salt=base64.b64decode(envelope["kdf"]["salt"]),
                         n=params["N"], r=params["r"], p=params["p"], maxmem=_SCRYPT_MAXMEM,
                         dklen=nacl.secret.SecretBox.KEY_SIZE)
    der = nacl.secret.SecretBox(key).decrypt(base64.b64decode(envelope["ciphertext"]),
                                             base64.b64decode(envelope["cipher"]["nonce"]))
    private = serialization.load_der_private_key(der, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return private


def _encrypt(secret: bytes, passphrase: bytes) -> bytes:
    """go-securesystemslib `encrypted.Encrypt`: JSON naming the KDF and cipher with their salt
    and nonce; the ciphertext is Go's `secretbox.Seal` output (tag first), as PyNaCl's is."""
    salt, nonce = secrets.token_bytes(32), secrets.token_bytes(nacl.secret.SecretBox.NONCE_SIZE)
    key = hashlib.scrypt(passphrase, salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=_SCRYPT_MAXMEM,
                         dklen=nacl.secret.SecretBox.KEY_SIZE)
    sealed = nacl.secret.SecretBox(key).encrypt(secret, nonce).ciphertext
    return json.dumps({
        "kdf": {"name": "scrypt", "params": {"N": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P}, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(sealed),
    }, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pem(kind: str, data: bytes) -> str:
    return f"-----BEGIN {kind}-----\n{base64.encodebytes(data).decode()}-----END {kind}-----\n"


def signature_tag(digest: str) -> str:
    """The tag of the signatures of the manifest `digest`: `sha256-<hex>.sig`."""
    return digest.replace(":", "-") + ".sig"


def payload_of(digest: str, identity: str) -> bytes:
    """The signed claim, as containers/image's `UntrustedSigstorePayload` marshals it: the
    manifest `digest` is the image `identity` (a docker reference)."""
    return json.dumps({
        "critical": {"identity": {"docker-reference": identity}, "image": {"docker-manifest-digest": digest},
                     "type": SIGNATURE_TYPE},
        "optional": {"creator": "mirror tests", "timestamp": int(time.time())},
    }, separators=(",", ":")).encode()


async def sign_in_place(registry_url: str, name: str, tag: str, key: KeyPair, *, identity: str) -> str:
    """Sign `name:tag` on the registry at `registry_url` (plain HTTP) as cosign and skopeo do:
    its `sha256-<hex>.sig` manifest (replaced if there was one) holds one signature, by `key`,
    that the digest the tag names now is the image `identity` (`host/name:tag`, as clients
    will name it). The signed manifest's digest."""
    return await asyncio.to_thread(_sign, registry_url, name, tag, key, identity)


def _sign(registry_url: str, name: str, tag: str, key: KeyPair, identity: str) -> str:
    head = urllib.request.Request(f"{registry_url}/v2/{name}/manifests/{tag}", method="HEAD",
                                  headers={"Accept": _ACCEPT})
    with _OPENER.open(head, timeout=30) as response:
        digest: str = response.headers["Docker-Content-Digest"]
    payload = payload_of(digest, identity)
    signature = _b64(load_private_key(key).sign(payload, ec.ECDSA(hashes.SHA256())))
    # containers/image's attachment config: an empty image whose diff_ids are the signatures.
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [digest_of(payload)]}, "config": {}},
                        separators=(",", ":")).encode()
    push_blob(registry_url, name, payload)
    push_blob(registry_url, name, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": SIGNATURE_MEDIA_TYPE, "digest": digest_of(payload), "size": len(payload),
                    "annotations": {SIGNATURE_ANNOTATION: signature}}],
    }, separators=(",", ":")).encode()
    push_manifest(registry_url, name, signature_tag(digest), manifest, OCI_MANIFEST)
    return digest


def verifies(public_key: Path, payload: bytes, signature: str) -> bool:
    """Whether `signature` (base64 ECDSA-SHA256, as in the layer annotation) is `public_key`'s
    over `payload`: the cryptographic half of a `sigstoreSigned` policy requirement."""
    key = serialization.load_pem_public_key(public_key.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(base64.b64decode(signature), payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def write_registries_d(directory: Path, hosts: list[str]) -> Path:
    """A containers/image `registries.d` that reads and writes sigstore signatures as
    `sha256-<hex>.sig` attachments on each of `hosts` (`host[:port]` or a longer namespace)."""
    directory.mkdir(parents=True, exist_ok=True)
    docker = "".join(f"  {json.dumps(host)}:\n    use-sigstore-attachments: true\n" for host in hosts)
    (directory / "sigstore.yaml").write_text(f"docker:\n{docker}")
    return directory
