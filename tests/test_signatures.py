"""The signature policy's pure core against real cryptography: what holds and what must not.

Signatures are made with real keys in cosign's own format (tests/support/cosign.py); nothing is
mocked, so a scheme the core gets wrong fails here."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from mirror.oci import Digest
from mirror.signatures import (
    SIGNATURE_ANNOTATION,
    SIGNATURE_ARTIFACT,
    SIMPLE_SIGNING,
    Claim,
    Keyring,
    binds,
    claims,
    signature_tag,
    verify_claim,
)
from tests.conftest import Registry
from tests.support.cosign import (
    PrivateKey,
    make_key,
    public_pem,
    push_referrer_signature,
    push_signature,
    sign_payload,
    signature_manifest,
    simple_signing_payload,
)
from tests.support.images import OCI_MANIFEST, push_image, random_layer

SUBJECT = Digest.of(b"the signed manifest")
OTHER = Digest.of(b"another manifest")
KINDS = ["ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa", "ed25519"]


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    """One key of each kind (RSA generation is slow enough to share)."""
    return {kind: make_key(kind) for kind in KINDS}


def keyring(*keys: PrivateKey) -> Keyring:
    return Keyring.from_pem([public_pem(key) for key in keys])


def signed_claim(key: PrivateKey, subject: Digest = SUBJECT) -> tuple[Claim, bytes]:
    """The claim `claims()` reads off cosign's manifest for one signature, and its payload."""
    payload, signature = sign_payload(key, str(subject), "registry.test/app")
    manifest, blobs = signature_manifest([(payload, signature)])
    [claim] = claims(manifest)
    assert blobs[str(claim.payload)] == payload
    return claim, payload


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_signature_tag_is_cosigns_scheme() -> None:
    assert signature_tag(SUBJECT) == f"sha256-{SUBJECT.hex}.sig"


@pytest.mark.parametrize("kind", KINDS)
def test_a_valid_signature_holds(keys: dict[str, PrivateKey], kind: str) -> None:
    claim, payload = signed_claim(keys[kind])
    assert verify_claim(keyring(keys[kind]), claim, payload, SUBJECT)


@pytest.mark.parametrize("kind", KINDS)
def test_a_signature_by_another_key_does_not_hold(keys: dict[str, PrivateKey], kind: str) -> None:
    claim, payload = signed_claim(make_key(kind))
    others = [key for other, key in keys.items() if other != kind]
    assert not verify_claim(keyring(keys[kind], *others), claim, payload, SUBJECT)


