"""Domain errors, each carrying the OCI error code and HTTP status a client is shown.

Raised anywhere below the HTTP layer; rendered as OCI error JSON in exactly one place (the error
middleware in `mirror.handlers`). The tree:

    MirrorError
    ├── NameInvalid          400 NAME_INVALID       malformed repository name
    ├── TagInvalid           400 TAG_INVALID        malformed tag
    ├── DigestInvalid        400 DIGEST_INVALID     malformed digest, or content that fails its digest
    ├── ManifestInvalid      502 MANIFEST_INVALID   an upstream manifest the mirror will not store or serve:
    │                                               not JSON, not schemaVersion 2, a type that disagrees, too large
    ├── PaginationInvalid    400 PAGINATION_NUMBER_INVALID  a tag list's `n` that is not a count
    ├── RequestInvalid       400 UNSUPPORTED        a request the mirror cannot take (an unknown grant type)
    ├── RangeInvalid         416 RANGE_INVALID      unsatisfiable Range
    ├── NameUnknown          404 NAME_UNKNOWN
    ├── ManifestUnknown      404 MANIFEST_UNKNOWN
    ├── BlobUnknown          404 BLOB_UNKNOWN
    ├── NotFound             404 NOT_FOUND          no such endpoint
    ├── Unauthorized         401 UNAUTHORIZED       the client must authenticate to the mirror (always with a challenge)
    ├── Denied               403 DENIED             not allowed, e.g. a registry that is not configured
    │   └── UpstreamRefused  403 DENIED             the upstream refused the mirror (its 401 or 403): the
    │                                               client cannot fix that by logging in to the mirror
    ├── Unsupported          405 UNSUPPORTED        push, delete and other writes
    ├── TooManyRequests      429 TOOMANYREQUESTS    the upstream rate-limits us (carries Retry-After)
    ├── Unavailable          503 UNAVAILABLE        the upstream is unreachable, times out, fails, or its
    │                                               circuit breaker is open (Retry-After where known)
    ├── CacheWriteError      503 UNAVAILABLE        the cache cannot take the bytes (disk full, I/O, index)
    ├── IntegrityError       502 UNAVAILABLE        the upstream sent bytes that fail their digest, or a
    │                                               manifest that is not one
    └── Internal             500 UNKNOWN            a bug in the mirror (logged with its traceback)
"""

from __future__ import annotations

import errno
from typing import ClassVar


class MirrorError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_json(self) -> dict[str, object]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}

    def headers(self) -> dict[str, str]:
        """Response headers the error needs beside its JSON body."""
        return {}

    def detached(self) -> MirrorError:
        """The same error, new: without the traceback (and every frame and local it holds) of
        where this one was raised, for an error remembered past its request and raised again."""
        return type(self)(self.message, detail=self.detail)


class NameInvalid(MirrorError):
    code, status = "NAME_INVALID", 400


class TagInvalid(MirrorError):
    code, status = "TAG_INVALID", 400


class RequestInvalid(MirrorError):
    code, status = "UNSUPPORTED", 400


class PaginationInvalid(MirrorError):
    code, status = "PAGINATION_NUMBER_INVALID", 400


class DigestInvalid(MirrorError):
    code, status = "DIGEST_INVALID", 400


class ManifestInvalid(MirrorError):
    """The upstream's fault, not the client's: a bad gateway."""

    code, status = "MANIFEST_INVALID", 502


class RangeInvalid(MirrorError):
    code, status = "RANGE_INVALID", 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}

    def detached(self) -> MirrorError:
        return RangeInvalid(self.message, self.size)


class NameUnknown(MirrorError):
    code, status = "NAME_UNKNOWN", 404


class ManifestUnknown(MirrorError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(MirrorError):
    code, status = "BLOB_UNKNOWN", 404


class NotFound(MirrorError):
    code, status = "NOT_FOUND", 404


class Unauthorized(MirrorError):
    code, status = "UNAUTHORIZED", 401

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge
        """A WWW-Authenticate value telling the client how to authenticate to this mirror: RFC 9110
        requires one on every 401."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.challenge}

    def detached(self) -> MirrorError:
        return Unauthorized(self.message, self.challenge)


class Denied(MirrorError):
    code, status = "DENIED", 403


class UpstreamRefused(Denied):
    """The upstream (or its token service, or a cloud's credential service) refused the
    mirror's credentials or denied it the repository."""


class Unsupported(MirrorError):
    code, status = "UNSUPPORTED", 405


class _Retryable(MirrorError):
    def __init__(self, message: str, retry_after: str | None = None, detail: object = None) -> None:
        super().__init__(message, detail)
        self.retry_after = retry_after
        """The Retry-After value for the client: seconds, or an HTTP date as the upstream sent it."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after else {}

    def detached(self) -> MirrorError:
        return type(self)(self.message, self.retry_after, self.detail)


class TooManyRequests(_Retryable):
    code, status = "TOOMANYREQUESTS", 429


class Unavailable(_Retryable):
    code, status = "UNAVAILABLE", 503


class CacheWriteError(MirrorError):
    """The cache's disk refused a write: the fill fails, nothing is published, and what is
    already cached is still served. Not an Unavailable: the upstream is not at fault, and
    nothing retries it as if it were."""

    code, status = "UNAVAILABLE", 503

    @classmethod
    def of(cls, error: OSError) -> CacheWriteError:
        if error.errno == errno.ENOSPC:
            return cls("the cache disk is full", "the cache disk is full: nothing new can be cached until space "
                       "is freed; cached content is still served")
        return cls(f"cannot write to the cache: {error.strerror}",
                   f"the cache refused a write ({errno.errorcode.get(error.errno or 0, 'error')}); cached content "
                   "is still served")


class StorageError(CacheWriteError):
    """The shared object store failed a read or a write: like a failing disk, what it cannot
    answer fails, nothing partial is published, and what can be served still is."""


class IntegrityError(MirrorError):
    """Upstream bytes that do not match their digest or size: nothing is published, and it
    is never retried as if it were a network fault."""

    code, status = "UNAVAILABLE", 502


class Internal(MirrorError):
    code, status = "UNKNOWN", 500


class CacheBusy(Exception):
    """Another process holds the cache directory."""


class ConfigError(Exception):
    """A bad configuration key or value; the message starts with the key path."""
