"""skopeo as the tests drive it: copies into `dir:` layouts, compared file by file."""

from __future__ import annotations

import asyncio
import filecmp
from pathlib import Path


async def skopeo_run(skopeo: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        skopeo, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, f"skopeo {' '.join(args)} failed: {err.decode()}"
    return out.decode()


async def copy(skopeo: str, source: str, destination: Path, all_images: bool) -> None:
    await skopeo_run(skopeo, "copy", *(["--all"] if all_images else []), "--preserve-digests",
                     "--src-tls-verify=false", f"docker://{source}", f"dir:{destination}")


def assert_same_tree(left: Path, right: Path) -> None:
    comparison = filecmp.dircmp(left, right)
    assert sorted(p.name for p in left.iterdir()) == sorted(p.name for p in right.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch} {errors}"
