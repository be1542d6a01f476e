"""Progress of long commands (seed, export, import): a live display on a terminal (rich), a
log line per step when the output is not a terminal, nothing extra with --json (scripts read
the result at the end)."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("mirror.progress")


class Reporter:
    def __init__(self, what: str, items: int, quiet: bool = False, stream: TextIO | None = None,
                 unit: str = "images") -> None:
        """`items` of `unit` (images, blobs, volumes) make the bar; bytes and their rate ride along."""
        self._what = what
        self._stream = stream or sys.stderr
        self._live = not quiet and self._stream.isatty()
        self._quiet = quiet
        self._progress: Progress | None = None
        self._items = 0
        self._bytes = 0
        if self._live:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn(unit + ", {task.fields[moved]}"), TimeElapsedColumn(),
                                      TimeRemainingColumn(), console=Console(file=self._stream), transient=False)
            self._task = self._progress.add_task(what, total=items, moved="0 bytes")

    def __enter__(self) -> Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def moved(self, size: int, what: str) -> None:
        """`size` more bytes of `what` went through."""
        self._bytes += size
        if self._progress is not None:
            elapsed = self._progress.tasks[0].elapsed or 0.0
            rate = f", {decimal(int(self._bytes / elapsed))}/s" if elapsed > 0 else ""
            self._progress.update(self._task, description=f"{self._what} {what}", moved=decimal(self._bytes) + rate)
        elif not self._quiet:
            log.info("%s %s: %d bytes (%d in all)", self._what, what, size, self._bytes)

    def step(self, size: int, what: str) -> None:
        """One item of `size` bytes is done."""
        self._bytes += size
        self.finished(what)

    def finished(self, what: str) -> None:
        self._items += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=f"{self._what} {what}")
        elif not self._quiet:
            log.info("%s %s: done (%d so far)", self._what, what, self._items)
