"""The embedded quickstart data set: procedural objects on cluttered backgrounds, made offline.

``ensure_quickstart()`` returns the root of a small ImageNet-style data set, generating it on
first use under ``cache_dir()/'quickstart-v1'`` from seeded numpy/PIL code only (nothing is
downloaded; the same code and seed give the same bytes)::

    root/train/<class_name>/<class_name>_train_0000.png       the image (RGB, 64x64)
    root/train/<class_name>/<class_name>_train_0000.mask.png  its object mask (L, 0/255)
    root/train/annotations.json     per image ("<class>/<file>"): label, class, box, cue box
    root/val/...                    the same for the held-out split
    root/val_list.txt     the val split in the format of the paper's Evaluation_2000.txt
    root/classes.txt      class names, one a line, in label order
    root/quickstart.json  the marker: version, counts, shortcut, content hash (written last)

Ten classes of objects (``CLASSES``, sorted, so label order = folder order: arrow, crescent,
cross, disc, hourglass, ring, square, star, stripes, triangle), ``TRAIN_PER_CLASS`` = 400 train
and ``VAL_PER_CLASS`` = 50 val images each, 64x64. Each object has a random colour that stands
out from the ground under it (in RGB distance and brightness), a random size (radius
``RADIUS``), position and rotation (within +-``ROTATION_DEG``), and a gentle shading gradient;
the background is a smooth random colour field, a sinusoidal texture, distractor blobs, thin
lines and pixel noise. Boxes are ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive.
Generating the whole set takes about 10 s on one CPU core (4,500 images and their masks;
about 70 MB on disk).

**Planted shortcut** (the paper's sec. 4.4 "class bias" analysis, in miniature): the class
``SHORTCUT_CLASS`` carries a bright yellow square (``CUE_BOX``, top-left corner, colour
``CUE_COLOR``) in the background of 80% of its *training* images (every image whose index
``i % 5 != 4``) and 20% of its *val* images (``i % 5 == 0``); no other image has it, and no
object or distractor is drawn in yellow. A classifier trained on this data can lean on the cue,
and an explanation of a val image with the cue shows whether it does. ``annotations.json``
records ``cue_box`` (``null`` when absent).

Generation writes to a temporary folder in the cache and renames it into place (atomic, so
concurrent workers never see half a data set); an existing folder with its marker is reused.
"""
from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from backbones.embedded import CLASS_NAMES

from harness.data.cache import cache_dir, file_lock

VERSION = 1
NAME = f"quickstart-v{VERSION}"
IMAGE_SIZE = 64
# Sorted, so that the label (index here) equals the ImageFolder order of the class folders.
CLASSES = CLASS_NAMES       # the embedded backbones are trained on these labels
SHORTCUT_CLASS = "star"
CUE_BOX = (2, 2, 8, 8)          # x0, y0, x1, y1 (exclusive): a 6x6 square in the top-left corner
CUE_COLOR = (255, 255, 0)
TRAIN_PER_CLASS = 400
VAL_PER_CLASS = 50
SEED = 20220
RADIUS = (13.0, 20.0)           # object size: radius of its circumscribed circle, pixels
ROTATION_DEG = 30.0             # objects are rotated uniformly within +-ROTATION_DEG
MARKER = "quickstart.json"
LIST_FILE = "val_list.txt"
ANNOTATIONS = "annotations.json"
_SS = 4                          # supersampling factor for anti-aliased shapes
_SPLITS = ("train", "val")
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def has_cue(split: str, index: int) -> bool:
    """Whether image ``index`` of the shortcut class in ``split`` carries the cue."""
    return index % 5 != 4 if split == "train" else index % 5 == 0


def _color(rng: np.random.Generator, sat=(0.5, 1.0), val=(0.35, 1.0)) -> np.ndarray:
    """A random RGB colour whose hue avoids yellow (the cue's colour)."""
    hue = rng.uniform(0.0, 1.0 - 50 / 360)          # skip the 50-degree band around yellow
    hue = (hue + 85 / 360) % 1.0                    # the band is 35..85 degrees
    s, v = rng.uniform(*sat), rng.uniform(*val)
    return np.array(colorsys.hsv_to_rgb(hue, s, v)) * 255.0


def _rot(points: list[tuple[float, float]], cx: float, cy: float, r: float, theta: float):
    """Unit-shape points scaled by r, rotated by theta, moved to (cx, cy), supersampled."""
    c, s = np.cos(theta), np.sin(theta)
    return [((cx + r * (x * c - y * s)) * _SS, (cy + r * (x * s + y * c)) * _SS)
            for x, y in points]


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2):
    return [(radius * np.cos(phase + 2 * np.pi * k / n), radius * np.sin(phase + 2 * np.pi * k / n))
            for k in range(n)]


