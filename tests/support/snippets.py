"""Client configuration snippets, read from the README: the text users copy is the text tested."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
PLACEHOLDER = "mirror.local:5000"
_SNIPPET_RE = re.compile(r"<!-- snippet: (?P<name>\S+) -->\n```\w*\n(?P<body>.*?)```", re.DOTALL)


def snippet(name: str, mirror_host: str) -> str:
    """The README snippet called `name`, pointed at the mirror at `mirror_host` (HOST:PORT)."""
    found = {m["name"]: m["body"] for m in _SNIPPET_RE.finditer(README.read_text())}
    if name not in found:
        raise KeyError(f"README.md has no snippet {name!r} (it has {sorted(found)})")
    body = found[name]
    assert PLACEHOLDER in body, f"snippet {name!r} does not name {PLACEHOLDER}"
    return body.replace(PLACEHOLDER, mirror_host)
