"""A data set's list of images, compact: paths, labels and ids in numpy arrays.

ImageNet's training split lists 1.28M images. As a Python list of ``(Path, int, str)`` tuples
it held 593 MiB in every process that has the data set (the driver, each Ray Train worker,
each Tune trial, and each DataLoader worker it was copied into). ``ImageList`` keeps the
same information in three arrays:

- the paths relative to ``root``, UTF-8 bytes one after another in one ``uint8`` array, with
  the end offset of each in an ``int64`` array (an absolute path is stored whole:
  ``os.path.join(root, rel)`` leaves it as it is);
- the labels, ``int32``;
- the image ids in the same form as the paths, or nothing when every id is its relative path
  (a folder scan: ``n01440764/x.JPEG``).

That is about 45 bytes an ImageNet image (``nbytes``; ``python -m harness bench --items``
measures it at 1.28M), pickled as a few arrays (a Train worker receives them in one copy)
and shared page by page with forked DataLoader workers (no reference counts on the pages).
``items[i]`` is still ``(Path, label, image_id)``; ``take(indices)`` is a subset.
"""
from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np


class _Packer:
    """Texts appended one after another as UTF-8 bytes, with the end offset of each."""

    def __init__(self):
        self.blob, self.ends, self.total = bytearray(), array("q"), 0

    def add(self, raw: bytes) -> None:
        self.blob += raw
        self.total += len(raw)
        self.ends.append(self.total)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.frombuffer(bytes(self.blob), dtype=np.uint8),
                np.frombuffer(self.ends.tobytes(), dtype=np.int64))


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _unpack(blob: np.ndarray, ends: np.ndarray, i: int) -> str:
    start = int(ends[i - 1]) if i else 0
    return blob[start:int(ends[i])].tobytes().decode("utf-8", "surrogateescape")


def _take(blob: np.ndarray, ends: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate([[0], ends[:-1]])[idx]
    stops = ends[idx]
    lengths = stops - starts
    if not len(idx):
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    gather = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    positions = np.arange(int(lengths.sum()), dtype=np.int64) + gather
    return blob[positions], np.cumsum(lengths).astype(np.int64)


class ImageList(Sequence):
    """``(path, label, image_id)`` of every image of a data set, in compact arrays (see the
    module docstring). Build one with ``ImageList.of(root, entries)``."""

    def __init__(self, root: str, paths: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
                 ids: tuple[np.ndarray, np.ndarray] | None = None):
        self.root = str(root)
        self._paths, self._ids = paths, ids
        self._labels = np.asarray(labels, dtype=np.int32)

    @classmethod
    def of(cls, root: str | Path, entries: Iterable[tuple[str | Path, int, str]]) -> "ImageList":
        """From ``(path, label, image_id)`` entries; paths under ``root`` are kept relative."""
        root = str(root)
        prefix = root.rstrip(os.sep) + os.sep
        rels, ids, labels, same = _Packer(), _Packer(), array("i"), True
        for path, label, image_id in entries:      # streamed: no list of the entries
            text = str(path)
            rel = _encode(text[len(prefix):] if text.startswith(prefix) else text)
            image_id = _encode(str(image_id))
            rels.add(rel)
            ids.add(image_id)
            labels.append(int(label))
            same = same and rel == image_id
        return cls(root, rels.arrays(), np.frombuffer(labels.tobytes(), dtype=np.int32),
                   None if same else ids.arrays())

    def __len__(self) -> int:
        return len(self._labels)

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return i % n if n else i

    def path(self, i: int) -> Path:
        return Path(os.path.join(self.root, _unpack(*self._paths, self._index(i))))

    def label(self, i: int) -> int:
        return int(self._labels[self._index(i)])

    def image_id(self, i: int) -> str:
        i = self._index(i)
        return _unpack(*(self._ids or self._paths), i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.path(i), self.label(i), self.image_id(i)

    def __iter__(self) -> Iterator[tuple[Path, int, str]]:
        return (self[i] for i in range(len(self)))

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return [self.image_id(i) for i in range(len(self))]

    def take(self, indices: Iterable[int]) -> "ImageList":
        """The images at ``indices``, in that order."""
        idx = np.asarray(list(indices), dtype=np.int64)
        return ImageList(self.root, _take(*self._paths, idx), self._labels[idx],
                         None if self._ids is None else _take(*self._ids, idx))

    @property
    def nbytes(self) -> int:
        """The bytes its arrays hold."""
        parts = [*self._paths, self._labels, *(self._ids or ())]
        return sum(int(a.nbytes) for a in parts)


def as_image_list(items: Sequence, root: str | Path | None = None) -> ImageList:
    """``items`` (an ``ImageList``, or ``(path, label, image_id)`` tuples) as an ImageList."""
    if isinstance(items, ImageList):
        return items
    items = list(items)
    if root is None:
        parents = {str(Path(p).parent) for p, _, _ in items}
        root = os.path.commonpath(list(parents)) if parents else ""
    return ImageList.of(root, items)
