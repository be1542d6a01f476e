"""Prometheus metrics, on a registry of the app's own, so several mirrors can share a process.

Names are `mirror_*` in base units. Labels take bounded values only: route, kind, result,
source, reason, upstream name, method and status; never a repository, tag or digest.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from mirror import __version__
from mirror.activity import Activity

KINDS = ("manifest", "blob")
RESULTS = ("hit", "miss", "joined", "revalidated", "revalidating", "stale")

# Registry calls: from a cached manifest in milliseconds to a large layer in minutes.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.activity = Activity()
        """The same events by upstream, repository and minute, for the status page."""
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        Gauge("mirror_build_info", "The running version, as a label.", ["version"],
              registry=registry).labels(__version__).set(1)

        self.requests = Counter("mirror_http_requests", "Requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=registry)
        self.request_seconds = Histogram("mirror_http_request_duration_seconds",
                                         "Time from a request's arrival to its last byte sent.", ["route"],
                                         buckets=_REQUEST_BUCKETS, registry=registry)
        self.cache_requests = Counter("mirror_cache_requests", "Manifest and blob requests by where they were "
                                      "answered from.", ["kind", "result"], registry=registry)
        self.served_bytes = Counter("mirror_served_bytes", "Body bytes sent to clients: from the cache (hits, and "
                                    "requests that joined another's download) or from an upstream download.",
                                    ["source"], registry=registry)
        self.coalesced = Counter("mirror_coalesced_requests", "Requests that joined a download already under way.",
                                 ["kind"], registry=registry)
        self.downloads_in_flight = Gauge("mirror_downloads_in_flight", "Blob downloads under way.",
                                         registry=registry)

        self.upstream_requests = Counter("mirror_upstream_requests", "Requests to upstreams, by status (or 'error' "
                                         "where no response came).", ["upstream", "method", "status"],
                                         registry=registry)
        self.upstream_seconds = Histogram("mirror_upstream_request_duration_seconds",
                                          "Time until an upstream's response headers.", ["upstream", "method"],
                                          buckets=_REQUEST_BUCKETS, registry=registry)
        self.upstream_bytes = Counter("mirror_upstream_bytes", "Body bytes received from upstreams.", ["upstream"],
                                      registry=registry)
        self.rate_limited = Counter("mirror_upstream_rate_limited", "429 answers from upstreams.", ["upstream"],
                                    registry=registry)
        self.ratelimit_remaining = Gauge("mirror_upstream_ratelimit_remaining", "Pulls left in the upstream's "
                                         "window, from its ratelimit-remaining header.", ["upstream"],
                                         registry=registry)
        self.upstream_state = Gauge("mirror_upstream_circuit_state", "Each upstream's circuit breaker: 0 closed "
                                    "(asked as usual), 1 half-open (one probe under way), 2 open (not asked: "
                                    "cached content is served stale).", ["upstream"], registry=registry)
        self.offline_misses = Counter("mirror_offline_misses", "Requests an offline mirror could not answer from "
                                      "its cache (recorded for `mirror misses`).", ["kind"], registry=registry)
        self.ratelimit_limit = Gauge("mirror_upstream_ratelimit_limit", "The upstream's pull limit per window, "
                                     "from its ratelimit-limit header.", ["upstream"], registry=registry)

        self.cache_size = Gauge("mirror_cache_size_bytes", "Bytes the cache holds.", registry=registry)
        self.cache_blobs = Gauge("mirror_cache_blobs", "Blobs and manifests the cache holds.", registry=registry)
        self.cache_max_size = Gauge("mirror_cache_max_size_bytes", "The cache's disk budget (max_size).",
                                    registry=registry)
        self.evictions = Counter("mirror_evictions", "Blobs and manifests evicted, for size or for age.", ["reason"],
                                 registry=registry)
        self.evicted_bytes = Counter("mirror_evicted_bytes", "Bytes evicted, for size or for age.", ["reason"],
                                     registry=registry)
        self.cluster_coordination = Gauge("mirror_cluster_coordination", "With replicas (redis set): 1 while "
                                          "Redis answers, 0 while each replica works alone (downloads, tags, "
                                          "rate limits).", registry=registry)
        self.peer_bytes = Counter("mirror_cluster_peer_bytes", "Bytes streamed from another replica's download "
                                  "instead of the upstream.", registry=registry)

        self.referrers_requests = Counter("mirror_referrers_requests", "Referrers API requests by how they were "
                                          "answered (hit, miss, joined, revalidated, stale).", ["result"],
                                          registry=registry)
        self.referrers_fetched = Counter("mirror_referrers_fetched", "Referrers lists fetched from upstreams, by "
                                         "where they came from: the referrers API, or the fallback tag of an "
                                         "upstream without it.", ["source"], registry=registry)
        self.referrers_listed = Counter("mirror_referrers_listed", "Referrers served in referrers lists, by kind "
                                        "of artifact (from its artifactType).", ["kind"], registry=registry)
        self.signature_checks = Counter("mirror_signature_checks", "Manifests checked against a signature policy, "
                                        "by policy and result: verified (now), cached (a verdict kept from "
                                        "before), refused.", ["policy", "result"], registry=registry)

        # Zero series from the start, so rates and ratios exist before the first event.
        for kind in KINDS:
            self.coalesced.labels(kind)
            for result in RESULTS:
                self.cache_requests.labels(kind, result)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)
        for kind in (*KINDS, "tags"):
            self.offline_misses.labels(kind)
        self.offline_misses.labels("referrers")
        for result in ("hit", "miss", "joined", "revalidated", "stale"):
            self.referrers_requests.labels(result)
        for source in ("api", "tag"):
            self.referrers_fetched.labels(source)
        for reason in ("size", "age"):
            self.evictions.labels(reason)
            self.evicted_bytes.labels(reason)

    def observe_rate_limit(self, upstream: str, headers: Mapping[str, str]) -> None:
        """Docker Hub's `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 76;w=21600`."""
        said: list[int | None] = []
        for header, gauge in (("ratelimit-remaining", self.ratelimit_remaining),
                              ("ratelimit-limit", self.ratelimit_limit)):
            value = headers.get(header, "").partition(";")[0].strip()
            said.append(int(value) if value.isdigit() else None)
            if value.isdigit():
                gauge.labels(upstream).set(int(value))
        if said[0] is not None:
            self.activity.rate_limits[upstream] = (said[0], said[1])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def referrer_kind(artifact_type: object) -> str:
    """A bounded label for a referrer's artifactType: signature, attestation, sbom or other."""
    kind = artifact_type.lower() if isinstance(artifact_type, str) else ""
    if any(word in kind for word in ("sbom", "spdx", "cyclonedx", "syft")):
        return "sbom"
    if any(word in kind for word in ("in-toto", "intoto", "attestation", "provenance", "cosign.artifact.att")):
        return "attestation"
    if any(word in kind for word in ("signature", "cosign.artifact.sig", "sigstore", "notary")):
        return "signature"
    return "other"
