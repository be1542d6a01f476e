"""A pytest plugin that turns a hung test into a failure that says where it hung.

A test stuck on an event that never comes would otherwise hold the run until CI's limit, and
say nothing. Past HANG_LIMIT seconds in one test (set-up and teardown included), the main
thread is interrupted: every asyncio task's stack and every thread's stack are written to
stderr (captured into the test's report), and the test fails with TestHung."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
import traceback
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest

HANG_LIMIT = 600.0
_CHECK_EVERY = 5.0


class TestHung(Exception):
    """Raised in the main thread of a test that has run past HANG_LIMIT."""

    __test__ = False  # not a test class, despite its name


class _Watch:
    def __init__(self) -> None:
        self.test: str | None = None
        self.deadline = float("inf")
        self.lock = threading.Lock()

    def start(self, test: str) -> None:
        with self.lock:
            self.test, self.deadline = test, time.monotonic() + HANG_LIMIT

    def stop(self) -> None:
        with self.lock:
            self.test, self.deadline = None, float("inf")

    def overdue(self) -> bool:
        """Whether the test under way is past its deadline; re-armed, so that a teardown that
        hangs too is interrupted in its turn."""
        with self.lock:
            if time.monotonic() < self.deadline:
                return False
            self.deadline = time.monotonic() + HANG_LIMIT
            return True


_watch = _Watch()


def _first(obj: object, names: tuple[str, ...]) -> Any:
    return next((value for value in (getattr(obj, name, None) for name in names) if value is not None), None)


def _awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a task is suspended, down its chain of awaits (Task.get_stack gives only the top),
    ending with the future it waits on (asyncio keeps it in the private `_fut_waiter`)."""
    lines = []
    awaitable: object = task.get_coro()
    while awaitable is not None:
        frame = _first(awaitable, ("cr_frame", "gi_frame", "ag_frame"))
        if frame is None:
            lines.append(f"    waiting on {getattr(task, '_fut_waiter', None) or awaitable!r}"[:500])
            break
        lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaitable = _first(awaitable, ("cr_await", "gi_yieldfrom", "ag_await"))
    return lines


def _stacks() -> str:
    lines = [f"== {_watch.test} has run for more than {HANG_LIMIT:.0f} s"]
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no event loop running in this thread
        tasks = set()
    lines.append(f"{len(tasks)} asyncio task(s) pending")
    for task in tasks:
        lines.append(f"--- {task.get_name()}")
        lines.extend(_awaiting(task))
    for ident, frame in sys._current_frames().items():
        lines.append(f"--- thread {ident}")
        lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    print(_stacks(), file=sys.stderr, flush=True)
    raise TestHung(f"{_watch.test} ran for more than {HANG_LIMIT:.0f} s; the stacks are on stderr")


def _watching(main: int) -> None:
    while True:
        time.sleep(_CHECK_EVERY)
        if _watch.overdue():
            signal.pthread_kill(main, signal.SIGUSR1)


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGUSR1, _interrupt)
    threading.Thread(target=_watching, args=(threading.main_thread().ident,), daemon=True,
                     name="test-watchdog").start()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    _watch.start(item.nodeid)
    try:
        yield
    finally:
        _watch.stop()
