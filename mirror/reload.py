"""Files the mirror re-reads without a restart (the TLS certificate and key, the htpasswd file):
on SIGHUP, and when their modification time or size changes, so a renewed Kubernetes secret or
cert-manager certificate takes effect by itself. A file that fails to load leaves the previous
version in force."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mirror.errors import ConfigError

log = logging.getLogger(__name__)

WATCH_INTERVAL = 5.0


@dataclass
class Reloadable:
    name: str
    paths: tuple[Path, ...]
    load: Callable[[], None]
    _seen: tuple[tuple[int, int] | None, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self._seen = self._stamp()

    def _stamp(self) -> tuple[tuple[int, int] | None, ...]:
        stamps: list[tuple[int, int] | None] = []
        for path in self.paths:
            try:
                status = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    def reload(self) -> None:
        self._reload(self._stamp())

    def reload_if_changed(self) -> None:
        if (stamp := self._stamp()) != self._seen:
            self._reload(stamp)

    def _reload(self, stamp: tuple[tuple[int, int] | None, ...]) -> None:
        try:
            self.load()
        except ConfigError as exc:
            log.error("kept the previous %s: %s", self.name, exc)
        except Exception:
            # Whatever a file holds, the watcher (and the other files' reloads) must go on.
            log.exception("kept the previous %s", self.name)
        else:
            log.info("reloaded the %s", self.name)
        self._seen = stamp


def reload_all(reloadables: Sequence[Reloadable]) -> None:
    for reloadable in reloadables:
        reloadable.reload()


async def watch(reloadables: Sequence[Reloadable], interval: float = WATCH_INTERVAL) -> None:
    while True:
        await asyncio.sleep(interval)
        for reloadable in reloadables:
            reloadable.reload_if_changed()
