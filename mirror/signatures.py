"""The pure core of the signature policy: what a cosign signature is, and whether one holds.

`cosign sign --key` stores a signature of image `sha256:X` as a separate OCI image manifest, under
the tag `sha256-X.sig` (or, in OCI 1.1 referrers mode, as a manifest whose `subject` is the image).
Each of its layers is a "simple signing" payload, a small JSON document naming the signed manifest
digest, with the signature over the payload's exact bytes in the layer annotation
`dev.cosignproject.cosign/signature` (base64).

A signature holds here when the payload blob is the one the layer names (its sha256), the payload
names the subject's digest (`critical.image["docker-manifest-digest"]`), and one of the operator's
public keys verifies the signature. The payload's `critical.identity["docker-reference"]` is not
checked: a mirror serves the image under other names than the one it was signed under, and the
digest alone is what the signature binds the content to.

Schemes, as sigstore's `signature` package signs (LoadDefaultSignerVerifier) and cosign verifies
(`cosign verify --key`, which hashes with SHA-256 unless told otherwise): ECDSA with the curve's
hash (P-256/SHA-256, P-384/SHA-384, P-521/SHA-512) or with SHA-256, as ASN.1 DER or IEEE P1363
(r||s) signatures; RSA PKCS#1 v1.5 with SHA-256, and RSA-PSS with SHA-256 (KMS keys); pure Ed25519.
Ed25519ph, which current cosign uses for Ed25519 keys when it uploads to a transparency log, is
not verifiable with pyca's primitives, so such signatures do not hold. No cryptography is written
here: every check is a `cryptography` primitive. No I/O either, except reading key files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from mirror.errors import DigestInvalid
from mirror.oci import Digest, fallback_tag

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
"""The artifactType (and config media type) of cosign signatures stored as OCI 1.1 referrers."""

_IMAGE_SIGNATURE_TYPE = "cosign container image signature"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL)
_MIN_RSA_BITS = 2048  # the smallest RSA key sigstore's algorithm registry admits
_CURVE_HASHES: dict[str, hashes.HashAlgorithm] = {
    "secp256r1": hashes.SHA256(),
    "secp384r1": hashes.SHA384(),
    "secp521r1": hashes.SHA512(),
}

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def signature_tag(subject: Digest) -> str:
    """The tag cosign stores the signatures of `subject` under."""
    return f"{fallback_tag(subject)}.sig"


@dataclass(frozen=True, slots=True)
class Claim:
    """One signature a signature manifest carries: the payload blob it signs, and the signature."""

    payload: Digest
    signature: bytes


def _json(data: bytes) -> object:
    """Parsed JSON, or None for anything that is not (bad UTF-8, bad syntax, absurd nesting)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _claim(layer: object) -> Claim | None:
    if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
        return None
    annotations, digest = layer.get("annotations"), layer.get("digest")
    if not isinstance(annotations, dict) or not isinstance(digest, str):
        return None
    encoded = annotations.get(SIGNATURE_ANNOTATION)
    if not isinstance(encoded, str):
        return None
    try:
        signature = base64.b64decode(encoded, validate=True)
        payload = Digest.parse(digest)
    except (binascii.Error, ValueError, DigestInvalid):
        return None
    return Claim(payload, signature) if signature else None


def claims(manifest_body: bytes) -> list[Claim]:
    """The cosign simple-signing signatures a signature manifest carries (one per layer of
    media type SIMPLE_SIGNING with the annotation); anything malformed is skipped, never raised:
    the manifest comes from an upstream, and a bad entry only means one signature fewer."""
    manifest = _json(manifest_body)
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list):
        return []
    return [claim for claim in map(_claim, layers) if claim is not None]


def _public_keys(pem: bytes) -> list[PublicKey]:
    """Every key of a PEM text (one or more PUBLIC KEY blocks); ValueError says what is wrong."""
    blocks = list(_PEM_BLOCK.finditer(pem))
    if not blocks:
        raise ValueError("no PEM block (expected -----BEGIN PUBLIC KEY-----)")
    keys: list[PublicKey] = []
    for block in blocks:
        label = block.group(1).decode()
        if label != "PUBLIC KEY":
            raise ValueError(f"a {label} block, not a PUBLIC KEY (SubjectPublicKeyInfo)")
        try:
            key = serialization.load_pem_public_key(block.group(0))
        except (ValueError, UnsupportedAlgorithm) as err:
            raise ValueError(f"unreadable public key: {err}") from None
        keys.append(_supported(key))
    return keys


