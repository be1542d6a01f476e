"""The suite's watchdog: a test that hangs fails, saying where every task was waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HUNG = textwrap.dedent('''
    import asyncio

    import tests.support.watchdog as watchdog

    watchdog.HANG_LIMIT = 1.0
    watchdog._CHECK_EVERY = 0.1


    async def never_told(event: asyncio.Event) -> None:
        await event.wait()


    async def test_hangs() -> None:
        await asyncio.gather(never_told(asyncio.Event()))


    def test_after_it_runs() -> None:
        pass
''')


def test_a_hung_test_fails_with_the_stacks_of_its_tasks_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_hung.py").write_text(HUNG)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.support.watchdog", "-o", "asyncio_mode=auto",
         "-p", "no:cacheprovider", str(tmp_path / "test_hung.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout
    assert "TestHung: " in run.stdout and "test_hung.py::test_hangs ran for more than 1 s" in run.stdout
    # Where the hung task waits, down to the event: not just the test's own frame.
    assert "in never_told" in run.stdout
    assert "locks.py" in run.stdout and "in wait" in run.stdout
