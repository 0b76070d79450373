"""Where the harness keeps what it generates (data, weights, heads, shards, Ray results).

``HARNESS_CACHE_DIR`` if set, else ``.harness-cache`` in the working directory (ignored by
git). Everything under it is reproducible from the code and the spec, and reused.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = ".harness-cache"


def cache_dir() -> Path:
    """The absolute cache root (created on first use)."""
    root = Path(os.environ.get("HARNESS_CACHE_DIR") or DEFAULT_CACHE).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_path(*parts: str) -> Path:
    """A path under the cache root; parent folders are created."""
    path = cache_dir().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