def test_any_key_of_the_keyring_may_have_signed(keys: dict[str, PrivateKey]) -> None:
    ring = keyring(*keys.values())
    for key in keys.values():
        claim, payload = signed_claim(key)
        assert verify_claim(ring, claim, payload, SUBJECT)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tampered_payload_does_not_hold(keys: dict[str, PrivateKey], kind: str) -> None:
    claim, payload = signed_claim(keys[kind])
    index = payload.index(b"registry.test")
    tampered = flip(payload, index)
    assert binds(tampered, SUBJECT)
    ring = keyring(keys[kind])
    assert not ring.verify(tampered, claim.signature)
    # Neither as the blob the claim names (wrong digest) nor as a blob whose digest matches.
    assert not verify_claim(ring, claim, tampered, SUBJECT)
    assert not verify_claim(ring, Claim(Digest.of(tampered), claim.signature), tampered, SUBJECT)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tampered_signature_does_not_hold(keys: dict[str, PrivateKey], kind: str) -> None:
    claim, payload = signed_claim(keys[kind])
    for index in (0, len(claim.signature) // 2, len(claim.signature) - 1):
        assert not keyring(keys[kind]).verify(payload, flip(claim.signature, index))


def test_the_payload_must_be_the_blob_the_claim_names(keys: dict[str, PrivateKey]) -> None:
    """A genuine signed payload does not vouch for a layer that names another blob."""
    claim, payload = signed_claim(keys["ecdsa-p256"])
    elsewhere = Claim(Digest.of(payload + b" "), claim.signature)
    assert not verify_claim(keyring(keys["ecdsa-p256"]), elsewhere, payload, SUBJECT)


def test_a_signature_of_another_digest_does_not_bind(keys: dict[str, PrivateKey]) -> None:
    key = keys["ecdsa-p256"]
    claim, payload = signed_claim(key, OTHER)
    assert keyring(key).verify(payload, claim.signature)  # a genuine signature...
    assert not binds(payload, SUBJECT)  # ...of something else
    assert not verify_claim(keyring(key), claim, payload, SUBJECT)
    assert verify_claim(keyring(key), claim, payload, OTHER)


def test_the_docker_reference_is_not_checked(keys: dict[str, PrivateKey]) -> None:
    """A mirror serves the image under its own name: the digest is the binding."""
    payload = simple_signing_payload(str(SUBJECT), "somewhere.else/entirely:latest")
    assert binds(payload, SUBJECT)


def test_a_payload_of_another_type_does_not_bind() -> None:
    document = json.loads(simple_signing_payload(str(SUBJECT), "registry.test/app"))
    document["critical"]["type"] = "cosign container image attestation"
    assert not binds(json.dumps(document).encode(), SUBJECT)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"not json",
        b"null",
        b"[]",
        b'"critical"',
        b'{"critical": []}',
        b'{"critical": {"type": "cosign container image signature"}}',
        b'{"critical": {"type": "cosign container image signature", "image": "sha256:00"}}',
        b'{"critical": {"type": "cosign container image signature", "image": {"docker-manifest-digest": 7}}}',
        b'{"critical": {"type": 1, "image": {}}}',
        b'{"critical": ' * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_payloads_bind_nothing(payload: bytes) -> None:
    assert binds(payload, SUBJECT) is False


def test_ecdsa_signatures_cosign_verify_accepts(keys: dict[str, PrivateKey]) -> None:
    """`cosign verify --key` hashes with SHA-256 whatever the curve, and sigstore's verifier takes
    IEEE P1363 (r||s) signatures as well as DER."""
    payload = simple_signing_payload(str(SUBJECT), "registry.test/app")
    for kind in ("ecdsa-p256", "ecdsa-p384", "ecdsa-p521"):
        key = keys[kind]
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        ring = keyring(key)
        assert ring.verify(payload, key.sign(payload, ec.ECDSA(hashes.SHA256())))
        der = key.sign(payload, ec.ECDSA({"ecdsa-p256": hashes.SHA256(), "ecdsa-p384": hashes.SHA384(),
                                          "ecdsa-p521": hashes.SHA512()}[kind]))
        width = (key.curve.key_size + 7) // 8
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(width) + s.to_bytes(width)
        assert ring.verify(payload, raw)
        assert not ring.verify(payload, flip(raw, width))
        # Hashes cosign never signs with do not hold.
        assert not ring.verify(payload, key.sign(payload, ec.ECDSA(hashes.SHA224())))


def test_rsa_schemes(keys: dict[str, PrivateKey]) -> None:
    """PKCS#1 v1.5 (cosign's default) and PSS (sigstore's RSA-PSS verifier, for KMS keys), both over
    SHA-256; nothing else."""
    key = keys["rsa"]
    assert isinstance(key, rsa.RSAPrivateKey)
    payload = simple_signing_payload(str(SUBJECT), "registry.test/app")
    ring = keyring(key)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    assert ring.verify(payload, key.sign(payload, pss, hashes.SHA256()))
    pss_max = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    assert ring.verify(payload, key.sign(payload, pss_max, hashes.SHA256()))
    assert not ring.verify(payload, key.sign(payload, padding.PKCS1v15(), hashes.SHA512()))


@pytest.mark.parametrize("length", [0, 1, 32, 64, 70, 96, 132, 256, 512, 10_000])
def test_garbage_signatures_are_false_not_errors(keys: dict[str, PrivateKey], length: int) -> None:
    ring = keyring(*keys.values())
    payload = simple_signing_payload(str(SUBJECT), "registry.test/app")
    for fill in (b"\x00", b"\xff", b"\x30"):
        assert ring.verify(payload, fill * length) is False


def test_claims_reads_what_cosign_pushes(keys: dict[str, PrivateKey]) -> None:
    signatures = [sign_payload(keys[kind], str(SUBJECT), "registry.test/app") for kind in KINDS]
    manifest, blobs = signature_manifest(signatures)
    document = json.loads(manifest)
    assert document["mediaType"] == OCI_MANIFEST
    config = json.loads(blobs[document["config"]["digest"]])
    assert config["rootfs"]["diff_ids"] == [str(Digest.of(payload)) for payload, _ in signatures]
    found = claims(manifest)
    assert found == [Claim(Digest.of(payload), signature) for payload, signature in signatures]
    ring = keyring(*keys.values())
    assert all(verify_claim(ring, claim, blobs[str(claim.payload)], SUBJECT) for claim in found)


def test_claims_ignores_layers_of_other_media_types(keys: dict[str, PrivateKey]) -> None:
    payload, signature = sign_payload(keys["ecdsa-p256"], str(SUBJECT), "registry.test/app")
    manifest, _ = signature_manifest([(payload, signature)])
    document = json.loads(manifest)
    [layer] = document["layers"]
    document["layers"] = [
        {**layer, "mediaType": "application/vnd.dsse.envelope.v1+json"},
        layer,
        {**layer, "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
    ]
    assert claims(json.dumps(document).encode()) == [Claim(Digest.of(payload), signature)]


def good_layer() -> dict[str, object]:
    return {
        "mediaType": SIMPLE_SIGNING,
        "digest": str(SUBJECT),
        "size": 10,
        "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(b"sig").decode()},
    }


@pytest.mark.parametrize(
    "layer",
    [
        None,
        "a layer",
        [],
        {k: v for k, v in good_layer().items() if k != "annotations"},
        {**good_layer(), "annotations": None},
        {**good_layer(), "annotations": {}},
        {**good_layer(), "annotations": {SIGNATURE_ANNOTATION: 7}},
        {**good_layer(), "annotations": {SIGNATURE_ANNOTATION: "not base64!"}},
        {**good_layer(), "annotations": {SIGNATURE_ANNOTATION: "c2ln"[:3]}},  # bad padding
        {**good_layer(), "annotations": {SIGNATURE_ANNOTATION: ""}},
        {**good_layer(), "digest": None},
        {**good_layer(), "digest": "sha512:" + "0" * 128},
        {**good_layer(), "digest": "sha256:XYZ"},
        {**good_layer(), "digest": "../../etc/passwd"},
        {**good_layer(), "mediaType": None},
    ],
)
def test_malformed_layers_give_no_claims(layer: object) -> None:
    assert claims(json.dumps({"schemaVersion": 2, "layers": [layer, good_layer()]}).encode()) == [
        Claim(SUBJECT, b"sig")
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"null",
        b"[]",
        b'{"layers": null}',
        b'{"layers": {"0": {}}}',
        b'{"manifests": []}',
        b'{"layers": ' * 100_000,
        b'{"layers": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    ],
)
def test_malformed_manifests_give_no_claims(body: bytes) -> None:
    assert claims(body) == []


def test_fingerprint_is_the_key_set(keys: dict[str, PrivateKey]) -> None:
    pems = [public_pem(key) for key in keys.values()]
    assert Keyring.from_pem(pems).fingerprint == Keyring.from_pem(pems[::-1]).fingerprint
    assert Keyring.from_pem(pems).fingerprint == Keyring.from_pem([*pems, pems[0]]).fingerprint
    assert Keyring.from_pem(pems).fingerprint != Keyring.from_pem(pems[1:]).fingerprint
    assert Keyring.from_pem(pems[:1]).fingerprint != Keyring.from_pem(pems[1:2]).fingerprint
    ders = sorted(
        key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for key in keys.values()
    )
    assert Keyring.from_pem(pems).fingerprint == hashlib.sha256(b"".join(ders)).hexdigest()


def test_load_reads_key_files(tmp_path: Path, keys: dict[str, PrivateKey]) -> None:
    one, both = tmp_path / "one.pub", tmp_path / "both.pub"
    one.write_bytes(public_pem(keys["ecdsa-p256"]))
    both.write_bytes(public_pem(keys["rsa"]) + b"\n" + public_pem(keys["ed25519"]))
    ring = Keyring.load([one, both])
    assert ring.fingerprint == keyring(keys["ecdsa-p256"], keys["rsa"], keys["ed25519"]).fingerprint
    claim, payload = signed_claim(keys["ed25519"])  # the second key of a file counts too
    assert verify_claim(ring, claim, payload, SUBJECT)


def spki(key: dsa.DSAPrivateKey | ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)


BAD_KEY_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "no PEM block"),
    "ssh": (lambda: b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "no PEM block"),
    "garbage": (lambda: b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n", "unreadable"),
    "private": (private_pem, "PRIVATE KEY block"),
    "good-then-private": (lambda: spki(ec.generate_private_key(ec.SECP384R1())) + private_pem(), "PRIVATE KEY block"),
    "secp256k1": (lambda: spki(ec.generate_private_key(ec.SECP256K1())), "unsupported ECDSA curve"),
    "rsa-1024": (lambda: spki(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "1024 bits"),
    "dsa": (lambda: spki(dsa.generate_private_key(key_size=2048)), "unsupported key type"),
    "ed448": (lambda: spki(ed448.Ed448PrivateKey.generate()), "unsupported key type"),
}


@pytest.mark.parametrize("case", BAD_KEY_FILES)
def test_load_errors_name_the_file(tmp_path: Path, keys: dict[str, PrivateKey], case: str) -> None:
    make, reason = BAD_KEY_FILES[case]
    good, bad = tmp_path / "good.pub", tmp_path / "bad.pub"
    good.write_bytes(public_pem(keys["ecdsa-p256"]))
    bad.write_bytes(make())
    with pytest.raises(ValueError, match=reason) as raised:
        Keyring.load([good, bad])
    assert str(raised.value).startswith(f"{bad}: ")


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pub"
    with pytest.raises(ValueError, match="cannot read") as raised:
        Keyring.load([missing])
    assert str(missing) in str(raised.value)


def test_an_empty_keyring_is_refused() -> None:
    with pytest.raises(ValueError, match="no public keys"):
        Keyring.from_pem([])


# Against a real registry: what push_signature / push_referrer_signature store is what claims() reads.


def get(url: str, accept: str = OCI_MANIFEST) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers={"Accept": accept}), timeout=30) as response:
        body: bytes = response.read()
    return body