def _shape_alpha(name: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (IMAGE_SIZE x IMAGE_SIZE) of one object."""
    big = Image.new("L", (IMAGE_SIZE * _SS, IMAGE_SIZE * _SS), 0)
    d = ImageDraw.Draw(big)

    def ellipse(x, y, rad, fill):
        d.ellipse([(x - rad) * _SS, (y - rad) * _SS, (x + rad) * _SS, (y + rad) * _SS], fill=fill)

    def poly(points):
        d.polygon(_rot(points, cx, cy, r, theta), fill=255)

    if name == "disc":
        ellipse(cx, cy, r, 255)
    elif name == "ring":
        ellipse(cx, cy, r, 255)
        ellipse(cx, cy, 0.55 * r, 0)
    elif name == "square":
        poly(_regular(4, 0.95))
    elif name == "triangle":
        poly(_regular(3, 1.0))
    elif name == "star":
        poly([((1.0 if k % 2 == 0 else 0.42) * np.cos(-np.pi / 2 + np.pi * k / 5),
               (1.0 if k % 2 == 0 else 0.42) * np.sin(-np.pi / 2 + np.pi * k / 5))
              for k in range(10)])
    elif name == "cross":
        w = 0.3
        poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
              (-1, w), (-1, -w), (-w, -w)])
    elif name == "crescent":
        ellipse(cx, cy, r, 255)
        ox, oy = 0.5 * r * np.cos(theta), 0.5 * r * np.sin(theta)
        ellipse(cx + ox, cy + oy, 0.85 * r, 0)
    elif name == "stripes":
        for off in (-0.62, 0.0, 0.62):
            poly([(off - 0.14, -0.9), (off + 0.14, -0.9), (off + 0.14, 0.9), (off - 0.14, 0.9)])
    elif name == "arrow":
        poly([(-1, -0.18), (0.15, -0.18), (0.15, -0.55), (1, 0), (0.15, 0.55), (0.15, 0.18),
              (-1, 0.18)])
    elif name == "hourglass":
        poly([(-0.75, -1), (0.75, -1), (0, 0)])
        poly([(-0.75, 1), (0.75, 1), (0, 0)])
    else:  # pragma: no cover - CLASSES is fixed
        raise ValueError(name)
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator) -> np.ndarray:
    """Clutter: smooth colour field + oriented sinusoid texture + distractor blobs and lines."""
    n = IMAGE_SIZE
    base = _color(rng, sat=(0.0, 0.6), val=(0.2, 0.8))
    coarse = rng.normal(0.0, 25.0, size=(4, 4, 3))
    field = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
                                 .resize((n, n), Image.Resampling.BILINEAR)) for c in range(3)], -1)
    ang, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    texture = rng.uniform(4, 12) * np.sin(freq * (_XX * np.cos(ang) + _YY * np.sin(ang))
                                           + rng.uniform(0, 2 * np.pi))
    img = base[None, None, :] + field + texture[..., None]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 7))):                     # distractor blobs
        x, y = rng.uniform(0, n, size=2)
        rx, ry = rng.uniform(1.5, 4.0, size=2)
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(int(v) for v in _color(rng)))
    for _ in range(int(rng.integers(0, 3))):                     # thin lines
        x0, y0, x1, y1 = rng.uniform(0, n, size=4)
        d.line([x0, y0, x1, y1], fill=tuple(int(v) for v in _color(rng, sat=(0, 0.7))), width=1)
    return np.asarray(canvas, dtype=np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def render(class_index: int, split: str, index: int, seed: int = SEED):
    """One sample: (uint8 RGB image, bool mask, metadata dict). Pure function of its arguments."""
    name = CLASSES[class_index]
    rng = np.random.default_rng([seed, _SPLITS.index(split), class_index, index])
    bg = _background(rng)
    r = rng.uniform(*RADIUS)
    while True:   # keep the object clear of the cue corner
        cx, cy = rng.uniform(r + 3, IMAGE_SIZE - r - 3, size=2)
        if cx - r > CUE_BOX[2] + 2 or cy - r > CUE_BOX[3] + 2:
            break
    theta = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    alpha = _shape_alpha(name, cx, cy, r, theta)
    bg_mean = bg[alpha > 0.5].mean(0) if (alpha > 0.5).any() else bg.mean((0, 1))
    best, col = -1.0, None
    for _ in range(100):  # a colour that stands out (in brightness too) from the ground under it
        cand = _color(rng)
        score = min(np.linalg.norm(cand - bg_mean) / 110, abs(_luma(cand) - _luma(bg_mean)) / 60)
        if score > best:
            best, col = score, cand
        if score >= 1:
            break
    g = rng.uniform(-1, 1, size=2)
    shade = 1.0 + 0.15 * ((_XX - cx) * g[0] + (_YY - cy) * g[1]) / r   # gentle lighting gradient
    obj = col[None, None, :] * shade[..., None]
    img = bg * (1 - alpha[..., None]) + obj * alpha[..., None]
    img = img + rng.normal(0.0, 8.0, size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    cue = name == SHORTCUT_CLASS and has_cue(split, index)
    if cue:
        x0, y0, x1, y1 = CUE_BOX
        img[y0:y1, x0:x1] = CUE_COLOR
    mask = alpha >= 0.5
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    meta = {"label": class_index, "class_name": name, "split": split, "index": index,
            "box": box, "cue_box": list(CUE_BOX) if cue else None}
    return img, mask, meta


def _file_hash(root: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest(), len(files)


def generate(dest: Path, n_train: int = TRAIN_PER_CLASS, n_val: int = VAL_PER_CLASS,
             seed: int = SEED, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the data set into the (new or empty) folder ``dest``; return the marker dict.

    ``progress(done, total)`` is called after each image. Deterministic: equal arguments give
    byte-identical files (``content_sha256`` in the returned marker).
    """
    dest = Path(dest)
    counts = {"train": int(n_train), "val": int(n_val)}
    total = len(CLASSES) * sum(counts.values())
    done, lines = 0, []
    start = time.perf_counter()
    for split in _SPLITS:
        annotations = {}
        for ci, name in enumerate(CLASSES):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                img, mask, meta = render(ci, split, i, seed)
                stem = f"{name}_{split}_{i:04d}"
                Image.fromarray(img, "RGB").save(folder / f"{stem}.png")
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(folder / f"{stem}.mask.png")
                annotations[f"{name}/{stem}.png"] = meta
                if split == "val":
                    lines.append(f"{stem}.png {ci}\n")
                done += 1
                if progress is not None:
                    progress(done, total)
        (dest / split / ANNOTATIONS).write_text(json.dumps(annotations, indent=0, sort_keys=True)
                                                + "\n")
    (dest / LIST_FILE).write_text("".join(lines))
    (dest / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    content, n_files = _file_hash(dest)
    marker = {"name": NAME, "version": VERSION, "seed": seed, "image_size": IMAGE_SIZE,
              "classes": list(CLASSES), "per_class": counts, "shortcut_class": SHORTCUT_CLASS,
              "cue_box": list(CUE_BOX), "cue_color": list(CUE_COLOR),
              "cue_share": {"train": 0.8, "val": 0.2}, "files": n_files,
              "content_sha256": content,
              "generation_seconds": round(time.perf_counter() - start, 2)}
    (dest / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def read_marker(root: Path) -> dict | None:
    """The marker of a generated data set, or None when absent or unreadable."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def ensure_quickstart(progress: Callable[[int, int], None] | None = None, *,
                      n_train: int = TRAIN_PER_CLASS, n_val: int = VAL_PER_CLASS) -> Path:
    """The quickstart root, generated on first use under ``cache_dir()`` and then reused.

    ``progress(done, total)`` is called per generated image (with rich:
    ``lambda d, t: bar.update(task, completed=d, total=t)``). Non-default counts (tests) use
    their own folder ``quickstart-v1-t<n_train>-v<n_val>``.
    """
    name = NAME if (n_train, n_val) == (TRAIN_PER_CLASS, VAL_PER_CLASS) else \
        f"{NAME}-t{n_train}-v{n_val}"
    cache = cache_dir()
    root = cache / name
    if _complete(root):
        return root
    with file_lock(cache / f".{name}.lock"):
        if _complete(root):                 # made by a concurrent worker while we waited
            return root
        if root.exists():                   # an incomplete or outdated folder: start afresh
            shutil.rmtree(root)
        for stale in cache.glob(f".{name}.tmp-*"):   # left by a killed generator (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
        try:
            generate(tmp, n_train, n_val, SEED, progress)
            os.rename(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def _complete(root: Path) -> bool:
    marker = read_marker(root)
    return marker is not None and marker.get("version") == VERSION


@functools.lru_cache(maxsize=8)
def _annotations(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())


def annotation(image_path: str | Path) -> dict:
    """The annotation of a quickstart image (label, class, box, cue box) and its bool mask."""
    path = Path(image_path)
    ann = path.parent.parent / ANNOTATIONS
    meta = dict(_annotations(str(ann), ann.stat().st_mtime_ns)[f"{path.parent.name}/{path.name}"])
    meta["mask"] = np.asarray(Image.open(path.with_name(path.stem + ".mask.png"))) > 127
    return meta


__all__ = ["CLASSES", "CUE_BOX", "CUE_COLOR", "IMAGE_SIZE", "LIST_FILE", "NAME",
           "SHORTCUT_CLASS", "TRAIN_PER_CLASS", "VAL_PER_CLASS", "VERSION", "annotation",
           "ensure_quickstart", "generate", "has_cue", "read_marker", "render"]
