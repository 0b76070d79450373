"""Localisation scores of saliency maps: the energy-based pointing game and the shortcut share.

**Energy-based pointing game** (Wang et al., Score-CAM, CVPR-W 2020, sec. 5.2): the share of a
map's energy that falls inside the annotated object region R (a box or a mask),

    score(V, R) = sum_ij V_ij * [ij in R] / sum_ij V_ij          (higher is better, in [0, 1])

per image, with V clamped at 0 first. A map with no energy (sum V = 0, e.g. a degenerate map
that normalised to all zeros) scores **0**: it points at nothing (0/0 := 0). Scores are
computed in float64 from the (B, H, W) maps at input resolution.

**Shortcut share** (the quickstart's planted cue; the paper's sec. 4.4 "class bias", figs 7-9,
in miniature): for an image of ``quickstart.SHORTCUT_CLASS`` carrying the cue, the same
energy share on the cue box and on the object box. A classifier that relies on the cue puts
energy on the cue: ``cue_share`` high, ``object_share`` low.

Regions come from annotations in pixel coordinates of the *original* image and are mapped by
the same eval transform that the data layer applies (``harness.data.make_transform``: shorter
side to ``resize``, bilinear, then center crop). Boxes are ``[x0, y0, x1, y1]`` in continuous
pixel coordinates (``x1``/``y1`` exclusive; the quickstart's convention); a pixel belongs to a
box when its centre ``(c + 0.5, r + 0.5)`` lies inside. Masks are resized with nearest
neighbour. Sources:

- any image-classification folder, the quickstart's included (``folder_regions``): the
  split's ``annotations.json`` (``box``, ``cue_box`` per image) and ``<stem>.mask.png``
  next to each image, either or both (docs/datasets.md);
- ImageNet validation boxes in PASCAL-VOC XML (``<annotation><size><width>..``,
  ``<object><name>wnid</name><bndbox><xmin>..``), one ``<image stem>.xml`` per image in a
  folder (ILSVRC ``Annotations/CLS-LOC/val``). VOC coordinates are 1-based and inclusive:
  ``[xmin, xmax]`` becomes ``[xmin - 1, xmax)``. The region of an image is the union of its
  object boxes (optionally only those named ``wnid``).

Per-image columns for the evaluation shards (no extra forward passes; the maps are already
there): ``energy_columns(dataset, indices, maps)``; their means: ``energy_metrics(table)``.
"""
from __future__ import annotations

import functools
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]

#: Names of the per-image columns written by ``energy_columns`` (NaN where not applicable).
COLUMNS = ("energy_box", "energy_mask", "energy_cue", "energy_cue_object")
ANNOTATIONS = "annotations.json"      # a split's boxes (harness.data.folders)


# -- the score --------------------------------------------------------------------------------
def energy_share(maps: torch.Tensor | np.ndarray, regions: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-image share of saliency energy inside ``regions``: (B,) float64 in [0, 1].

    ``maps``: (B, H, W) or (H, W) saliency (negative values are clamped to 0);
    ``regions``: bool (or 0/1) of the same shape. A map with zero total energy scores 0.
    """
    v = torch.as_tensor(maps).to(torch.float64)
    r = torch.as_tensor(regions).to(torch.float64)
    if v.dim() == 2:
        v, r = v[None], r[None]
    if v.shape != r.shape:
        raise ValueError(f"maps {tuple(v.shape)} and regions {tuple(r.shape)} differ in shape")
    v = v.clamp_min(0)
    inside = (v * r).sum(dim=(1, 2))
    total = v.sum(dim=(1, 2))
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total))


def shortcut_shares(maps, cue_regions, object_regions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cue_share, object_share)`` per image: energy on the cue box and on the object."""
    return energy_share(maps, cue_regions), energy_share(maps, object_regions)


class EnergyPointingGame:
    """Running energy-based pointing game (update/compute, as torch-cam's metrics).

    ``update(maps, regions)`` adds per-image scores; ``compute()`` is their mean (NaN when
    empty); ``scores`` keeps them. ``higher_is_better = True``.
    """

    higher_is_better = True

    def __init__(self):
        self.scores: list[float] = []

    def update(self, maps, regions) -> torch.Tensor:
        s = energy_share(maps, regions)
        self.scores += s.tolist()
        return s

    def compute(self) -> float:
        return float(np.mean(self.scores)) if self.scores else math.nan


# -- geometry ---------------------------------------------------------------------------------
def box_mask(box: Sequence[float], size: tuple[int, int]) -> torch.Tensor:
    """Bool (H, W): pixels whose centre lies in ``box`` = [x0, y0, x1, y1) (size = (H, W))."""
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in box)
    cx = torch.arange(w, dtype=torch.float64) + 0.5
    cy = torch.arange(h, dtype=torch.float64) + 0.5
    return ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]


