"""Images in an object store: ``data.root: s3://bucket/prefix`` (or ``gs://...``), read through
``pyarrow.fs`` with the credentials of the results storage (``harness.data.storage``: for
S3 ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; options such as
``?endpoint_override=host:port&scheme=http`` in the URI's query).

The folder has the layout of any image-classification folder (``harness.data.folders``):
``classes.txt``, ``train/<class>/<image>``, ``val/<class>/<image>``. ``RemoteFolder`` lists a
split in one recursive listing (names, sizes and modification times: the listing's digest
identifies the images as a local folder's does) and reads an image's bytes on demand:

- the **evaluation** set is read and decoded once, by the driver, into its prepared set
  (``harness.data.prepared``), which reaches the evaluation's workers on every node through
  Ray's object store: no node reads the images again;
- the **training** images stream from the store into the Ray Train workers' DataLoader
  processes (each opens its own connection), decoded on the nodes that train: no node needs
  a copy of the data set. The crops and flips are drawn as from a local folder (the same
  transform, the same seeded draws), so a head trained from the store equals one trained
  from a local copy of the same files.

Localisation metrics (boxes, masks) are read from local folders only: on an object store
their columns are left empty (NaN).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cached_property

from harness.data.folders import CLASSES_FILE, ClassList, DataError, is_image
from harness.data.items import ImageList


def is_remote(root) -> bool:
    """Whether ``root`` names an object store (``scheme://...``) rather than a folder."""
    return root is not None and "://" in str(root)


@dataclass(frozen=True)
class RemoteFolder:
    """A data-set folder in an object store (see the module docstring); picklable (its URI)."""

    uri: str

    @cached_property
    def _fs_base(self):
        import pyarrow.fs as pafs
        try:
            fs, base = pafs.FileSystem.from_uri(self.uri)
        except Exception as err:          # unknown scheme, malformed URI
            raise DataError(f"data.root: {self.uri!r} is not a location pyarrow reads "
                            f"({type(err).__name__}: {err})") from None
        return fs, base.rstrip("/")

    @property
    def fs(self):
        return self._fs_base[0]

    @property
    def base(self) -> str:
        return self._fs_base[1]

    def __getstate__(self):
        return {"uri": self.uri}

    def __setstate__(self, state):
        object.__setattr__(self, "uri", state["uri"])

    def info(self, rel: str):
        try:
            return self.fs.get_file_info(f"{self.base}/{rel}".rstrip("/"))
        except OSError as err:            # credentials, endpoint, permissions
            raise DataError(f"data.root: cannot read {self.uri} ({err}): check the object "
                            "store's credentials and endpoint") from None

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs
        return self.info(rel).type == pafs.FileType.Directory

    def read(self, path: str) -> bytes:
        """The bytes of ``path`` (a path in the store: ``ImageList`` holds them)."""
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def class_keys(self, classes_file: str | None = None) -> tuple[list[str], str] | None:
        """The class list: ``classes_file`` (a local file), else ``classes.txt`` in the store;
        None when neither exists (then the class folders' names)."""
        from pathlib import Path

        from harness.data.folders import parse_classes, read_classes
        if classes_file:
            return read_classes(Path(classes_file)), str(classes_file)
        import pyarrow.fs as pafs
        if self.info(CLASSES_FILE).type != pafs.FileType.File:
            return None
        where = f"{self.uri.split('?')[0]}/{CLASSES_FILE}"
        return parse_classes(self.read(f"{self.base}/{CLASSES_FILE}").decode("utf-8"), where), where

    def scan(self, split: str, classes_file: str | None = None,
             ) -> tuple[ImageList, ClassList, str]:
        """Every image of ``split`` (``<split>/<class>/<image>``), the class list, and the
        digest of the listing (names, sizes, modification times)."""
        import pyarrow.fs as pafs
        root = f"{self.base}/{split}"
        if not self.is_dir(split):
            raise DataError(f"data.root: {self.uri.split('?')[0]}/{split} does not exist "
                            f"(expected {split}/<class>/<image> in the store)")
        listing = self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted((f.path[len(root) + 1:], f.size, f.mtime_ns or 0) for f in listing
                       if f.type == pafs.FileType.File)
        found = [(rel, size, mtime) for rel, size, mtime in files
                 if rel.count("/") == 1 and is_image(rel.split("/")[1])]
        folders = sorted({rel.split("/")[0] for rel, _, _ in found})
        given = self.class_keys(classes_file)
        keys, source = given if given else (folders, f"the class folders of {self.uri}")
        classes = ClassList(tuple(keys), tuple(keys), source)
        digest = hashlib.sha256()
        entries = []
        for rel, size, mtime in sorted(found, key=lambda f: (classes.index(
                f[0].split("/")[0], f"{self.uri}/{split}"), f[0])):
            digest.update(f"{rel}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
            entries.append((f"{root}/{rel}", classes.index(rel.split("/")[0], split), rel))
        if not entries:
            raise DataError(f"data.root: {self.uri.split('?')[0]}/{split} holds no images in "
                            "class folders")
        return ImageList.of(root, entries), classes, digest.hexdigest()[:16]


def decode(data: bytes, where: str):
    """An RGB PIL image from encoded bytes; ``DataError`` naming ``where`` when it cannot."""
    from PIL import Image

    from harness.data.images import as_rgb
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return as_rgb(img)
    except Exception as err:
        raise DataError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from None
