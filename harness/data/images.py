"""The data layer: image data sets yielding ``(image, label, image_id)`` in [0, 1] pixel space.

``build_dataset`` is what the runner calls::

    ds = build_dataset("imagenet", "val", input_size=224, root="/data/imagenet",
                       list_file="paper")          # the paper's 2,000-image list
    image, label, image_id = ds[0]                 # (3, 224, 224) float in [0, 1], int, str
    ds.list_hash                                   # provenance of what is evaluated

Sources
- **Folders** ``root/{train,val}/<class>/*.<ext>`` (torchvision ImageFolder layout): the class
  index is the sorted order of the class folder names (for ImageNet, sorted wnids, as
  ImageFolder). Files named ``*.mask.*`` (the quickstart's masks) are not images.
  ``image_id`` is the path relative to the split folder (``n01440764/x.JPEG``).
- **A list file** in the format of the paper's ``Evaluation_2000.txt`` (shipped as
  ``PAPER_LIST``; ``list_file="paper"`` names it): one ``<file name> <label>`` a line; blank
  lines and ``#`` comments are ignored. Names resolve under ``root/<split>``, either directly
  (flat folder, or a name with its class folder) or inside any class folder below it.
  ``image_id`` is the name as written.

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
replacement (kept in list order), then ``limit`` keeps the first ``limit``.

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

PAPER_LIST = Path(__file__).resolve().parent / "lists" / "Evaluation_2000.txt"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KINDS = ("quickstart", "imagenet")
SPLITS = ("train", "val")
ON_BAD_IMAGE = ("stop", "skip")
RESIZE_RATIO = 256 / 224


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was wrong."""


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


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully as RGB; ``DataError`` naming the file when it cannot."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGB":
                return img.copy()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grayscale
                arr = np.asarray(img, dtype=np.float64)
                arr = 255.0 * arr / max(arr.max(), 1.0)
                img = Image.fromarray(arr.astype(np.uint8), "L")
            return img.convert("RGB")
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


def _is_image(name: str) -> bool:
    low = name.lower()
    return low.endswith(IMG_EXTENSIONS) and ".mask." not in low and not low.startswith(".")


def _class_dirs(split_root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_root)
                  if e.is_dir() and not e.name.startswith("."))


def scan_folder(split_root: Path) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """Items ``(path, label, image_id)`` and class names of an ImageFolder-layout split."""
    classes = _class_dirs(split_root)
    if not classes:
        raise DataError(f"{split_root}: no class folders (expected {split_root}/<class>/<image>); "
                        "for a flat folder give a list file")
    items = []
    for label, cls in enumerate(classes):
        for entry in sorted(os.scandir(split_root / cls), key=lambda e: e.name):
            if entry.is_file() and _is_image(entry.name):
                items.append((Path(entry.path), label, f"{cls}/{entry.name}"))
    if not items:
        raise DataError(f"{split_root}: the class folders hold no images "
                        f"({', '.join(IMG_EXTENSIONS)})")
    return items, classes


def resolve_list(list_path: Path, split_root: Path, on_bad_image: str = "stop",
                 entries: list[tuple[str, int, int]] | None = None):
    """Resolve a list file under ``split_root``: ``(items, classes_or_None, missing)``.

    ``entries`` (from ``read_list_file``, possibly a selection of them) default to the
    whole file.
    """
    if entries is None:
        entries = read_list_file(list_path)
    classes = _class_dirs(split_root) or None
    index: dict[str, Path] | None = None
    items, missing = [], []
    for name, label, line in entries:
        path = split_root / name
        if not path.is_file():
            if index is None:   # one pass over the class folders, built on first need
                index = {}
                for cls in classes or []:
                    for entry in os.scandir(split_root / cls):
                        index.setdefault(entry.name, Path(entry.path))
            path = index.get(name, path)
        if classes is not None and label >= len(classes):
            raise DataError(f"{list_path}:{line}: label {label} is out of range: "
                            f"{split_root} has {len(classes)} class folders")
        if not path.is_file():
            if on_bad_image == "stop":
                raise DataError(f"{list_path}:{line}: {name!r} not found under {split_root} "
                                "(flat or in a class folder)")
            missing.append((split_root / name, f"{list_path}:{line}: {name!r} not found"))
            continue
        items.append((path, label, name))
    return items, classes, missing


