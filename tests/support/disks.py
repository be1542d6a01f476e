"""Small filesystems the tests fill: a tmpfs mounted (as root) where a cache or a bundle goes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

TIMEOUT = 30.0


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs; None on success, else why it cannot be done here."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True, timeout=TIMEOUT)
    except OSError as exc:
        return f"cannot run mount: {exc}"
    if result.returncode != 0:
        return f"mount -t tmpfs failed: {result.stderr.strip()}"
    return None


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=TIMEOUT)


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=TIMEOUT).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=TIMEOUT)
        pytest.fail(f"{path} was still busy at unmount (a file was kept open); lazily unmounted")