def signed_image(registry: Registry) -> tuple[str, str]:
    name = f"signed/app{uuid.uuid4().hex[:8]}"
    image = push_image(registry.url, name, "v1", layers=[random_layer(1024, 7)])
    return name, image.digest


def verdict(registry: Registry, name: str, manifest: bytes, ring: Keyring, subject: Digest) -> list[bool]:
    return [
        verify_claim(ring, claim, get(f"{registry.url}/v2/{name}/blobs/{claim.payload}"), subject)
        for claim in claims(manifest)
    ]


def test_pushed_signatures_verify(registry: Registry, keys: dict[str, PrivateKey]) -> None:
    name, digest = signed_image(registry)
    subject = Digest.parse(digest)
    signed = push_signature(registry.url, name, digest, [keys["ecdsa-p256"], keys["rsa"]])
    manifest = get(f"{registry.url}/v2/{name}/manifests/{signature_tag(subject)}")
    assert str(Digest.of(manifest)) == signed
    assert verdict(registry, name, manifest, keyring(keys["ecdsa-p256"]), subject) == [True, False]
    assert verdict(registry, name, manifest, keyring(keys["ed25519"]), subject) == [False, False]
    assert verdict(registry, name, manifest, keyring(keys["ecdsa-p256"]), OTHER) == [False, False]


