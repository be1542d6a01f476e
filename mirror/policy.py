"""The operator's signature policy: in the repositories a policy covers, the manifest of a
runnable image is served only if a key of the policy signed it (cosign's simple signing, under
cosign's `sha256-<hex>.sig` tag or as an OCI referrer), or signed an index that lists it.

What is checked is what a node would run: an image manifest with filesystem layers. Indexes,
signatures, SBOMs and other artifacts are served as they are; each image an index leads to is
checked when it is asked for. The signature is bound to the digest, not to a name: the same
image is served under the mirror's names and the upstream's.

Signatures and their payloads are fetched through the cache like any manifest and blob (so they
are there offline), and every verdict is kept by (image, signature manifest, key set): all
three are content-addressed, so a verdict never goes stale and survives a restart.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Sequence

from cachetools import LRUCache

from mirror.config import SignaturePolicy
from mirror.errors import CacheWriteError, Denied, ManifestUnknown, MirrorError, NameUnknown
from mirror.index import Index
from mirror.metrics import Metrics
from mirror.oci import DOCKER_MANIFEST_LIST, OCI_INDEX, Digest, Reference
from mirror.proxy import ACCEPT_ALL, ManifestResult, Proxy
from mirror.referrers import Referrers
from mirror.routing import Endpoint, Route
from mirror.signatures import SIGNATURE_ARTIFACT, Keyring, claims, signature_tag, verify_claim

log = logging.getLogger(__name__)

# Layer media types a container runtime unpacks into a root filesystem.
_FILESYSTEM_LAYERS = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")
_INDEXES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Verdicts remembered in memory, in front of the index.
_REMEMBERED = 65536


class Rule:
    def __init__(self, policy: SignaturePolicy) -> None:
        self.policy = policy
        self.keyring = Keyring.load(policy.keys)

    def covers(self, route: Route) -> bool:
        return (("*" in self.policy.upstreams or route.upstream.name in self.policy.upstreams)
                and any(fnmatch.fnmatchcase(route.name, pattern) for pattern in self.policy.repositories))


class SignatureGate:
    def __init__(self, policies: Sequence[SignaturePolicy], proxy: Proxy, referrers: Referrers, index: Index,
                 metrics: Metrics) -> None:
        self._rules = [Rule(policy) for policy in policies]
        self._proxy = proxy
        self._referrers = referrers
        self._index = index
        self._metrics = metrics
        self._verdicts: LRUCache[tuple[Digest, Digest, str], bool] = LRUCache(_REMEMBERED)

    async def check(self, route: Route, manifest: ManifestResult) -> None:
        """Raise Denied, naming the policy, unless `manifest` may be served for `route`."""
        rule = next((r for r in self._rules if r.covers(route)), None)
        if rule is None or not _runnable(manifest.body):
            return
        if await self._signed(route, manifest.digest, rule):
            return
        for parent in await self._index.parents(manifest.digest):
            if await self._lists(parent, manifest.digest) and await self._signed(route, parent, rule):
                return
        name = rule.policy.name
        self._metrics.signature_checks.labels(name, "refused").inc()
        raise Denied(f"{route.upstream.name}/{route.name}@{manifest.digest} has no valid signature by a key of "
                     f"signature policy {name!r}", {"policy": name, "digest": str(manifest.digest)})

    async def _lists(self, parent: Digest, child: Digest) -> bool:
        """Whether `parent` is an image index whose own body lists `child` (not merely something
        cached beside it, such as an attachment)."""
        cached = await self._proxy.cached_manifest(parent)
        if cached is None or cached.media_type not in _INDEXES:
            return False
        try:
            entries = json.loads(cached.body).get("manifests", [])
        except (ValueError, AttributeError):
            return False
        return any(isinstance(e, dict) and e.get("digest") == str(child) for e in entries)

    async def _signed(self, route: Route, subject: Digest, rule: Rule) -> bool:
        """Whether a signature manifest in the repository signs `subject`: cosign's tag first,
        then (only if that does not) the signatures among its referrers."""
        tag = Route(route.upstream, route.name, Endpoint.MANIFEST, Reference(tag=signature_tag(subject)))
        try:
            if await self._verdict(route, subject, await self._proxy.manifest(tag, ACCEPT_ALL), rule):
                return True
        except (ManifestUnknown, NameUnknown):
            pass
        try:
            listed = await self._referrers.answer(Route(route.upstream, route.name, Endpoint.REFERRERS,
                                                      Reference(digest=subject)))
        except MirrorError as exc:
            # The tag alone decides then.
            log.warning("could not list the referrers of %s in %s/%s for its signatures: %s", subject,
                        route.upstream.name, route.name, exc.message)
            return False
        for descriptor in listed.descriptors:
            if descriptor.get("artifactType") != SIGNATURE_ARTIFACT:
                continue
            by_digest = Route(route.upstream, route.name, Endpoint.MANIFEST,
                              Reference(digest=Digest.parse(str(descriptor["digest"]))))
            if await self._verdict(route, subject, await self._proxy.manifest(by_digest, ACCEPT_ALL), rule):
                return True
        return False

    async def _verdict(self, route: Route, subject: Digest, signature: ManifestResult, rule: Rule) -> bool:
        key = (subject, signature.digest, rule.keyring.fingerprint)
        known = self._verdicts.get(key)
        if known is None:
            known = await self._index.verdict(*key)
        if known is not None:
            self._verdicts[key] = known
            if known:
                self._metrics.signature_checks.labels(rule.policy.name, "cached").inc()
            return known
        valid = False
        for claim in claims(signature.body):
            payload = await self._proxy.small_blob(Route(route.upstream, route.name, Endpoint.BLOB,
                                                         Reference(digest=claim.payload)))
            if verify_claim(rule.keyring, claim, payload, subject):
                valid = True
                break
        self._verdicts[key] = valid
        try:
            await self._index.set_verdict(*key, valid)
        except CacheWriteError as exc:
            log.warning("could not keep the verdict on %s: %s", signature.digest, exc.message)
        if valid:
            self._metrics.signature_checks.labels(rule.policy.name, "verified").inc()
        return valid


def _runnable(body: bytes) -> bool:
    """An image manifest a runtime would unpack and run: it has a filesystem layer."""
    try:
        layers = json.loads(body).get("layers")
    except (ValueError, AttributeError):
        return False
    return isinstance(layers, list) and any(
        isinstance(layer, dict) and str(layer.get("mediaType", "")).startswith(_FILESYSTEM_LAYERS)
        for layer in layers)
