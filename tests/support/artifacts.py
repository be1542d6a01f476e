"""OCI artifacts that refer to an image through ``subject`` (signatures, SBOMs), pushed to a real registry.

CNCF distribution 2.8 has no referrers API (``GET /v2/<name>/referrers/<digest>`` is a 404), so
this pushes them as a spec-following client does against such a registry (distribution-spec
v1.1, "Pushing Manifests with Subject"): the artifact manifest by digest, then the referrers tag
``sha256-<hex>`` rewritten to an OCI index listing every referrer's descriptor. The mirror has
to find them through that same fallback.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    _dumps,
    _request,
    digest_of,
    push_blob,
    push_manifest,
)

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_DESCRIPTOR: dict[str, object] = {
    "mediaType": EMPTY_MEDIA_TYPE,
    "digest": digest_of(EMPTY_CONFIG),
    "size": len(EMPTY_CONFIG),
}
"""The image spec's empty descriptor (sha256:44136fa3...aff8a, 2 bytes): the config of an artifact that has none."""

CREATED = "org.opencontainers.image.created"
"""The annotation real clients (oras, notation) stamp on every artifact they push."""


def descriptor_of(image: PushedImage) -> dict[str, object]:
    """The descriptor an artifact's ``subject`` names ``image`` by."""
    return {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}


def referrers_tag(subject_digest: str) -> str:
    """The spec's referrers tag schema, ``<alg>-<ref>`` with ref cut to 64 characters: the tag
    under which clients keep the referrers list on a registry without the API."""
    algorithm, _, encoded = subject_digest.partition(":")
    return f"{algorithm}-{encoded[:64]}"


def artifact_manifest(
    subject: dict[str, object],
    artifact_type: str,
    payload: bytes,
    *,
    layer_media_type: str = "application/octet-stream",
    annotations: dict[str, str] | None = None,
) -> bytes:
    """The exact bytes of an OCI image manifest carrying ``payload`` as its one layer, with the
    empty config and ``subject`` (for a fake upstream, which needs no push)."""
    document: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": EMPTY_DESCRIPTOR,
        "layers": [{"mediaType": layer_media_type, "digest": digest_of(payload), "size": len(payload)}],
        "subject": subject,
    }
    if annotations:
        document["annotations"] = annotations
    return _dumps(document)


def referrer_descriptor(manifest: bytes) -> dict[str, object]:
    """The descriptor a referrers list holds for ``manifest``, by the spec's rules: artifactType
    from the manifest, else (image manifest only) its config's mediaType; annotations copied."""
    document: dict[str, Any] = json.loads(manifest)
    media_type = document.get("mediaType", OCI_MANIFEST)
    descriptor: dict[str, object] = {"mediaType": media_type, "digest": digest_of(manifest), "size": len(manifest)}
    artifact_type = document.get("artifactType") or (
        document["config"]["mediaType"] if media_type == OCI_MANIFEST else None
    )
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if document.get("annotations"):
        descriptor["annotations"] = document["annotations"]
    return descriptor


def read_referrers(base_url: str, name: str, subject_digest: str) -> list[dict[str, object]]:
    """The referrers list under the fallback tag; empty when the tag does not exist yet."""
    status, headers, body = _request(
        "GET",
        f"{base_url}/v2/{name}/manifests/{referrers_tag(subject_digest)}",
        headers={"Accept": OCI_INDEX},
        expect=(200, 404),
    )
    if status == 404:
        return []
    index: dict[str, Any] = json.loads(body)
    if headers.get_content_type() != OCI_INDEX or index.get("mediaType") != OCI_INDEX:
        raise RuntimeError(f"{referrers_tag(subject_digest)} is not an OCI index: {body[:200]!r}")
    manifests: list[dict[str, object]] = index["manifests"]
    return manifests


def write_referrers(base_url: str, name: str, subject_digest: str, descriptors: list[dict[str, object]]) -> str:
    """Replace the referrers list under the fallback tag; returns the new index's digest."""
    index = _dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
    return push_manifest(base_url, name, referrers_tag(subject_digest), index, OCI_INDEX)


def push_artifact(
    base_url: str,
    name: str,
    subject: dict[str, object],
    artifact_type: str,
    payload: bytes,
    *,
    layer_media_type: str = "application/octet-stream",
    annotations: dict[str, str] | None = None,
    fallback: bool = True,
) -> dict[str, object]:
    """Push an artifact referring to ``subject`` by digest (no tag) and return its descriptor.

    With ``fallback`` the referrers tag is updated too (read, append unless already listed,
    write back), as a client must when the registry did not answer ``OCI-Subject``; without it
    the artifact exists but no list names it, as after a client that skipped that step.
    """
    push_blob(base_url, name, EMPTY_CONFIG)
    push_blob(base_url, name, payload)
    manifest = artifact_manifest(
        subject, artifact_type, payload, layer_media_type=layer_media_type, annotations=annotations
    )
    push_manifest(base_url, name, digest_of(manifest), manifest, OCI_MANIFEST)
    descriptor = referrer_descriptor(manifest)
    if fallback:
        subject_digest = str(subject["digest"])
        listed = read_referrers(base_url, name, subject_digest)
        if all(entry["digest"] != descriptor["digest"] for entry in listed):
            write_referrers(base_url, name, subject_digest, [*listed, descriptor])
    return descriptor


def remove_referrer(base_url: str, name: str, subject_digest: str, referrer_digest: str) -> None:
    """Drop a referrer from the fallback list (a revoked signature); its manifest stays pullable
    by digest, as after a client that deleted nothing but the listing."""
    listed = read_referrers(base_url, name, subject_digest)
    write_referrers(
        base_url, name, subject_digest, [entry for entry in listed if entry["digest"] != referrer_digest]
    )