def _supported(key: object) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVE_HASHES:
            raise ValueError(f"unsupported ECDSA curve {key.curve.name} (P-256, P-384 or P-521)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits is too small (at least {_MIN_RSA_BITS})")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise ValueError(f"unsupported key type {type(key).__name__} (ECDSA, RSA or Ed25519)")


def _der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _holds(check: Callable[[], object]) -> bool:
    """Whether a `cryptography` verification passes (it raises InvalidSignature when not)."""
    try:
        check()
    except InvalidSignature:
        return False
    return True


def _verifies_ecdsa(key: ec.EllipticCurvePublicKey, payload: bytes, signature: bytes) -> bool:
    encodings = [signature]
    width = (key.curve.key_size + 7) // 8
    if len(signature) == 2 * width:  # IEEE P1363: r and s, big-endian, side by side
        encodings.append(encode_dss_signature(int.from_bytes(signature[:width]), int.from_bytes(signature[width:])))
    # The curve's own hash is what cosign signs with; SHA-256 is what `cosign verify --key` assumes.
    own = _CURVE_HASHES[key.curve.name]
    algorithms = [own] if isinstance(own, hashes.SHA256) else [own, hashes.SHA256()]
    return any(
        _holds(partial(key.verify, der, payload, ec.ECDSA(algorithm))) for der in encodings for algorithm in algorithms
    )


def _verifies(key: PublicKey, payload: bytes, signature: bytes) -> bool:
    """Whether `key` verifies `signature` over `payload` in any scheme cosign signs with."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return _holds(partial(key.verify, signature, payload))
    if isinstance(key, rsa.RSAPublicKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
        return any(
            _holds(partial(key.verify, signature, payload, scheme, hashes.SHA256()))
            for scheme in (padding.PKCS1v15(), pss)
        )
    return _verifies_ecdsa(key, payload, signature)


class Keyring:
    """The operator's public keys: a signature holds if any one of them verifies it."""

    __slots__ = ("_fingerprint", "_keys")

    def __init__(self, keys: Sequence[PublicKey]) -> None:
        by_der = {_der(key): key for key in keys}  # the same key twice is one key
        if not by_der:
            raise ValueError("no public keys: a keyring without keys would refuse every image")
        self._keys = list(by_der.values())
        self._fingerprint = hashlib.sha256(b"".join(sorted(by_der))).hexdigest()

    @classmethod
    def load(cls, paths: Sequence[Path]) -> Keyring:
        """The keys of PEM files (SubjectPublicKeyInfo, one or more per file, as `cosign
        generate-key-pair` writes cosign.pub); ValueError names the file at fault."""
        keys: list[PublicKey] = []
        for path in paths:
            try:
                keys.extend(_public_keys(path.read_bytes()))
            except OSError as err:
                raise ValueError(f"{path}: cannot read the public key: {err.strerror or err}") from None
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        return cls(keys)

    @classmethod
    def from_pem(cls, pems: Sequence[bytes]) -> Keyring:
        keys: list[PublicKey] = []
        for index, pem in enumerate(pems):
            try:
                keys.extend(_public_keys(pem))
            except ValueError as err:
                raise ValueError(f"public key {index + 1}: {err}") from None
        return cls(keys)

    @property
    def fingerprint(self) -> str:
        """A stable id of the key set (sha256 over the sorted DER SubjectPublicKeyInfo), so that
        cached verdicts are dropped when the operator changes the keys."""
        return self._fingerprint

    def verify(self, payload: bytes, signature: bytes) -> bool:
        """True if any key verifies `signature` over `payload`; a bad signature is just False."""
        return any(_verifies(key, payload, signature) for key in self._keys)


def binds(payload: bytes, subject: Digest) -> bool:
    """Whether a simple-signing payload is a cosign container image signature of `subject`:
    JSON whose critical.type == "cosign container image signature" and
    critical.image["docker-manifest-digest"] == str(subject). Malformed -> False."""
    document = _json(payload)
    critical = document.get("critical") if isinstance(document, dict) else None
    if not isinstance(critical, dict) or critical.get("type") != _IMAGE_SIGNATURE_TYPE:
        return False
    image = critical.get("image")
    return isinstance(image, dict) and image.get("docker-manifest-digest") == str(subject)


def verify_claim(keyring: Keyring, claim: Claim, payload: bytes, subject: Digest) -> bool:
    """payload's digest is claim.payload, it binds subject, and a key verifies the signature."""
    return Digest.of(payload) == claim.payload and binds(payload, subject) and keyring.verify(payload, claim.signature)