def test_pushed_tampered_signatures_do_not_verify(registry: Registry, keys: dict[str, PrivateKey]) -> None:
    name, digest = signed_image(registry)
    subject = Digest.parse(digest)
    push_signature(registry.url, name, digest, [keys["ecdsa-p256"]], tamper=True)
    manifest = get(f"{registry.url}/v2/{name}/manifests/{signature_tag(subject)}")
    [claim] = claims(manifest)
    payload = get(f"{registry.url}/v2/{name}/blobs/{claim.payload}")
    assert binds(payload, subject)
    assert not verify_claim(keyring(keys["ecdsa-p256"]), claim, payload, subject)


def test_pushed_referrer_signatures_verify(registry: Registry, keys: dict[str, PrivateKey]) -> None:
    name, digest = signed_image(registry)
    subject = Digest.parse(digest)
    descriptor = push_referrer_signature(registry.url, name, digest, [keys["ed25519"]])
    manifest = get(f"{registry.url}/v2/{name}/manifests/{descriptor['digest']}")
    assert descriptor == {
        "mediaType": OCI_MANIFEST,
        "digest": str(Digest.of(manifest)),
        "size": len(manifest),
        "artifactType": SIGNATURE_ARTIFACT,
    }
    document = json.loads(manifest)
    assert document["artifactType"] == document["config"]["mediaType"] == SIGNATURE_ARTIFACT
    assert document["subject"]["digest"] == digest
    assert document["subject"]["size"] == len(get(f"{registry.url}/v2/{name}/manifests/{digest}"))
    assert verdict(registry, name, manifest, keyring(keys["ed25519"]), subject) == [True]
    assert verdict(registry, name, manifest, keyring(keys["ecdsa-p256"]), subject) == [False]
