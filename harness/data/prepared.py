"""A backbone's evaluation images, decoded once: uint8 crops in one array file.

Every method of a backbone is evaluated on the same images, prepared the same way (the list,
the input size, the resize and crop). ``prepare`` decodes each image once, in a thread pool
(PIL releases the GIL while decoding and resizing), applies the evaluation transform up to
the crop and stores the result as uint8 in ``images.npy`` (N x 3 x H x W, about 150 KB an
image at 224 x 224) with ``index.json`` (image ids, labels, list hash) beside it, under
``<cache>/prepared/<hash of what determines the pixels>/``. Every shard, method, run and
retry then reads its images from there (a memory map: ``Prepared.batch``), so an image is
decoded once per backbone and cache, not once per method, run or retry; ``x / 255`` equals
the float tensor the transform would have made (``ToTensor`` divides the same uint8 values).

Decoding is also the check of the images: a file that cannot be decoded under
``on_bad_image: stop`` raises ``DataError`` naming it, before anything else starts.
The folder is written under a temporary name and renamed into place: it exists whole or not
at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness.data.cache import file_lock, stable_hash

INDEX = "index.json"
ARRAY = "images.npy"
VERSION = 2         # 2: index.json records the data set's name and the pixels' digest


class Prepared:
    """A prepared set: ``batch(indices)`` -> float (B, 3, H, W) in [0, 1].

    It also reads like the ``ImageDataset`` it was made from (``ds[i]`` -> (image, label,
    image_id), ``items``, ``ids``, ``labels``, ``path_of``, ``info``, ``classes``), so that the
    tasks of a run (scores, localisation, figures) never decode an image again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = json.loads((self.path / INDEX).read_text())
        self.ids, self.labels = index["ids"], index["labels"]
        self._paths = index["paths"]        # strings: a Path is ~300 bytes more an image
        self.list_hash, self.classes = index["list_hash"], index["classes"]
        self.name = index.get("name", index["kind"])
        self.pixels = index.get("pixels")   # SHA-256 of the decoded pixels (pixels_digest)
        self.info = {"kind": index["kind"], "name": self.name}
        self._array = np.load(self.path / ARRAY, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.batch([i])[0], self.labels[i], self.ids[i]

    @property
    def items(self) -> list[tuple[Path, int, str]]:
        return list(zip(map(Path, self._paths), self.labels, self.ids))

    def path_of(self, i: int) -> Path:
        return Path(self._paths[i])

    def batch(self, indices) -> torch.Tensor:
        """The images at ``indices`` (a contiguous range is read in one slice)."""
        idx = list(indices)
        if idx and idx == list(range(idx[0], idx[-1] + 1)):
            raw = self._array[idx[0]:idx[-1] + 1]
        else:
            raw = self._array[idx]
        return torch.from_numpy(np.array(raw)).float().div_(255)     # a copy: not the map


@dataclass(frozen=True)
class PreparedRef:
    """A prepared set as the evaluation's workers receive it: its folder's name, the list
    hash it was made from and, on a cluster of several nodes, its files in Ray's object store
    (``data``: an object reference to ``{file name: bytes}``). A worker reads the set from
    its node's cache, written from ``data`` on first use: the driver decodes the evaluation
    images once, and no node needs the images themselves (they may be in an object store
    only: ``harness.data.sources``)."""

    name: str
    list_hash: str
    data: Any = None

    def local(self, root: Path) -> "Prepared | None":
        """The set in ``root``'s cache (written there from ``data`` when missing), or None
        when it is missing and there is no data to write it from."""
        dest = Path(root) / "prepared" / self.name
        if not (dest / INDEX).is_file():
            if self.data is None:
                return None
            import ray
            files = ray.get(self.data) if isinstance(self.data, ray.ObjectRef) else self.data
            dest.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(dest.with_name(dest.name + ".lock")):
                if not (dest / INDEX).is_file():
                    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
                    try:
                        for name in (ARRAY, INDEX):          # the index last: the "done" mark
                            (tmp / name).write_bytes(files[name])
                        os.replace(tmp, dest)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
        return Prepared(dest)


def ref_of(prepared: "Prepared", ship: bool) -> PreparedRef:
    """``prepared`` as a ``PreparedRef``; ``ship``: its files put in Ray's object store once
    (a cluster of several nodes)."""
    data = None
    if ship:
        import ray
        data = ray.put({name: (prepared.path / name).read_bytes() for name in (ARRAY, INDEX)})
    return PreparedRef(prepared.path.name, prepared.list_hash, data)


def identity(images, list_hash: str, files: str | None = None) -> dict:
    """What determines the prepared pixels: the image set, the list it resolved to and the
    digest of the files listed (names, sizes, modification times: a file changed under the
    same name is decoded again)."""
    out = {"images": images.identity(), "list": list_hash, "version": VERSION}
    if files is not None:
        out["files"] = files
    return out


def folder(root: Path, images, list_hash: str, files: str | None = None) -> Path:
    """The prepared set's folder (the same on every node for the same images)."""
    return Path(root) / "prepared" / stable_hash(identity(images, list_hash, files), 16)


def pixels_digest(array: np.ndarray) -> str:
    """16 hex digits of SHA-256 over the decoded pixels: what a shard's identity names."""
    h = hashlib.sha256()
    step = max(1, (64 << 20) // max(1, array[0].nbytes if len(array) else 1))
    for start in range(0, len(array), step):
        h.update(np.ascontiguousarray(array[start:start + step]).tobytes())
    return h.hexdigest()[:16]


def prepare(images, dataset, root: Path, workers: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> Prepared:
    """The prepared set of ``dataset`` (an ``ImageDataset`` built from ``images``), decoding
    every image once on first use (see the module docstring)."""
    dest = folder(root, images, dataset.list_hash, dataset.info.get("files"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(dest.name + ".lock")):
        if not (dest / INDEX).is_file():
            for stale in dest.parent.glob(f".{dest.name}.*"):     # a killed writer's
                shutil.rmtree(stale, ignore_errors=True)
            _write(images, dataset, dest, workers or min(8, os.cpu_count() or 1), progress)
    return Prepared(dest)


def _write(images, dataset, dest: Path, workers: int, progress) -> None:
    from harness.data.images import make_transform
    info = dataset.info
    kind, crop = info.get("kind", images.kind), tuple(info.get("crop", images.input_size))
    transform = make_transform(crop, False, kind, info.get("resize"),
                               getattr(images, "interpolation", "bilinear"), as_uint8=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        array = np.lib.format.open_memmap(tmp / ARRAY, mode="w+", dtype=np.uint8,
                                          shape=(len(dataset), 3, *crop))

        def one(i: int) -> int:
            array[i] = transform(dataset.load(i)).numpy()
            return i

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done, _ in enumerate(pool.map(one, range(len(dataset))), 1):
                if progress and (done % 64 == 0 or done == len(dataset)):
                    progress(done, len(dataset))
        array.flush()
        (tmp / INDEX).write_text(json.dumps({
            "ids": [str(i) for i in dataset.ids], "labels": [int(v) for v in dataset.labels],
            "paths": [str(dataset.path_of(i)) for i in range(len(dataset))],
            "list_hash": dataset.list_hash, "kind": kind, "classes": dataset.classes,
            "name": dataset.name, "pixels": pixels_digest(array)}))
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
