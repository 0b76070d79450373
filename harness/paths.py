"""Where the harness keeps what it generates (data, weights, heads, shards, Ray results).

``HARNESS_CACHE_DIR`` if set, else ``.harness-cache`` in the working directory (ignored by
git). Everything under it is reproducible from the code and the spec, and reused.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

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


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` in one step, so that readers see the old file or the whole new one.

    ``write(tmp)`` fills a hidden temporary file in the same folder (``.<name>.<random>.tmp``:
    writers that pick a format by suffix must name it); ``os.replace`` then renames it into
    place. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
