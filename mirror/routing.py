"""Which upstream, repository and endpoint a `/v2/...` path means.

Tried in this order: containerd's `?ns=<registry-host>`; a configured registry host or alias
as the segment before `/v2` (`/ghcr.io/v2/owner/repo/...`, for clients that can only be given a
URL) or as the first path segment after it (`/v2/ghcr.io/owner/repo/...`, the CRI-O and podman
mirror style); else the default upstream, which is how the Docker daemon's registry-mirrors talk. A first segment
that looks like a registry host (it has a dot or a port, or is `localhost`, the same rule as
Docker's reference grammar) but is not configured is refused: the mirror is never an open proxy.
All of it may sit under the configured `path_prefix` (`/registry/v2/...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from mirror.config import Config, UpstreamConfig
from mirror.errors import Denied, NotFound
from mirror.oci import MAX_NAME_LENGTH, Digest, Reference, parse_name


class Endpoint(Enum):
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"


@dataclass(frozen=True, slots=True)
class Route:
    upstream: UpstreamConfig
    name: str
    """The repository name as the upstream knows it (with `library/` where that applies)."""
    endpoint: Endpoint
    reference: Reference | None = None


_UPLOAD_RE = re.compile(r"(?P<name>.+)/blobs/uploads(?:/.*)?")
_TAGS_RE = re.compile(r"(?P<name>.+)/tags/list")
# A first segment that names a registry rather than a repository (Docker's reference grammar:
# it has a dot or a port, or is localhost).
_HOST_RE = re.compile(r"(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+|localhost|[a-zA-Z0-9-]+(?=:))(?::[0-9]+)?")
_CONTENT_RE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs|referrers)/(?P<reference>[^/]+)")


class Router:
    def __init__(self, config: Config) -> None:
        self._by_key: dict[str, UpstreamConfig] = {}
        for upstream in config.upstreams:
            self._by_key[upstream.name] = upstream
            for alias in upstream.aliases:
                self._by_key[alias] = upstream
        self._default = config.upstream(config.default_upstream)
        self._prefix = config.path_prefix

    def locate(self, path: str) -> tuple[UpstreamConfig | None, str]:
        """Split a percent-decoded request path at its first `v2` segment: the upstream that a
        segment before it names (None: not named there), and what follows `/v2/` ("" for the
        API base)."""
        segments = path.split("/")
        if "v2" not in segments:
            raise NotFound("no registry API endpoint at this path")
        at = segments.index("v2")
        before, api = "/".join(segments[:at]), "/".join(segments[at + 1:])
        if self._prefix and (before == self._prefix or before.startswith(f"{self._prefix}/")):
            before = before[len(self._prefix):]
        if not before:
            return None, api
        if before.count("/") == 1 and before[1:] in self._by_key:
            return self._by_key[before[1:]], api
        if before.count("/") == 1 and _HOST_RE.fullmatch(before[1:]):
            raise Denied(f"registry {before[1:100]!r} is not configured on this mirror")
        raise NotFound(f"no registry API under {before[:200]}")

    def resolve(self, path: str, ns: str | None = None, upstream: UpstreamConfig | None = None) -> Route:
        """`path` is what follows `/v2/`, already percent-decoded; `upstream` is what `locate`
        found before `/v2`."""
        if len(path) > 2 * MAX_NAME_LENGTH:
            raise NotFound("request path is too long")
        if match := _UPLOAD_RE.fullmatch(path):
            endpoint = Endpoint.UPLOAD
        elif match := _TAGS_RE.fullmatch(path):
            endpoint = Endpoint.TAGS
        elif match := _CONTENT_RE.fullmatch(path):
            endpoint = {"manifests": Endpoint.MANIFEST, "blobs": Endpoint.BLOB}.get(match["kind"], Endpoint.REFERRERS)
        else:
            raise NotFound(f"no registry API endpoint at /v2/{path[:200]}")
        upstream, name = self._upstream_for(match["name"], ns, upstream)
        if upstream.library_prefix and "/" not in name:
            name = f"library/{name}"
        name = parse_name(name)
        # The reference last: a reference that no manifest can have is a 404, which must not
        # hide that the registry is not configured or the name is malformed.
        reference = None
        if endpoint is Endpoint.MANIFEST:
            reference = Reference.parse(match["reference"])
        elif endpoint in (Endpoint.BLOB, Endpoint.REFERRERS):
            reference = Reference(digest=Digest.parse(match["reference"]))
        return Route(upstream, name, endpoint, reference)

    def _upstream_for(self, name: str, ns: str | None,
                      named: UpstreamConfig | None) -> tuple[UpstreamConfig, str]:
        # `ns` is the registry the client means; a prefix was only chosen to reach this mirror.
        if ns is not None:
            if ns not in self._by_key:
                raise Denied(f"registry {ns[:100]!r} is not configured on this mirror")
            return self._by_key[ns], name
        if named is not None:
            return named, name
        first, sep, rest = name.partition("/")
        if sep and first in self._by_key:
            return self._by_key[first], rest
        if sep and _HOST_RE.fullmatch(first):
            raise Denied(f"registry {first[:100]!r} is not configured on this mirror")
        return self._default, name


def manifest_path(reference: str) -> str:
    """An image reference as the API path a client would ask: name@digest, name:tag or name."""
    name, at, digest = reference.partition("@")
    if at:
        return f"{name}/manifests/{digest}"
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return f"{name[:colon]}/manifests/{name[colon + 1:]}"
    return f"{name}/manifests/latest"
