"""Where this machine's caches live: each in the directory its own variable names, else in
$XDG_CACHE_HOME/speed/<kind>, else in ~/.cache/speed/<kind>."""

from __future__ import annotations

import os
from pathlib import Path


def cache_directory(kind: str, variable: str) -> Path:
    if os.environ.get(variable):
        return Path(os.environ[variable])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "speed" / kind
