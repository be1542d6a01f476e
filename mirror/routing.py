"""Which upstream, repository and endpoint a `/v2/...` path means.

Tried in this order: containerd's `?ns=<registry-host>`; a configured registry host or alias
as the first path segment (`/v2/ghcr.io/owner/repo/...`, `/v2/hub/library/nginx/...`); else
the default upstream, which is how the Docker daemon's registry-mirrors talk. A first segment
that looks like a registry host (it has a dot or a port, or is `localhost`, the same rule as
Docker's reference grammar) but is not configured is refused: the mirror is never an open proxy.
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
_CONTENT_RE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)")


class Router:
    def __init__(self, config: Config) -> None:
        self._by_key: dict[str, UpstreamConfig] = {}
        for upstream in config.upstreams:
            self._by_key[upstream.name] = upstream
            for alias in upstream.aliases:
                self._by_key[alias] = upstream
        self._default = config.upstream(config.default_upstream)

    def resolve(self, path: str, ns: str | None = None) -> Route:
        """`path` is what follows `/v2/`, already percent-decoded."""
        if len(path) > 2 * MAX_NAME_LENGTH:
            raise NotFound("request path is too long")
        if match := _UPLOAD_RE.fullmatch(path):
            endpoint, reference = Endpoint.UPLOAD, None
        elif match := _TAGS_RE.fullmatch(path):
            endpoint, reference = Endpoint.TAGS, None
        elif match := _CONTENT_RE.fullmatch(path):
            if match["kind"] == "manifests":
                endpoint, reference = Endpoint.MANIFEST, Reference.parse(match["reference"])
            else:
                endpoint, reference = Endpoint.BLOB, Reference(digest=Digest.parse(match["reference"]))
        else:
            raise NotFound(f"no registry API endpoint at /v2/{path[:200]}")
        upstream, name = self._upstream_for(match["name"], ns)
        if upstream.library_prefix and "/" not in name:
            name = f"library/{name}"
        return Route(upstream, parse_name(name), endpoint, reference)

    def _upstream_for(self, name: str, ns: str | None) -> tuple[UpstreamConfig, str]:
        if ns is not None:
            if ns not in self._by_key:
                raise Denied(f"registry {ns[:100]!r} is not configured on this mirror")
            return self._by_key[ns], name
        first, sep, rest = name.partition("/")
        if sep and first in self._by_key:
            return self._by_key[first], rest
        if sep and ("." in first or ":" in first or first == "localhost"):
            raise Denied(f"registry {first[:100]!r} is not configured on this mirror")
        return self._default, name