class ImageDataset(Dataset):
    """A map-style data set of ``(image (3,H,W) in [0,1], label, image_id)``.

    ``items`` are ``(path, label, image_id)``; ``bad`` lists ``(path, reason)`` of images left
    out under ``on_bad_image="skip"`` and ``skipped`` counts them. ``classes`` are the class
    names when known. ``describe()`` gives the provenance record.
    """

    def __init__(self, items: Sequence[tuple[Path, int, str]], transform: Callable,
                 classes: list[str] | None = None, on_bad_image: str = "stop",
                 bad: list[tuple[Path, str]] | None = None, info: dict | None = None):
        if on_bad_image not in ON_BAD_IMAGE:
            raise DataError(f"on_bad_image: {on_bad_image!r} is not one of {ON_BAD_IMAGE}")
        self.items = list(items)
        self.transform = transform
        self.classes = classes
        self.on_bad_image = on_bad_image
        self.bad = list(bad or [])
        self.info = dict(info or {})
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if not -len(self.items) <= i < len(self.items):
            raise IndexError(f"index {i} out of range for {len(self.items)} images")
        for step in range(len(self.items)):
            path, label, image_id = self.items[(i + step) % len(self.items)]
            try:
                return self.transform(load_image(path)), label, image_id
            except DataError as err:
                if self.on_bad_image == "stop":
                    raise
                if str(path) not in self._warned:
                    self._warned.add(str(path))
                    warnings.warn(f"skipped (data.on_bad_image: skip): {err}", stacklevel=2)
        raise DataError(f"no image of this data set ({self.info.get('source')}) can be decoded")

    @property
    def skipped(self) -> int:
        return len(self.bad)

    @property
    def ids(self) -> list[str]:
        return [it[2] for it in self.items]

    @property
    def labels(self) -> list[int]:
        return [it[1] for it in self.items]

    @property
    def list_hash(self) -> str:
        return list_hash((it[2], it[1]) for it in self.items)

    def path_of(self, i: int) -> Path:
        return self.items[i][0]

    def verify(self, workers: int | None = None) -> "ImageDataset":
        """Decode every image once: drop and count bad ones ("skip") or raise ("stop")."""
        workers = workers or min(8, os.cpu_count() or 1)

        def check(item):
            try:
                load_image(item[0])
                return None
            except DataError as err:
                return str(err)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(check, self.items))
        good = []
        for item, problem in zip(self.items, problems):
            if problem is None:
                good.append(item)
            elif self.on_bad_image == "stop":
                raise DataError(problem)
            else:
                self.bad.append((item[0], problem))
        self.items = good
        return self

    def describe(self) -> dict:
        """Provenance: source, selection, preprocessing, size, list hash, skipped files."""
        return {**self.info, "images": len(self), "list_hash": self.list_hash,
                "skipped": self.skipped, "on_bad_image": self.on_bad_image}


def select(items: list, random_count: int | None = None, limit: int | None = None,
           seed: int = 0, where: str = "data") -> list:
    """A seeded draw of ``random_count`` items (kept in order), then the first ``limit``."""
    if random_count is not None:
        if int(random_count) <= 0:
            raise DataError(f"{where}: random_count must be positive, got {random_count}")
        if random_count > len(items):
            raise DataError(f"{where}: random_count {random_count} exceeds the {len(items)} "
                            "images available")
        picked = np.random.default_rng(seed).choice(len(items), int(random_count), replace=False)
        items = [items[i] for i in sorted(picked.tolist())]
    if limit is not None:
        if int(limit) <= 0:
            raise DataError(f"{where}: limit must be positive, got {limit}")
        items = items[: int(limit)]
    return items


def build_dataset(kind: str, split: str, input_size, root: str | Path | None = None,
                  list_file: str | Path | None = None, random_count: int | None = None,
                  limit: int | None = None, seed: int = 0, on_bad_image: str = "stop",
                  train: bool = False, resize: int | None = None,
                  interpolation: str = "bilinear") -> ImageDataset:
    """Build the data set the runner evaluates or trains on (see the module doc).

    ``kind``: ``quickstart`` (generated on first use when ``root`` is None; ``val`` defaults to
    its list file) or ``imagenet`` (``root`` required). ``list_file``: a path, or ``"paper"``
    for the shipped ``Evaluation_2000.txt``. ``train`` selects the augmenting transform.
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
    missing: list[tuple[Path, str]] = []
    if list_file is not None:
        list_path = PAPER_LIST if str(list_file) == "paper" else Path(list_file).expanduser()
        entries = select(read_list_file(list_path), random_count, limit, seed,
                         f"data ({list_path})")
        items, classes, missing = resolve_list(list_path, split_root, on_bad_image, entries)
        source = str(list_path)
    else:
        items, classes = scan_folder(split_root)
        source = str(split_root)
        items = select(items, random_count, limit, seed, f"data ({source})")
    res, crop = sizes_for(input_size, kind)
    res = int(resize or res)
    info = {"kind": kind, "split": split, "root": str(root), "source": source,
            "list_file": str(list_file) if list_file is not None else None,
            "random_count": random_count, "limit": limit, "seed": seed, "train": train,
            "resize": res, "crop": list(crop)}
    if interpolation != "bilinear":
        info["interpolation"] = interpolation
    ds = ImageDataset(items, make_transform(input_size, train, kind, res, interpolation),
                      classes, on_bad_image, missing, info)
    if on_bad_image == "skip" and not train:
        ds.verify()
    return ds


__all__ = ["DataError", "ImageDataset", "IMG_EXTENSIONS", "KINDS", "PAPER_LIST",
           "build_dataset", "list_hash", "load_image", "make_transform", "read_list_file",
           "resolve_list", "scan_folder", "select", "sizes_for"]
