"""Value types of the OCI distribution API: names, references, digests, media types.

Everything a client sends is parsed here into a validated value before it reaches the cache or
the disk, so that no other module has to think about hostile strings.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid, ManifestInvalid, ManifestUnknown, NameInvalid, TagInvalid

# The OCI distribution spec's grammar (also CNCF distribution's reference package).
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_SHA256_HEX_RE = re.compile(r"[a-f0-9]{64}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_ATTACHMENT_RE = re.compile(r"sha256-(?P<hex>[a-f0-9]{64})(?:\.(?:sig|att|sbom))?")
# The spec bounds the whole reference (registry host and name) at 255 characters.
MAX_NAME_LENGTH = 255

MANIFEST_MAX_BYTES = 4 * 1024 * 1024

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_MEDIA_TYPES: tuple[str, ...] = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest. Only sha256 is accepted: it is what every registry produces, and the
    cache must be able to verify what it stores."""

    hex: str

    @classmethod
    def parse(cls, value: str) -> Digest:
        if not _DIGEST_RE.fullmatch(value):
            raise DigestInvalid(f"malformed digest {value[:100]!r}")
        algorithm, _, hexpart = value.partition(":")
        if algorithm != "sha256":
            raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}")
        if not _SHA256_HEX_RE.fullmatch(hexpart):
            raise DigestInvalid(f"malformed sha256 digest {value[:100]!r}")
        return cls(hexpart)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"


def parse_name(value: str) -> str:
    """A repository name, as the spec's grammar allows it (which rules out `..`, `%`, NUL)."""
    if len(value) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(value):
        raise NameInvalid(f"invalid repository name {value[:100]!r}")
    return value


def is_tag(value: str) -> bool:
    """Whether `value` is a tag, as the spec's grammar allows it (at most 128 characters; no
    `/`, `:` or leading `.`)."""
    return _TAG_RE.fullmatch(value) is not None


def parse_tag(value: str) -> str:
    if not is_tag(value):
        raise TagInvalid(f"invalid tag {value[:100]!r}")
    return value


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, value: str) -> Reference:
        """A value with a colon must be a good digest (DIGEST_INVALID otherwise). Any other value
        that is not a tag names a manifest that cannot exist: registries answer that with
        MANIFEST_UNKNOWN, not a 400, and clients and conformance checks expect it."""
        if ":" in value:
            return cls(digest=Digest.parse(value))
        if not is_tag(value):
            raise ManifestUnknown(f"no manifest can have the reference {value[:100]!r}: it is not a tag or a digest",
                                  {"reference": value[:100]})
        return cls(tag=value)

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)


def accepts(accept_header: str | None, media_type: str) -> bool:
    """Whether a client's Accept header admits a manifest media type.

    A client that sends no Accept (or a wildcard) takes whatever the registry has."""
    if not accept_header:
        return True
    offered = {part.split(";", 1)[0].strip() for part in accept_header.split(",")}
    return media_type in offered or "*/*" in offered


def manifest_media_type(body: bytes, declared: str | None) -> str:
    """The media type to serve an upstream manifest with, once its body is known to be one: a
    JSON object of schemaVersion 2 whose `mediaType` (optional in OCI) agrees with the
    upstream's Content-Type. Anything else raises ManifestInvalid, and is neither cached nor served."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ManifestInvalid("upstream manifest is not JSON") from exc
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        raise ManifestInvalid("upstream manifest is not a JSON object with schemaVersion 2")
    field = document.get("mediaType")
    if field is not None and field not in MANIFEST_MEDIA_TYPES:
        raise ManifestInvalid(f"upstream manifest has an unrecognised mediaType {str(field)[:100]!r}")
    declared = declared.split(";", 1)[0].strip() if declared else None
    if declared in MANIFEST_MEDIA_TYPES:
        if field is not None and field != declared:
            raise ManifestInvalid(f"upstream sent a manifest of type {field} as {declared}")
        return declared
    if field is not None:
        return str(field)
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document:
        return OCI_MANIFEST
    raise ManifestInvalid(f"unrecognised manifest media type {declared!r}")


def referrer_descriptors(body: bytes) -> list[dict[str, object]]:
    """The descriptors an OCI index lists (a referrers response or a fallback tag's index), each
    kept as sent (artifactType, annotations...) when it has the three fields a descriptor must
    have; anything else in the list is dropped. A body that is not an index raises ManifestInvalid."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ManifestInvalid("upstream referrers list is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("manifests"), list):
        raise ManifestInvalid("upstream referrers list is not an image index")
    kept: list[dict[str, object]] = []
    for entry in document["manifests"]:
        if (isinstance(entry, dict) and isinstance(entry.get("mediaType"), str)
                and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("digest"), str) and _is_sha256(entry["digest"])):
            kept.append(entry)
    return kept


def _is_sha256(value: str) -> bool:
    try:
        Digest.parse(value)
    except DigestInvalid:
        return False
    return True


def referrers_index(descriptors: list[dict[str, object]]) -> bytes:
    """The image index the referrers API answers: the same descriptors always give the same bytes."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors},
                      separators=(",", ":")).encode()


def fallback_tag(subject: Digest) -> str:
    """Where a registry without the referrers API keeps a subject's referrers (the spec's
    referrers tag schema)."""
    return f"sha256-{subject.hex}"


def attachment_subject(tag: str) -> Digest | None:
    """The subject of a tag that names an attachment: the referrers fallback tag, or cosign's
    `sha256-<hex>.sig`, `.att`, `.sbom`."""
    if (match := _ATTACHMENT_RE.fullmatch(tag)) is None:
        return None
    return Digest(match["hex"])


def manifest_references(body: bytes) -> list[Digest]:
    """Digests a manifest or index points at (config, layers, child manifests): what a
    repository serving this manifest is known to hold."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    descriptors: list[object] = [document.get("config")]
    for key in ("layers", "manifests", "blobs"):
        entries = document.get(key)
        if isinstance(entries, list):
            descriptors.extend(entries)
    found: list[Digest] = []
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            try:
                found.append(Digest.parse(descriptor["digest"]))
            except DigestInvalid:
                continue
    return found