def union_mask(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.bool)
    for b in boxes:
        out |= box_mask(b, size)
    return out


@dataclass(frozen=True)
class EvalGeometry:
    """Where the eval transform maps original pixels: scale, then the crop window.

    ``resized`` = (H', W') after the shorter side went to ``resize`` (torchvision's rule: the
    longer side is ``int(resize * long / short)``); ``offset`` = (top, left) of the center crop
    of size ``crop`` = (h, w) (negative when the crop pads).
    """

    original: tuple[int, int]       # (H, W)
    resized: tuple[int, int]
    crop: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def of(cls, original_hw: tuple[int, int], input_size, kind: str = "imagenet",
           resize: int | None = None) -> "EvalGeometry":
        from harness.data.images import sizes_for
        default_resize, crop = sizes_for(input_size, kind)
        size = int(resize or default_resize)
        h, w = (int(v) for v in original_hw)
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        rh, rw = (new_short, new_long) if h <= w else (new_long, new_short)
        ch, cw = crop
        top = int(round((rh - ch) / 2.0)) if rh >= ch else -((ch - rh) // 2)
        left = int(round((rw - cw) / 2.0)) if rw >= cw else -((cw - rw) // 2)
        return cls((h, w), (rh, rw), (ch, cw), (top, left))

    def box(self, box: Sequence[float]) -> Box:
        """Map an original-pixel box [x0, y0, x1, y1) into the cropped input, clipped."""
        (h, w), (rh, rw), (ch, cw), (top, left) = self.original, self.resized, self.crop, self.offset
        sx, sy = rw / w, rh / h
        x0, y0, x1, y1 = (float(v) for v in box)
        clip = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
        return (clip(x0 * sx - left, cw), clip(y0 * sy - top, ch),
                clip(x1 * sx - left, cw), clip(y1 * sy - top, ch))

    def mask(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Map an original-size bool mask with the same resize (nearest) and center crop."""
        from torchvision.transforms import functional as TF
        arr = np.asarray(mask, dtype=np.uint8) * 255
        img = Image.fromarray(arr, "L")
        if (img.height, img.width) != self.resized:
            img = img.resize((self.resized[1], self.resized[0]), Image.Resampling.NEAREST)
        img = TF.center_crop(img, list(self.crop))
        return torch.from_numpy(np.asarray(img) > 127)


# -- annotations ------------------------------------------------------------------------------
@dataclass
class VocObject:
    name: str
    box: Box                         # 0-based [x0, y0, x1, y1) in original pixels


@dataclass
class VocAnnotation:
    """A parsed PASCAL-VOC XML file (as ImageNet's bounding boxes ship)."""

    filename: str
    width: int
    height: int
    objects: list[VocObject] = field(default_factory=list)

    def boxes(self, name: str | None = None) -> list[Box]:
        return [o.box for o in self.objects if name is None or o.name == name]


def parse_voc(path: str | Path, one_based: bool = True) -> VocAnnotation:
    """Read a VOC XML file; ``one_based``: xmin..xmax inclusive, 1-based (VOC's convention).

    Raises ``ValueError`` naming the file for malformed XML or missing fields.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path}: cannot read VOC XML ({err})") from None

    def num(node, tag):
        el = node.find(tag)
        if el is None or el.text is None:
            raise ValueError(f"{path}: missing <{tag}>")
        return float(el.text.strip())

    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: missing <size>")
    ann = VocAnnotation(filename=(root.findtext("filename") or path.stem).strip(),
                        width=int(num(size, "width")), height=int(num(size, "height")))
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        xmin, ymin, xmax, ymax = (num(bb, t) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = (xmin - 1, ymin - 1, xmax, ymax) if one_based else (xmin, ymin, xmax, ymax)
        ann.objects.append(VocObject((obj.findtext("name") or "").strip(), box))
    return ann


@dataclass
class Regions:
    """The regions of one image in input coordinates: bool (H, W) tensors (None if unknown)."""

    box: torch.Tensor
    mask: torch.Tensor | None = None
    cue: torch.Tensor | None = None
    label: int | None = None


@functools.lru_cache(maxsize=8)
def _annotations_file(path: str, mtime_ns: int) -> dict:
    del mtime_ns                                  # part of the cache key: a new file is read
    return json.loads(Path(path).read_text())


def folder_regions(image_path: str | Path, input_size, kind: str = "folder") -> Regions | None:
    """The regions of an image of an image-classification folder (``harness.data.folders``):
    its entry in ``<split>/annotations.json`` (``{"<class>/<file>": {"box": [x0, y0, x1, y1],
    "cue_box": ...}}``, pixels of the original image, ``x1``/``y1`` exclusive) and its mask
    ``<stem>.mask.png`` beside it (0/255; the box is then optional: the mask's bounding box).
    None when the image has neither. The quickstart's images are annotated this way."""
    path = Path(image_path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    mask_file = path.with_name(stem + ".mask.png")
    ann_file = path.parent.parent / ANNOTATIONS
    entry = {}
    if ann_file.is_file():
        entry = _annotations_file(str(ann_file), ann_file.stat().st_mtime_ns).get(
            f"{path.parent.name}/{path.name}", {})
    mask = np.asarray(Image.open(mask_file)) > 127 if mask_file.is_file() else None
    if mask is not None and mask.ndim == 3:
        mask = mask.any(axis=2)
    box = entry.get("box")
    if box is None and mask is not None and mask.any():
        rows, cols = np.nonzero(mask)
        box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
    if box is None:
        return None
    if mask is not None:
        h, w = mask.shape
    else:
        with Image.open(path) as img:
            w, h = img.size
    geo = EvalGeometry.of((h, w), input_size, kind)
    cue = entry.get("cue_box")
    return Regions(box=box_mask(geo.box(box), geo.crop),
                   mask=geo.mask(mask) if mask is not None else None,
                   cue=box_mask(geo.box(cue), geo.crop) if cue else None, label=entry.get("label"))


def quickstart_regions(image_path: str | Path, input_size, kind: str = "quickstart") -> Regions:
    """Object box, object mask and cue box (if any) of a quickstart image, in input pixels."""
    found = folder_regions(image_path, input_size, kind)
    if found is None:
        raise ValueError(f"{image_path}: no annotation")
    return found


def voc_regions(xml_path: str | Path, input_size, kind: str = "imagenet",
                name: str | None = None) -> Regions:
    """The union of the (``name``d) object boxes of a VOC XML file, in input pixels."""
    ann = parse_voc(xml_path)
    geo = EvalGeometry.of((ann.height, ann.width), input_size, kind)
    boxes = ann.boxes(name) or ann.boxes()
    return Regions(box=union_mask([geo.box(b) for b in boxes], geo.crop))


def regions_for(image_path: str | Path, input_size, kind: str,
                voc_dir: str | Path | None = None) -> Regions | None:
    """The regions of one data-set image, or None when it has no annotation.

    Images of a folder (the quickstart's too): ``folder_regions``. Otherwise
    ``voc_dir/<stem>.xml`` when given (the
    boxes named after the image's class folder, e.g. its wnid, if there are such).
    """
    path = Path(image_path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    try:
        found = folder_regions(path, input_size, kind)
    except (ValueError, KeyError, OSError):   # an unreadable annotation: no region
        found = None
    if found is not None:
        return found
    if voc_dir is not None:
        xml = Path(voc_dir) / f"{stem}.xml"
        if xml.is_file():
            return voc_regions(xml, input_size, kind, name=path.parent.name)
    return None


# -- per-image columns and their means (for the runner) -----------------------------------------
def energy_columns(dataset, indices: Sequence[int], maps: torch.Tensor,
                   voc_dir: str | Path | None = None) -> dict[str, list[float]]:
    """Columns ``COLUMNS`` for the images ``indices`` of ``dataset`` and their ``maps``.

    ``dataset``: a ``harness.data.ImageDataset`` (``path_of``, ``info['kind']``). Values are
    NaN where an image has no annotation (or no cue). ``energy_cue``/``energy_cue_object``:
    the shortcut shares of images carrying the planted cue (the maps of the explained class).
    """
    maps = maps.detach().cpu()
    size = tuple(maps.shape[-2:])
    kind = getattr(dataset, "info", {}).get("kind", "imagenet")
    out: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for j, i in enumerate(indices):
        reg = regions_for(dataset.path_of(i), size, kind, voc_dir)
        v = maps[j]
        if reg is None or tuple(reg.box.shape) != size:
            for c in COLUMNS:
                out[c].append(math.nan)
            continue
        out["energy_box"].append(float(energy_share(v, reg.box)[0]))
        out["energy_mask"].append(float(energy_share(v, reg.mask)[0]) if reg.mask is not None
                                  else math.nan)
        if reg.cue is not None:
            cue, obj = shortcut_shares(v, reg.cue, reg.box)
            out["energy_cue"].append(float(cue[0]))
            out["energy_cue_object"].append(float(obj[0]))
        else:
            out["energy_cue"].append(math.nan)
            out["energy_cue_object"].append(math.nan)
    return out


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def energy_metrics(table) -> dict[str, float]:
    """Means of the ``COLUMNS`` of a per-image table (pyarrow or dict of lists), NaNs ignored.

    Returns only the metrics with at least one value: ``localisation_energy`` (box),
    ``localisation_energy_mask``, ``localisation_cue_energy`` and
    ``localisation_cue_object_energy`` (images with the planted cue, maps of the *explained*
    class; ``harness.analysis.shortcut_figure`` gives the ``shortcut_*`` numbers for the maps
    of the shortcut class itself), ``localisation_images`` (images with a box).
    """
    names = {"energy_box": "localisation_energy", "energy_mask": "localisation_energy_mask",
             "energy_cue": "localisation_cue_energy",
             "energy_cue_object": "localisation_cue_object_energy"}
    get = (lambda c: table.column(c).to_pylist()) if hasattr(table, "column") else table.get
    have = set(table.column_names) if hasattr(table, "column_names") else set(table)
    out = {}
    for col, metric in names.items():
        if col in have:
            value = _nanmean(get(col))
            if not math.isnan(value):
                out[metric] = value
    if "energy_box" in have:
        n = sum(1 for v in get("energy_box") if v is not None and not math.isnan(v))
        if n:
            out["localisation_images"] = float(n)
    return out


__all__ = ["COLUMNS", "EnergyPointingGame", "EvalGeometry", "Regions", "VocAnnotation",
           "VocObject", "box_mask", "energy_columns", "energy_metrics", "energy_share",
           "parse_voc", "quickstart_regions", "regions_for", "shortcut_shares", "union_mask",
           "voc_regions"]


# -- the registry entry (harness.metrics.registry) --------------------------------------------
from harness.metrics.base import Metric, Reported  # noqa: E402
from harness.metrics.registry import register  # noqa: E402

_NAN = "NaN where the image has no box (mask, planted cue) annotation"


@register
class Localisation(Metric):
    """The energy-based pointing game (Wang et al., Score-CAM, CVPR-W 2020): the share of a
    map's energy inside the object's box (``energy_box``), mask, and on the quickstart's
    planted cue; higher is better (more of the map on the object). No forwards."""

    name = "localisation"
    display_name = "Localisation"
    paper = "Wang et al., Score-CAM (energy-based pointing game), CVPR-W 2020"
    always = True
    reported = tuple(Reported(metric, "higher", header, column=col, table=False, digits=3)
                     for col, metric, header in (
                         ("energy_box", "localisation_energy", "Energy(box)↑"),
                         ("energy_mask", "localisation_energy_mask", "Energy(mask)↑"),
                         ("energy_cue", "localisation_cue_energy", "Energy(cue)↑"),
                         ("energy_cue_object", "localisation_cue_object_energy",
                          "Energy(cue, object)↑")))
    nan_columns = {c: _NAN for c in COLUMNS}

    def columns(self) -> tuple[str, ...]:
        return COLUMNS

    def identity(self) -> dict:
        return {}                     # no settings; its columns are in every shard's rows

    def score(self, batch) -> dict[str, list[float]]:
        if batch.dataset is None:     # nothing annotated to compare with
            return {c: [math.nan] * len(batch.images) for c in COLUMNS}
        return energy_columns(batch.dataset, batch.positions(), batch.saliency)

    def aggregate(self, table) -> dict[str, float]:
        return energy_metrics(table)
