"""A test signer that writes cosign's on-registry signature format byte for byte.

The mirror's signature policy must accept what `cosign sign --key` pushes and nothing else, so the
tests sign with real keys and push the same objects cosign does (sigstore/cosign
pkg/oci/remote/write.go, pkg/oci/static, specs/SIGNATURE_SPEC.md): a simple-signing payload per
signature as a layer blob, the base64 signature in the layer's annotation, an OCI image manifest
around them, tagged `sha256-<hex>.sig` or, in OCI 1.1 referrers mode, pushed by digest with a
`subject`. No cosign binary is needed.
"""

from __future__ import annotations

import base64
import json
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from mirror.oci import Digest
from mirror.signatures import SIGNATURE_ANNOTATION, SIGNATURE_ARTIFACT, SIMPLE_SIGNING, signature_tag
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    digest_of,
    push_blob,
    push_manifest,
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "ecdsa-p256": ec.SECP256R1(),
    "ecdsa-p384": ec.SECP384R1(),
    "ecdsa-p521": ec.SECP521R1(),
}
# What sigstore's LoadDefaultSignerVerifier (cosign sign --key) hashes with, per curve.
_CURVE_HASHES: dict[str, hashes.HashAlgorithm] = {
    "secp256r1": hashes.SHA256(),
    "secp384r1": hashes.SHA384(),
    "secp521r1": hashes.SHA512(),
}
_ACCEPT = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
# Never route loopback test traffic through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# go-containerregistry's zero time, which cosign's signature images carry.
_ZERO_TIME = "0001-01-01T00:00:00Z"


def make_key(kind: str = "ecdsa-p256") -> PrivateKey:
    """A fresh private key: "ecdsa-p256" (cosign generate-key-pair's), "ecdsa-p384",
    "ecdsa-p521", "rsa" (2048 bits) or "ed25519"."""
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind])
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def public_pem(key: PrivateKey) -> bytes:
    """The public half as cosign.pub holds it: a PEM SubjectPublicKeyInfo."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: PrivateKey, payload: bytes) -> bytes:
    """The raw signature cosign makes over `payload`: ECDSA (DER) with the curve's hash, RSA
    PKCS#1 v1.5 with SHA-256, pure Ed25519 (cosign without a transparency log)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(_CURVE_HASHES[key.curve.name]))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(payload)


def simple_signing_payload(subject: str, reference: str) -> bytes:
    """cosign's payload for an image signature, as Go's json.Marshal writes it (compact, struct order)."""
    document = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": subject},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def sign_payload(key: PrivateKey, subject: str, reference: str) -> tuple[bytes, bytes]:
    """A simple-signing payload for the manifest digest `subject`, and its signature."""
    payload = simple_signing_payload(subject, reference)
    return payload, sign(key, payload)


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "size": len(data), "digest": digest_of(data)}


def _config(payloads: list[bytes]) -> bytes:
    """go-containerregistry's config of empty.Image after one Append per signature layer
    (ConfigFile's field order; one zero-time history entry per layer)."""
    document = {
        "architecture": "",
        "created": _ZERO_TIME,
        "history": [{"created": _ZERO_TIME} for _ in payloads],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [digest_of(payload) for payload in payloads]},
        "config": {},
    }
    return json.dumps(document, separators=(",", ":")).encode()


def _manifest(signatures: list[tuple[bytes, bytes]], config_media_type: str) -> tuple[dict[str, object], bytes]:
    config = _config([payload for payload, _ in signatures])
    layers = [
        {
            **_descriptor(SIMPLE_SIGNING, payload),
            "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
        }
        for payload, signature in signatures
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(config_media_type, config),
        "layers": layers,
    }
    return manifest, config


def _blobs(signatures: list[tuple[bytes, bytes]], config: bytes) -> dict[str, bytes]:
    return {digest_of(blob): blob for blob in [config, *(payload for payload, _ in signatures)]}


def signature_manifest(signatures: list[tuple[bytes, bytes]]) -> tuple[bytes, dict[str, bytes]]:
    """The signature image cosign pushes under the `.sig` tag: its manifest bytes and its blobs
    (config and payloads) by digest."""
    manifest, config = _manifest(signatures, OCI_CONFIG)
    return json.dumps(manifest, separators=(",", ":")).encode(), _blobs(signatures, config)


def _tampered(payload: bytes) -> bytes:
    """`payload` with one byte of its docker-reference changed: still JSON binding the same
    digest, but no longer the bytes that were signed."""
    document = json.loads(payload)
    identity = document["critical"]["identity"]
    reference = identity["docker-reference"]
    identity["docker-reference"] = reference[:-1] + ("y" if reference.endswith("x") else "x")
    return json.dumps(document, separators=(",", ":")).encode()


def _signed(
    subject: str, keys: list[PrivateKey], *, tamper: bool, reference: str | None
) -> list[tuple[bytes, bytes]]:
    """One (payload, signature) per key; `tamper` alters each payload after signing."""
    signatures = [sign_payload(key, subject, reference or "registry.test/signed") for key in keys]
    return [(_tampered(payload), sig) for payload, sig in signatures] if tamper else signatures


def _head(base_url: str, name: str, digest: str) -> tuple[str, int]:
    """The media type and size of a manifest, as cosign learns them before writing a referrer."""
    request = urllib.request.Request(
        f"{base_url}/v2/{name}/manifests/{digest}", method="HEAD", headers={"Accept": ", ".join(_ACCEPT)}
    )
    with _OPENER.open(request, timeout=30) as response:
        return response.headers["Content-Type"], int(response.headers["Content-Length"])


def push_signature(
    base_url: str,
    name: str,
    subject: str,
    keys: list[PrivateKey],
    *,
    tamper: bool = False,
    reference: str | None = None,
) -> str:
    """Sign `subject` (a manifest digest in `name`) with each key and push the signature image
    under cosign's `sha256-<hex>.sig` tag; returns the signature manifest's digest."""
    manifest, blobs = signature_manifest(_signed(subject, keys, tamper=tamper, reference=reference))
    for blob in blobs.values():
        push_blob(base_url, name, blob)
    return push_manifest(base_url, name, signature_tag(Digest.parse(subject)), manifest, OCI_MANIFEST)


def push_referrer_signature(
    base_url: str,
    name: str,
    subject: str,
    keys: list[PrivateKey],
    *,
    tamper: bool = False,
    reference: str | None = None,
) -> dict[str, object]:
    """The same signature image in cosign's OCI 1.1 referrers mode (`--registry-referrers-mode
    oci-1-1`, WriteSignaturesExperimentalOCI): the config keeps its bytes but takes the media type
    SIGNATURE_ARTIFACT, the manifest gains `subject` and `artifactType`, and it is pushed by digest,
    untagged. Returns its descriptor (mediaType, digest, size, artifactType), as a referrers index lists it."""
    media_type, size = _head(base_url, name, subject)
    signatures = _signed(subject, keys, tamper=tamper, reference=reference)
    manifest, config = _manifest(signatures, SIGNATURE_ARTIFACT)
    manifest["subject"] = {"mediaType": media_type, "size": size, "digest": subject}
    manifest["artifactType"] = SIGNATURE_ARTIFACT
    body = json.dumps(manifest, separators=(",", ":")).encode()
    for blob in _blobs(signatures, config).values():
        push_blob(base_url, name, blob)
    digest = push_manifest(base_url, name, digest_of(body), body, OCI_MANIFEST)
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": SIGNATURE_ARTIFACT}
