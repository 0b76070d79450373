"""Where the harness keeps what it generates (data, weights, heads, shards, Ray results).

The spec's ``storage.uri`` if given (``use_storage`` applies it), else ``HARNESS_CACHE_DIR``
if set, else ``.harness-cache`` in the working directory (ignored by git). Everything under
it is reproducible from the code and the spec, and reused.

Under ``ray job submit --working-dir .`` the job's working directory is Ray's temporary copy
of the project (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), deleted with the
job: a default relative to it would lose every result and recompute everything on the next
submit. ``check_persistent`` refuses such defaults (exit 2) and says what to set instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from harness.errors import UserError

DEFAULT_CACHE = ".harness-cache"
CACHE_ENV = "HARNESS_CACHE_DIR"


class LocationError(UserError):
    """Results would be written where they do not outlive the process (see the module doc)."""


def inside_ray_job() -> bool:
    """True in the driver of a ``ray job submit`` job (Ray sets this variable for it)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def use_storage(uri: str | os.PathLike | None, cache: str | os.PathLike | None = None) -> None:
    """Set the cache of this process and of the Ray workers it starts: the spec's
    ``storage.cache`` if given; else ``HARNESS_CACHE_DIR`` if set; else a local
    ``storage.uri`` (one folder keeps everything on a single machine); else the default. A
    remote storage (``s3://...``) keeps only the results; the cache stays node-local
    (``harness.data.storage``)."""
    if cache is not None or (uri is not None and "://" not in str(uri)
                             and not os.environ.get(CACHE_ENV)):
        os.environ[CACHE_ENV] = str(planned_cache(uri, cache))


def planned_cache(uri: str | os.PathLike | None, cache: str | os.PathLike | None = None) -> Path:
    """The cache folder ``use_storage(uri, cache)`` would choose, without choosing it."""
    if cache is not None:
        return Path(cache).expanduser().resolve()
    if uri is not None and "://" not in str(uri) and not os.environ.get(CACHE_ENV):
        return Path(uri).expanduser().resolve()
    return current_cache()


def current_cache() -> Path:
    """The cache root this process uses now: ``HARNESS_CACHE_DIR``, else the default."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_persistent(tracking_uri: str) -> None:
    """Inside a Ray job, refuse a cache or MLflow store inside Ray's temporary working
    directory (where the defaults, and any relative path, would put them)."""
    if not inside_ray_job():
        return
    cwd, missing = Path.cwd().resolve(), []
    if _inside(current_cache(), cwd):
        missing.append(f"storage.uri=/absolute/folder (results and cache) or storage.cache="
                       f"/absolute/node-local/folder (or {CACHE_ENV}) with storage.uri=s3://...")
    local_store = tracking_uri.split(":///", 1)[1] if tracking_uri.startswith(
        ("sqlite:///", "file:///")) else (tracking_uri if "://" not in tracking_uri else None)
    if local_store is not None and _inside(Path(local_store).expanduser().resolve(), cwd):
        missing.append("tracking.uri=http://<mlflow server>:5000 (or MLFLOW_TRACKING_URI)")
    if missing:
        raise LocationError(
            f"running as a Ray job: the working directory {cwd} is Ray's temporary copy of "
            "the project and is deleted with the job, so a cache or MLflow store there would "
            "be lost (and every submit would recompute everything). Set "
            + " and ".join(missing) + ", e.g. as key=value overrides after the spec "
            "(see the README's 'On a Ray cluster').")


def cache_dir() -> Path:
    """The absolute cache root (created on first use)."""
    root = current_cache()
    root.mkdir(parents=True, exist_ok=True)
    return root




def stable_hash(obj: Any, n: int = 12) -> str:
    """A short hash of JSON-able data (key order does not matter): cache identities."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_hash(path: str | Path) -> str:
    """16 hex digits of SHA-256 over a file's bytes (a head checkpoint in a shard identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def content_digest(path: str | Path) -> str:
    """``file_hash`` of ``path``, remembered by (absolute path, size, modification time) in
    the cache (``digests/``), so that a 528 MB weights file is hashed once, not every run;
    a file changed under the same name has another size or time and is hashed again."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    memo = cache_dir() / "digests" / f"{key}.json"
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and known.get("digest"):
            return known["digest"]
    except (OSError, ValueError):
        pass
    digest = file_hash(path)
    write_text_atomic(memo, json.dumps({**stamp, "digest": digest}))
    return digest


def file_lock(path: str | Path) -> FileLock:
    """An exclusive lock (``filelock``) held while a shared input is built: the quickstart
    data set, an embedded backbone's weights. Use as ``with file_lock(path): ...``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, for every
    thread): Linux's /proc, else the common 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def temporary_file(folder: str | Path, name: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` (hidden, ``.<name>.<random><suffix>``), with the
    permissions an ``open()`` would give the file (0666 less the umask) instead of
    mkstemp's 0600: results renamed into place (shards, reports, weights, MLflow's copies of
    them) stay readable by whoever may read the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` in one step, so that readers see the old file or the whole new one.

    ``write(tmp)`` fills a hidden temporary file in the same folder (``.<name>.<random>.tmp``:
    writers that pick a format by suffix must name it); ``os.replace`` then renames it into
    place. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = temporary_file(path.parent, path.name)
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
