"""Where a run's results are kept: a folder or an object store, through ``pyarrow.fs``.

Two places hold what the harness makes:

- the **cache** (``HARNESS_CACHE_DIR``, ``harness.data.cache``) is node-local: the generated
  quickstart data, the embedded backbones' weights, the prepared (decoded) evaluation images
  and local copies of heads. Every node builds what it needs there, deterministically and
  under a lock, so nothing has to be shared;
- the **storage** (the spec's ``storage.uri``; default: the cache folder) keeps the results:
  shard rows and their summaries, analysis files, trained heads, Ray Train checkpoints, Tune
  results, sweep outputs. It is a local path or any URI ``pyarrow.fs`` reads (``s3://``,
  ``gs://``, ``hdfs://``; S3 options such as ``?endpoint_override=host:port&scheme=http`` in
  the query). Only the driver writes results (the Ray tasks return theirs through Ray's
  object store), and Ray Train and Tune checkpoint there themselves: a cluster needs no
  shared filesystem, only a storage every node reaches for training checkpoints.

Writes are atomic: on a local filesystem a temporary name in the same folder then a rename;
on an object store a single PUT (an object appears whole or not at all).
"""
from __future__ import annotations

import io
import os
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.data.cache import temporary_file


class Storage:
    """The results store of a run (see the module docstring); picklable (its URI only)."""

    def __init__(self, uri: str | os.PathLike):
        text = str(uri)
        self.uri = text if "://" in text else str(Path(text).expanduser().resolve())

    def __reduce__(self):
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    @cached_property
    def _fs_base(self) -> tuple[pafs.FileSystem, str]:
        return pafs.FileSystem.from_uri(self.uri)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._fs_base[0]

    @property
    def base(self) -> str:
        return self._fs_base[1].rstrip("/")

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The storage path of ``parts`` (relative to the storage root)."""
        return "/".join([self.base, *(str(p).strip("/") for p in parts)])

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes) -> str:
        """Write ``path`` in one step (see the module docstring)."""
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.local:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return path
        fd, tmp = temporary_file(parent, Path(path).name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def write_table(self, path: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(path, buf.getvalue())

    def read_table(self, paths) -> pa.Table:
        """The rows of Parquet files, concatenated in the order given."""
        tables = [pq.read_table(p, filesystem=self.fs) for p in paths]
        return pa.concat_tables(tables) if tables else pa.table({})

    def fetch(self, path: str, local_root: Path) -> Path:
        """A local file with the content of ``path``: itself on a local store, else a copy
        under ``local_root`` (downloaded once)."""
        if self.local:
            return Path(path)
        dest = Path(local_root) / "storage" / path.lstrip("/")
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = self.read_bytes(path)
            fd, tmp = temporary_file(dest.parent, dest.name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return dest

    def ray_storage(self, folder: str = "ray_results") -> dict:
        """``RunConfig`` arguments for Ray Train or Tune results under ``folder`` here."""
        if self.local:
            return {"storage_path": self.path(folder)}
        return {"storage_path": self.path(folder), "storage_filesystem": self.fs}
