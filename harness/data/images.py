"""The data layer: image data sets yielding ``(image, label, image_id)`` in [0, 1] pixel space.

``build_dataset`` is what the runner calls::

    ds = build_dataset("imagenet", "val", input_size=224, root="/data/imagenet",
                       list_file="paper")          # the paper's 2,000-image list
    image, label, image_id = ds[0]                 # (3, 224, 224) float in [0, 1], int, str
    ds.list_hash                                   # provenance of what is evaluated

Sources
- **Folders** ``root/{train,val}/<class>/*.<ext>`` (torchvision ImageFolder layout; any
  image-classification folder: ``harness.data.folders`` documents the layout, the class
  list and the optional boxes and masks). The label is the class's index in the class list:
  ``data.classes``, else ``root/classes.txt``, else the sorted class folder names (for
  ImageNet, sorted wnids, as ImageFolder and ILSVRC). ``image_id`` is the path relative to
  the split folder (``n01440764/x.JPEG``). The image list is compact (``harness.data.items``).
- **A list file** in the format of the paper's ``Evaluation_2000.txt`` (shipped as
  ``PAPER_LIST``; ``list_file="paper"`` names it): one ``<file name> <label>`` a line; blank
  lines and ``#`` comments are ignored; a name listed twice is an error. Names resolve under
  ``root/<split>``, either directly (flat folder, or a name with its class folder) or inside
  any class folder below it. ``image_id`` is the name as written.

Preprocessing (docs/protocol.md section 3), derived from the backbone's ``input_size``: eval =
shorter side to ``resize`` (bilinear), center crop ``input_size``, to [0, 1], *no*
normalisation (backbones normalise inside); train = shorter side to ``resize``, random crop,
horizontal flip. For ``imagenet``, ``resize = round(input_size * 256 / 224)`` (224 -> 256,
the paper's recipe; 64 -> 73), unless the backbone's weights bring their own
(``backbones.preprocessing``: ``resize`` and ``interpolation``, e.g. EfficientNet-B3's 320,
bicubic, for its 300 crop; the plan passes them). For ``quickstart`` the images are generated at the embedded
backbones' size, so ``resize = input_size`` (no crop: nothing of the planted cue in the corner
is cut away; the train transform then only flips, which mirrors the cue to the top-right
corner in half of the draws). ``resize=`` overrides the rule.

Subsets: ``random_count=N`` draws N images with ``numpy.random.default_rng(seed)`` without
replacement (kept in list order), then ``limit`` keeps ``limit`` of them spread over the
classes (``spread``: the first image of every class, then the second of every class, ...;
kept in list order), so that a small limit on a class-sorted folder is not one class.

Identity: ``ds.list_hash`` (image ids and labels, in order) and ``ds.info["files"]``, the
digest of the listed files' names, sizes and modification times: an image changed under the
same name changes it, and with it every cache key made from the images.

Bad input raises ``DataError`` naming the file (and ``file:line`` for list files): a missing
root or split folder, a malformed list line, a listed file that does not exist, an image that
cannot be decoded (corrupt or truncated). Grayscale, CMYK, palette and RGBA images are
converted to RGB. With ``on_bad_image="skip"`` every selected evaluation image is decoded once
when the data set is built and bad ones (missing or undecodable) are left out and counted
(``ds.skipped``, ``ds.bad``), so that ``len(ds)`` is exact before evaluation starts. A training
set is not decoded up front (ImageNet's train split is 1.28M files): under "skip" an image that
fails to decode is replaced by the next one that decodes (deterministic) and a warning names it.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from harness.data.folders import (CLASSES_FILE, IMG_EXTENSIONS, ClassList, DataError, class_dirs,
                                  class_list, listing_digest, scan)
from harness.data.items import ImageList, as_image_list
from harness.data.sources import is_remote

PAPER_LIST = Path(__file__).resolve().parent / "lists" / "Evaluation_2000.txt"
KINDS = ("quickstart", "folder", "imagenet")
SPLITS = ("train", "val")
ON_BAD_IMAGE = ("stop", "skip")
RESIZE_RATIO = 256 / 224


def _side(input_size) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = (int(v) for v in input_size)
    return h, w


def sizes_for(input_size, kind: str = "imagenet") -> tuple[int, tuple[int, int]]:
    """``(resize, (crop_h, crop_w))`` for a backbone's input size (see the module doc)."""
    crop = _side(input_size)
    if kind == "quickstart":
        return min(crop), crop
    return int(round(min(crop) * RESIZE_RATIO)), crop


