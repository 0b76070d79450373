"""Image-classification folders: their images, their classes, and what identifies them.

Any data set in this layout can be benchmarked (``data.kind: folder``; docs/datasets.md)::

    root/classes.txt              optional: the class names, one a line, in label order
    root/train/<class>/<image>    the training split (L-CAM heads), one folder per class
    root/val/<class>/<image>      the evaluation split (or flat, named by a list file)
    root/val/annotations.json     optional: {"<class>/<file>": {"box": [x0, y0, x1, y1]}}
    root/val/<class>/<stem>.mask.png   optional: the object's mask beside its image (0/255)

**Classes.** The label of an image is the index of its class in the class list: the file
``data.classes`` if given, else ``root/classes.txt`` if there is one, else the class folders'
names sorted (torchvision's ImageFolder order; for ImageNet the sorted WordNet ids, which is
ILSVRC's order). A class folder that the list does not name is an error, as is a list label
outside it. ``ClassList.names`` are what tables and figures show (for ImageNet the readable
names of torchvision's weights metadata, for the wnid folders).

**Listing.** ``scan`` walks a split into an ``ImageList`` (``harness.data.items``) and the
digest of its listing: every image's name, size and modification time. The digest stands for
the folder's content in cache keys (a file changed under the same name changes it) without
reading the images: a training split of 1.28M files is listed, not hashed.

Files named ``*.mask.*`` and hidden files are not images.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from harness.data.items import ImageList

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASSES_FILE = "classes.txt"


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was wrong."""


def is_image(name: str) -> bool:
    low = name.lower()
    return low.endswith(IMG_EXTENSIONS) and ".mask." not in low and not low.startswith(".")


def class_dirs(split_root: Path) -> list[str]:
    """The class folders of a split, sorted (none when it is not a folder)."""
    if not Path(split_root).is_dir():
        return []
    return sorted(e.name for e in os.scandir(split_root)
                  if e.is_dir() and not e.name.startswith("."))


@dataclass(frozen=True)
class ClassList:
    """The classes of a data set: ``keys`` index the labels (folder names, in label order),
    ``names`` are shown in tables and figures; ``source`` says where the list came from."""

    keys: tuple[str, ...]
    names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key: str, where: str) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            raise DataError(f"{where}: class folder {key!r} is not in the class list "
                            f"({self.source}: {len(self.keys)} classes). Add it to the list, "
                            "or remove the folder") from None


def read_classes(path: Path) -> list[str]:
    """The class names of a class-list file (``parse_classes``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read the class list ({err.strerror or err})") from None
    return parse_classes(text, str(path))


def parse_classes(text: str, path: str) -> list[str]:
    """The class names of a class list: one a line, blank lines and ``#`` comments ignored;
    a name listed twice is an error (``path`` names the list in messages)."""
    names, seen = [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        if name in seen:
            raise DataError(f"{path}:{n}: class {name!r} is listed twice (first on line "
                            f"{seen[name]})")
        seen[name] = n
        names.append(name)
    if not names:
        raise DataError(f"{path}: the class list names no classes")
    return names


def class_list(root: Path, split_root: Path | None, classes_file: str | Path | None = None,
               display: list[str] | None = None) -> ClassList:
    """The classes of the data set at ``root`` (see the module docstring); ``display``: the
    names to show instead of the keys (same order and length)."""
    path = Path(classes_file).expanduser() if classes_file else root / CLASSES_FILE
    if classes_file or path.is_file():
        keys = read_classes(path)
        source = str(path)
    else:
        keys = class_dirs(split_root) if split_root is not None and split_root.is_dir() else []
        if not keys:
            raise DataError(f"{split_root}: no class folders (expected {split_root}/<class>/"
                            f"<image>) and no {root / CLASSES_FILE}: give data.classes")
        source = f"the class folders of {split_root}"
    names = tuple(display) if display and len(display) == len(keys) else tuple(keys)
    return ClassList(tuple(keys), names, source)


def scan(split_root: Path, classes: ClassList) -> tuple[ImageList, str]:
    """Every image of an ImageFolder-layout split (labels from ``classes``) and the digest
    of the listing (names, sizes, modification times)."""
    folders = class_dirs(split_root)
    if not folders:
        raise DataError(f"{split_root}: no class folders (expected {split_root}/<class>/<image>); "
                        "for a flat folder give a list file")
    labels = {cls: classes.index(cls, str(split_root / cls)) for cls in folders}
    digest = hashlib.sha256()

    def entries():
        for cls in sorted(folders, key=labels.__getitem__):
            for entry in sorted(os.scandir(split_root / cls), key=lambda e: e.name):
                if entry.is_file() and is_image(entry.name):
                    st = entry.stat()
                    digest.update(f"{cls}/{entry.name}\t{st.st_size}\t{st.st_mtime_ns}\n"
                                  .encode("utf-8", "surrogateescape"))
                    yield entry.path, labels[cls], f"{cls}/{entry.name}"

    items = ImageList.of(split_root, entries())
    if not len(items):
        raise DataError(f"{split_root}: the class folders hold no images "
                        f"({', '.join(IMG_EXTENSIONS)})")
    return items, digest.hexdigest()[:16]


def listing_digest(items: ImageList) -> str:
    """The digest of the listed files' names, sizes and modification times (an image
    changed under the same name changes it)."""
    digest = hashlib.sha256()
    for i in range(len(items)):
        path = items.path(i)
        try:
            st = path.stat()
            digest.update(f"{items.image_id(i)}\t{st.st_size}\t{st.st_mtime_ns}\n"
                          .encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{items.image_id(i)}\tmissing\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]
