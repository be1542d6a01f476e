"""Log output for `mirror serve`: application logs with levels, and the access log, as text or
as one JSON object per line (for log shippers)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from aiohttp.http_exceptions import HttpProcessingError

from mirror.access import ACCESS_LOG


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class _MalformedRequests(logging.Filter):
    """aiohttp logs a malformed request with the offending header line, which may hold a client's
    password: the fact stays (as a warning: it is the client's error), the bytes go."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "refused a malformed request from %s: %s", (remote, type(error).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def protect() -> None:
    """Keep client secrets out of what libraries log; idempotent."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server.filters):
        server.addFilter(_MalformedRequests())


def configure(level: str, log_format: str) -> None:
    """Everything to stderr. In text, access lines stand alone (Common Log Format has its own
    timestamp); application lines carry time, level and logger."""
    application = logging.StreamHandler(sys.stderr)
    access = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        application.setFormatter(JsonFormatter())
        access.setFormatter(JsonFormatter())
    else:
        application.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        access.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [application]
    root.setLevel(level.upper())
    ACCESS_LOG.handlers[:] = [access]
    ACCESS_LOG.propagate = False