def make_transform(input_size, train: bool = False, kind: str = "imagenet",
                   resize: int | None = None, interpolation: str = "bilinear",
                   as_uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> (3, H, W) float tensor in [0, 1], the paper's eval or train recipe
    (``resize``, ``interpolation``: a backbone's own, from its weights' transforms).
    ``as_uint8``: the same pixels as a uint8 tensor (x / 255 is the float one, exactly)."""
    default_resize, crop = sizes_for(input_size, kind)
    resize = int(resize or default_resize)
    steps = [T.Resize(resize, interpolation=T.InterpolationMode(interpolation))]
    if train:
        steps += [T.RandomCrop(crop), T.RandomHorizontalFlip()]
    else:
        steps += [T.CenterCrop(crop)]
    return T.Compose(steps + [T.PILToTensor() if as_uint8 else T.ToTensor()])


def as_rgb(img: Image.Image) -> Image.Image:
    """A decoded image as RGB (grayscale, 16-bit, CMYK, palette and RGBA converted)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grayscale
        arr = np.asarray(img, dtype=np.float64)
        arr = 255.0 * arr / max(arr.max(), 1.0)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully as RGB; ``DataError`` naming the file when it cannot."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return as_rgb(img)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ...
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


def read_list_file(path: str | Path) -> list[tuple[str, int, int]]:
    """Parse an Evaluation_2000-style list: ``[(name, label, line_number), ...]``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise DataError(f"{path}: cannot read list file ({err.strerror or err})") from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected '<file name> <label>', found {raw.strip()!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{path}:{n}: label {parts[1]!r} is not an integer "
                            f"(line {raw.strip()!r})") from None
        if label < 0:
            raise DataError(f"{path}:{n}: label {label} is negative")
        out.append((parts[0], label, n))
    if not out:
        raise DataError(f"{path}: the list file names no images")
    return out


def list_hash(entries: Iterable[tuple[str, int]]) -> str:
    """A stable 16-hex-digit hash of an evaluation list: its (image_id, label) pairs in order."""
    h = hashlib.sha256()
    for image_id, label in entries:
        h.update(f"{image_id}\t{int(label)}\n".encode())
    return h.hexdigest()[:16]


def resolve_list(list_path: Path, split_root: Path, classes: ClassList | None,
                 on_bad_image: str = "stop",
                 entries: list[tuple[str, int, int]] | None = None):
    """Resolve a list file under ``split_root``: ``(items, missing)``.

    ``entries`` (from ``read_list_file``, possibly a selection of them) default to the whole
    file; a name listed twice, or a label outside ``classes``, is an error naming the line.
    """
    if entries is None:
        entries = read_list_file(list_path)
    folders = class_dirs(split_root)
    index: dict[str, Path] | None = None
    items, missing, seen = [], [], {}
    for name, label, line in entries:
        if name in seen:
            raise DataError(f"{list_path}:{line}: {name!r} is listed twice (first on line "
                            f"{seen[name]}): every image is evaluated once")
        seen[name] = line
        path = split_root / name
        if not path.is_file():
            if index is None:   # one pass over the class folders, built on first need
                index = {}
                for cls in folders:
                    for entry in os.scandir(split_root / cls):
                        index.setdefault(entry.name, Path(entry.path))
            path = index.get(name, path)
        if classes is not None and label >= len(classes):
            raise DataError(f"{list_path}:{line}: label {label} is out of range: the data set "
                            f"has {len(classes)} classes ({classes.source})")
        if not path.is_file():
            if on_bad_image == "stop":
                raise DataError(f"{list_path}:{line}: {name!r} not found under {split_root} "
                                "(flat or in a class folder)")
            missing.append((split_root / name, f"{list_path}:{line}: {name!r} not found"))
            continue
        items.append((path, label, name))
    return ImageList.of(split_root, items), missing


class ImageDataset(Dataset):
    """A map-style data set of ``(image (3,H,W) in [0,1], label, image_id)``.

    ``items`` is an ``ImageList`` of ``(path, label, image_id)`` (compact arrays:
    ``harness.data.items``); ``bad`` lists ``(path, reason)`` of images left out under
    ``on_bad_image="skip"`` and ``skipped`` counts them. ``classes`` are the class names
    (``class_list``: its keys index the labels, its names are shown), ``name`` the data
    set's name in tables and MLflow. ``describe()`` gives the provenance record.
    """

    def __init__(self, items, transform: Callable, classes: ClassList | list[str] | None = None,
                 on_bad_image: str = "stop", bad: list[tuple[Path, str]] | None = None,
                 info: dict | None = None, source=None):
        if on_bad_image not in ON_BAD_IMAGE:
            raise DataError(f"on_bad_image: {on_bad_image!r} is not one of {ON_BAD_IMAGE}")
        self.items = as_image_list(items)
        self.transform = transform
        if isinstance(classes, (list, tuple)):
            classes = ClassList(tuple(classes), tuple(classes), "given")
        self.class_list = classes
        self.on_bad_image = on_bad_image
        self.bad = list(bad or [])
        self.info = dict(info or {})
        self.source = source                 # a RemoteFolder for images in an object store
        self._warned: set[str] = set()

    def load(self, i: int) -> Image.Image:
        """Image ``i`` decoded as RGB (from its file, or from the object store)."""
        path = self.items.path(i)
        if self.source is None:
            return load_image(path)
        from harness.data.sources import decode
        try:
            data = self.source.read(str(path))
        except OSError as err:
            raise DataError(f"{self.source.uri.split('?')[0]}: cannot read {path} ({err})") \
                from None
        return decode(data, str(path))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        for step in range(n):
            path, label, image_id = self.items[(i + step) % n]
            try:
                return self.transform(self.load((i + step) % n)), label, image_id
            except DataError as err:
                if self.on_bad_image == "stop":
                    raise
                if str(path) not in self._warned:
                    self._warned.add(str(path))
                    warnings.warn(f"skipped (data.on_bad_image: skip): {err}", stacklevel=2)
        raise DataError(f"no image of this data set ({self.info.get('source')}) can be decoded")

    @property
    def classes(self) -> list[str] | None:
        """The class names shown (label order), or None."""
        return list(self.class_list.names) if self.class_list else None

    @property
    def name(self) -> str:
        return self.info.get("name") or self.info.get("kind", "data")

    @property
    def skipped(self) -> int:
        return len(self.bad)

    @property
    def ids(self) -> list[str]:
        return self.items.ids()

    @property
    def labels(self) -> list[int]:
        return self.items.labels.tolist()

    @property
    def list_hash(self) -> str:
        return list_hash(zip(self.items.ids(), self.items.labels.tolist()))

    def path_of(self, i: int) -> Path:
        return self.items.path(i)

    def verify(self, workers: int | None = None) -> "ImageDataset":
        """Decode every image once: drop and count bad ones ("skip") or raise ("stop")."""
        workers = workers or min(8, os.cpu_count() or 1)

        def check(i: int):
            try:
                self.load(i)
                return None
            except DataError as err:
                return str(err)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(check, range(len(self.items))))
        good = []
        for i, problem in enumerate(problems):
            if problem is None:
                good.append(i)
            elif self.on_bad_image == "stop":
                raise DataError(problem)
            else:
                self.bad.append((self.items.path(i), problem))
        self.items = self.items.take(good)
        return self

    def describe(self) -> dict:
        """Provenance: source, selection, preprocessing, size, list hash, skipped files."""
        return {**self.info, "images": len(self), "list_hash": self.list_hash,
                "skipped": self.skipped, "on_bad_image": self.on_bad_image}


def spread(labels: Sequence[int], n: int) -> list[int]:
    """``n`` positions spread over the classes, in list order: the first image of each class
    (classes in the order they first appear), then the second of each, and so on; the
    positions are returned sorted (the selection keeps the list's order)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    picked, depth = [], 0
    queues = list(by_class.values())
    while len(picked) < n:
        layer = [q[depth] for q in queues if depth < len(q)]
        if not layer:
            break
        picked += layer[:n - len(picked)]
        depth += 1
    return sorted(picked)


def select(items, random_count: int | None = None, limit: int | None = None,
           seed: int = 0, where: str = "data"):
    """A seeded draw of ``random_count`` items (kept in order), then ``limit`` of them spread
    over the classes (``spread``). ``items``: an ``ImageList`` or a list of entries whose
    second field is the label."""
    def take(indices):
        return items.take(indices) if isinstance(items, ImageList) else [items[i] for i in indices]

    if random_count is not None:
        if int(random_count) <= 0:
            raise DataError(f"{where}: random_count must be positive, got {random_count}")
        if random_count > len(items):
            raise DataError(f"{where}: random_count {random_count} exceeds the {len(items)} "
                            "images available")
        picked = np.random.default_rng(seed).choice(len(items), int(random_count), replace=False)
        items = take(sorted(picked.tolist()))
    if limit is not None:
        if int(limit) <= 0:
            raise DataError(f"{where}: limit must be positive, got {limit}")
        labels = items.labels if isinstance(items, ImageList) else [it[1] for it in items]
        if int(limit) < len(items):
            items = take(spread(labels, int(limit)))
    return items


def _class_names(kind: str, keys: list[str]) -> list[str] | None:
    """Readable names for ImageNet's wnid folders (torchvision's weights metadata)."""
    if kind != "imagenet" or len(keys) != 1000:
        return None
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def build_dataset(kind: str, split: str, input_size, root: str | Path | None = None,
                  list_file: str | Path | None = None, random_count: int | None = None,
                  limit: int | None = None, seed: int = 0, on_bad_image: str = "stop",
                  train: bool = False, resize: int | None = None,
                  interpolation: str = "bilinear", classes: str | Path | None = None,
                  name: str | None = None) -> ImageDataset:
    """Build the data set the runner evaluates or trains on (see the module doc).

    ``kind``: ``quickstart`` (generated on first use when ``root`` is None; ``val`` defaults to
    its list file), ``folder`` (any image-classification folder: ``harness.data.folders``)
    or ``imagenet`` (a folder with ILSVRC's classes). ``list_file``: a path, or ``"paper"``
    for the shipped ``Evaluation_2000.txt``; ``classes``: a class-list file; ``train`` selects
    the augmenting transform; ``name``: the data set's name (default: the kind, or the
    folder's name for ``folder``).
    """
    if kind not in KINDS:
        raise DataError(f"data.kind: {kind!r} is not one of {', '.join(KINDS)}")
    if split not in SPLITS:
        raise DataError(f"data.split: {split!r} is not one of {', '.join(SPLITS)}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise DataError(f"data.on_bad_image: {on_bad_image!r} is not one of {ON_BAD_IMAGE}")
    if kind == "quickstart":
        from harness.data.quickstart import LIST_FILE, ensure_quickstart
        root = ensure_quickstart() if root is None else root
        if split == "val" and list_file is None and (Path(root) / LIST_FILE).is_file():
            list_file = Path(root) / LIST_FILE
    if root is None:
        raise DataError(f"data.root: the {kind} data set needs a root folder holding "
                        f"{'/'.join(SPLITS)}/<class>/<image>")
    if is_remote(root):
        return _remote_dataset(kind, split, input_size, str(root), list_file, random_count,
                               limit, seed, on_bad_image, train, resize, interpolation,
                               classes, name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist or is not a folder")
    split_root = root / split
    if not split_root.is_dir():
        if list_file is not None and split == "val":
            split_root = root       # a flat folder of val images named by the list
        else:
            raise DataError(f"data.root: {split_root} does not exist (expected "
                            f"{root}/{split}/<class>/<image>)")
    train_root = root / "train"
    class_root = split_root if class_dirs(split_root) else train_root
    known = class_list(root, class_root, classes) if (classes or (root / CLASSES_FILE).is_file()
                                                      or class_dirs(class_root)) else None
    if known is not None and kind == "imagenet":
        known = class_list(root, class_root, classes, _class_names(kind, list(known.keys)))
    missing: list[tuple[Path, str]] = []
    if list_file is not None:
        list_path = PAPER_LIST if str(list_file) == "paper" else Path(list_file).expanduser()
        entries = select(read_list_file(list_path), random_count, limit, seed,
                         f"data ({list_path})")
        items, missing = resolve_list(list_path, split_root, known, on_bad_image, entries)
        source, listing = str(list_path), None
    else:
        if known is None:
            raise DataError(f"{split_root}: no class folders (expected {split_root}/<class>/"
                            "<image>); for a flat folder give a list file")
        items, listing = scan(split_root, known)
        source = str(split_root)
        items = select(items, random_count, limit, seed, f"data ({source})")
    res, crop = sizes_for(input_size, kind)
    res = int(resize or res)
    info = {"kind": kind, "name": name or (root.name if kind == "folder" else kind),
            "split": split, "root": str(root), "source": source,
            "list_file": str(list_file) if list_file is not None else None,
            "random_count": random_count, "limit": limit, "seed": seed, "train": train,
            "resize": res, "crop": list(crop),
            "classes": known.source if known is not None else None}
    if interpolation != "bilinear":
        info["interpolation"] = interpolation
    ds = ImageDataset(items, make_transform(input_size, train, kind, res, interpolation),
                      known, on_bad_image, missing, info)
    if on_bad_image == "skip" and not train:
        ds.verify()
    ds.info["files"] = listing if listing is not None and len(ds) == len(items) \
        else listing_digest(ds.items)
    return ds


def _remote_dataset(kind, split, input_size, root: str, list_file, random_count, limit, seed,
                    on_bad_image, train, resize, interpolation, classes, name) -> ImageDataset:
    """``build_dataset`` of a folder in an object store (``harness.data.sources``): its
    split listed at once; the images are read when decoded."""
    from harness.data.sources import RemoteFolder
    if list_file is not None:
        raise DataError("data.list_file: a list file selects images of a local folder; with "
                        f"data.root {root.split('?')[0]} give the split's class folders "
                        "(data.limit and data.random_count select from them)")
    source = RemoteFolder(root)
    items, known, listing = source.scan(split, classes)
    if kind == "imagenet":
        known = ClassList(known.keys, tuple(_class_names(kind, list(known.keys))
                                            or known.keys), known.source)
    items = select(items, random_count, limit, seed, f"data ({root.split('?')[0]}/{split})")
    res, crop = sizes_for(input_size, kind)
    res = int(resize or res)
    info = {"kind": kind, "name": name or root.split("?")[0].rstrip("/").rsplit("/", 1)[-1],
            "split": split, "root": root, "source": f"{root.split('?')[0]}/{split}",
            "list_file": None, "random_count": random_count, "limit": limit, "seed": seed,
            "train": train, "resize": res, "crop": list(crop), "classes": known.source,
            "files": listing}
    if interpolation != "bilinear":
        info["interpolation"] = interpolation
    ds = ImageDataset(items, make_transform(input_size, train, kind, res, interpolation),
                      known, on_bad_image, [], info, source=source)
    if on_bad_image == "skip" and not train:
        ds.verify()
    return ds


__all__ = ["DataError", "ImageDataset", "IMG_EXTENSIONS", "KINDS", "PAPER_LIST",
           "build_dataset", "list_hash", "load_image", "make_transform", "read_list_file",
           "resolve_list", "select", "sizes_for", "spread"]
