"""Error analysis as figures and numbers (the L-CAM paper's sec. 4.4, figs 5-9).

Functions take a backbone, an explainer (``methods.create(...)``) and a data set (a
``harness.data.ImageDataset``) or tensors of images/labels/ids, write PNG files with the
``harness.results.overlays`` helpers, and return ``(paths, metrics)`` for the runner to log:

- ``error_figure``: misclassified images with the maps of the **ground-truth** and the
  **predicted** class side by side (figs 5-6). The paper reads "related classes" (similar
  maps) against "multi-label images" (maps on different regions); the number
  ``error_gt_pred_spearman`` is the mean Spearman correlation between the two maps.
- ``class_gallery``: the images of one class with the maps of that class and the prediction
  under each (figs 7-9: what the classifier looks at when it succeeds and when it fails).
- ``shortcut_figure``: the quickstart's planted-shortcut class (``quickstart.SHORTCUT_CLASS``)
  with its maps, the object and cue boxes drawn, and the energy shares on cue and object
  (``harness.metrics.localisation``): ``shortcut_cue_energy``, ``shortcut_object_energy`` (mean over
  the images carrying the cue), ``shortcut_object_energy_nocue`` (the other images).
- ``localisation_metrics``: the energy-based pointing game over (some of) the data set.
- ``analyse``: all of the above plus the sanity check (``harness.metrics.sanity``) in one call.

Costs are bounded: figures use at most ``figure_images`` images (2 explanations each for the
error figure); the localisation is read from per-image shard columns when given
(``per_image``; no extra forward passes) and otherwise recomputed over at most
``localisation_images`` images (default: all for gradient and learned methods, 32 for the
perturbation methods); the sanity check explains ``sanity_images`` images (steps + 1) times.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

from harness.metrics import localisation
from harness.metrics import sanity
from harness.results.overlays import grid, overlay
from harness.data.cache import atomic_write

MIN_TILE = 160          # tiles are upscaled (nearest) to at least this many pixels a side


# -- drawing helpers --------------------------------------------------------------------------
def upscale(im: Image.Image, min_side: int = MIN_TILE) -> Image.Image:
    k = max(1, -(-min_side // min(im.size)))
    return im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im


def caption(im: Image.Image, text: str | Sequence[str], lines: int = 2) -> Image.Image:
    """``im`` with a white strip of ``lines`` text lines below it."""
    rows = [text] if isinstance(text, str) else list(text)
    chars = max(8, im.width // 6)
    strip = 13 * lines + 4
    out = Image.new("RGB", (im.width, im.height + strip), "white")
    out.paste(im.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(rows[:lines]):
        draw.text((3, im.height + 2 + 13 * i), str(line)[:chars], fill="black")
    return out


def image_tile(image: torch.Tensor) -> Image.Image:
    return upscale(overlay(image, torch.zeros(image.shape[-2:]), alpha=0.0))


def map_tile(image: torch.Tensor, saliency: torch.Tensor) -> Image.Image:
    return upscale(overlay(image, saliency))


def draw_boxes(im: Image.Image, boxes: Sequence[tuple[Sequence[float], str]],
               size: tuple[int, int]) -> Image.Image:
    """Outline ``[x0, y0, x1, y1)`` boxes (input pixels of an image of ``size``) on a tile."""
    im = im.copy()
    sx, sy = im.width / size[1], im.height / size[0]
    draw = ImageDraw.Draw(im)
    for box, colour in boxes:
        x0, y0, x1, y1 = box
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=colour, width=2)
    return im


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` to ``path`` atomically (temporary name, then ``os.replace``)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def class_name(names: Sequence[str] | None, c: int) -> str:
    return str(names[c]) if names is not None and 0 <= c < len(names) else f"class {c}"


def names_of(backbone, dataset=None) -> list[str] | None:
    """The class names the figures show: the data set's (its class list), else the
    backbone's own (the data set's labels index the same classes: ``check_classes``)."""
    return getattr(dataset, "classes", None) or getattr(backbone, "class_names", None)


# -- model helpers ----------------------------------------------------------------------------
@torch.no_grad()
def predict(backbone, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 classes and softmax probabilities (B, R) of ``images`` in [0, 1]."""
    probs = torch.cat([backbone(images[i:i + batch].to(backbone.device)).softmax(1).cpu()
                       for i in range(0, len(images), batch)])
    return probs.argmax(1), probs


def load_items(dataset, indices: Sequence[int]):
    """``(images (N,3,H,W), labels (N,), ids)`` for ``indices`` of ``dataset``."""
    items = [dataset[i] for i in indices]
    if not items:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long), []
    return (torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items]),
            [str(it[2]) for it in items])


def explain_batched(explainer, images: torch.Tensor, targets: torch.Tensor,
                    batch: int = 16) -> torch.Tensor:
    return torch.cat([explainer.explain(images[i:i + batch], targets[i:i + batch]).cpu()
                      for i in range(0, len(images), batch)]) if len(images) else \
        torch.zeros(0, *images.shape[-2:])


# -- figures ----------------------------------------------------------------------------------
def error_figure(backbone, explainer, images: torch.Tensor, labels: torch.Tensor,
                 ids: Sequence[str], out_dir: str | Path, max_images: int = 6,
                 class_names: Sequence[str] | None = None,
                 name: str = "errors.png") -> tuple[list[Path], dict[str, float]]:
    """Misclassified images with their ground-truth and predicted maps (figs 5-6).

    Only the first ``max_images`` misclassified images are explained (2 explanations each).
    Metrics: ``error_images`` (how many were shown) and ``error_gt_pred_spearman``.
    """
    labels = torch.as_tensor(labels).long()
    pred, probs = predict(backbone, images)
    wrong = torch.nonzero(pred != labels).flatten()[:max_images]
    if len(wrong) == 0:
        return [], {"error_images": 0.0}
    x, gt, pr = images[wrong], labels[wrong], pred[wrong]
    maps_gt = explain_batched(explainer, x, gt)
    maps_pr = explain_batched(explainer, x, pr)
    rows = [[], [], []]
    for j, i in enumerate(wrong.tolist()):
        rows[0].append(caption(image_tile(x[j]), [str(ids[i])]))
        rows[1].append(caption(map_tile(x[j], maps_gt[j]),
                               [f"GT: {class_name(class_names, int(gt[j]))}",
                                f"p={float(probs[i, gt[j]]):.2f}"]))
        rows[2].append(caption(map_tile(x[j], maps_pr[j]),
                               [f"pred: {class_name(class_names, int(pr[j]))}",
                                f"p={float(probs[i, pr[j]]):.2f}"]))
    path = save_png(grid(rows, ["image", "ground truth", "predicted"]), Path(out_dir) / name)
    rho = sanity.spearman(maps_gt, maps_pr)
    return [path], {"error_images": float(len(wrong)),
                    "error_gt_pred_spearman": float(rho.mean())}


def class_gallery(backbone, explainer, images: torch.Tensor, labels: torch.Tensor,
                  ids: Sequence[str], class_index: int, out_dir: str | Path,
                  max_images: int = 8, class_names: Sequence[str] | None = None,
                  name: str | None = None) -> tuple[list[Path], dict[str, float]]:
    """Images of ``class_index`` with that class's maps and the prediction (figs 7-9).

    Correctly classified images come first, then the errors (as the paper's last columns).
    Metric: ``gallery_accuracy`` over the images shown.
    """
    labels = torch.as_tensor(labels).long()
    idx = torch.nonzero(labels == class_index).flatten()
    if len(idx) == 0:
        return [], {}
    pred, probs = predict(backbone, images[idx])
    order = sorted(range(len(idx)), key=lambda j: (int(pred[j] != class_index), j))[:max_images]
    sel = idx[order]
    x = images[sel]
    maps = explain_batched(explainer, x, torch.full((len(sel),), int(class_index)))
    rows = [[], []]
    for j, o in enumerate(order):
        p = int(pred[o])
        verdict = "correct" if p == class_index else f"-> {class_name(class_names, p)}"
        rows[0].append(caption(image_tile(x[j]), [str(ids[int(sel[j])])]))
        rows[1].append(caption(map_tile(x[j], maps[j]),
                               [verdict, f"p={float(probs[o, class_index]):.2f}"]))
    cname = class_name(class_names, class_index)
    fname = name or f"gallery-{''.join(c if c.isalnum() else '_' for c in cname)}.png"
    path = save_png(grid(rows, ["image", cname]), Path(out_dir) / fname)
    acc = sum(int(pred[o]) == class_index for o in order) / len(order)
    return [path], {"gallery_accuracy": float(acc)}


def shortcut_figure(backbone, explainer, dataset, out_dir: str | Path, max_images: int = 6,
                    score_images: int | None = 30,
                    name: str = "shortcut.png") -> tuple[list[Path], dict[str, float]]:
    """The planted-shortcut class of the quickstart: maps, boxes and energy shares.

    Explains the shortcut class (not the prediction) on up to ``score_images`` of its images
    (cue images first); the figure shows up to ``max_images`` (half with the cue when there
    are enough). Returns no paths and no metrics when the data set has no such class.
    """
    from harness.data.quickstart import CLASSES, SHORTCUT_CLASS
    if getattr(dataset, "info", {}).get("kind") != "quickstart":
        return [], {}
    c = CLASSES.index(SHORTCUT_CLASS)
    size = tuple(dataset[0][0].shape[-2:]) if len(dataset) else (0, 0)
    members = [i for i, label in enumerate(labels_of(dataset)) if label == c]
    regs = {i: localisation.regions_for(dataset.path_of(i), size, "quickstart") for i in members}
    members = [i for i in members if regs[i] is not None]
    cue = [i for i in members if regs[i].cue is not None]
    plain = [i for i in members if regs[i].cue is None]
    scored = (cue + plain)[: score_images] if score_images else cue + plain
    if not scored:
        return [], {}
    images, labels, ids = load_items(dataset, scored)
    maps = explain_batched(explainer, images, torch.full((len(scored),), c))
    pred, _ = predict(backbone, images)
    boxes = torch.stack([regs[i].box for i in scored])
    obj_share = localisation.energy_share(maps, boxes)
    cue_share = torch.tensor([float(localisation.energy_share(maps[j], regs[i].cue)[0])
                              if regs[i].cue is not None else math.nan
                              for j, i in enumerate(scored)], dtype=torch.float64)
    has = torch.tensor([regs[i].cue is not None for i in scored])
    metrics = {"shortcut_images": float(len(scored)), "shortcut_cue_images": float(has.sum())}
    if has.any():
        metrics["shortcut_cue_energy"] = float(cue_share[has].mean())
        metrics["shortcut_object_energy"] = float(obj_share[has].mean())
        metrics["shortcut_accuracy_cue"] = float((pred[has] == c).double().mean())
    if (~has).any():
        metrics["shortcut_object_energy_nocue"] = float(obj_share[~has].mean())
        metrics["shortcut_accuracy_nocue"] = float((pred[~has] == c).double().mean())
    n_has = int(has.sum())
    n_cue = min(n_has, max_images - min(len(scored) - n_has, max_images // 2))
    shown = list(range(n_cue)) + list(range(n_has, len(scored)))[: max_images - n_cue]
    from harness.data.quickstart import annotation
    rows = [[], []]
    for j in shown:
        i = scored[j]
        ann = annotation(dataset.path_of(i))
        marks = [(ann["box"], "lime")] + ([(ann["cue_box"], "red")] if ann.get("cue_box") else [])
        rows[0].append(caption(draw_boxes(image_tile(images[j]), marks, size),
                               [ids[j], "cue" if has[j] else "no cue"]))
        text = f"obj {float(obj_share[j]):.2f}" + (f" cue {float(cue_share[j]):.2f}"
                                                    if has[j] else "")
        rows[1].append(caption(map_tile(images[j], maps[j]),
                               [text, f"pred {class_name(list(CLASSES), int(pred[j]))}"]))
    path = save_png(grid(rows, ["image", f"{SHORTCUT_CLASS} map"]), Path(out_dir) / name)
    return [path], metrics


def localisation_metrics(backbone, explainer, dataset, max_images: int | None = None,
                         batch: int = 16, voc_dir: str | Path | None = None) -> dict[str, float]:
    """Energy-based pointing game (maps of the top-1 class) over the first ``max_images``."""
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    cols: dict[str, list[float]] = {c: [] for c in localisation.COLUMNS}
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        images, _, _ = load_items(dataset, idx)
        pred, _ = predict(backbone, images)
        maps = explainer.explain(images, pred).cpu()
        for k, v in localisation.energy_columns(dataset, idx, maps, voc_dir).items():
            cols[k] += v
    return localisation.energy_metrics(cols)


# -- everything for one method run ------------------------------------------------------------
def _errors_from_table(per_image, dataset) -> list[int] | None:
    """Dataset indices of misclassified images according to a per-image table, or None."""
    if per_image is None:
        return None
    get = (lambda c: per_image.column(c).to_pylist()) if hasattr(per_image, "column") \
        else per_image.get
    try:
        ids, pred, gt = get("image_id"), get("class_explained"), get("ground_truth")
    except (KeyError, TypeError):
        return None
    if ids is None or pred is None or gt is None:
        return None
    where = {image_id: i for i, image_id in enumerate(dataset.ids)}
    return [where[i] for i, p, g in zip(ids, pred, gt) if p != g and i in where]


def _find_errors(backbone, dataset, per_image, scan_images: int) -> list[int]:
    """Misclassified images: from the per-image table when given, else predicted over the
    first ``scan_images`` images."""
    errors = _errors_from_table(per_image, dataset)
    if errors is not None:
        return errors
    scan = list(range(min(len(dataset), scan_images)))
    images, labels, _ = load_items(dataset, scan)
    pred, _ = predict(backbone, images) if len(scan) else (torch.zeros(0), None)
    return [i for i, p, g in zip(scan, pred.tolist(), labels.tolist()) if p != g]


def labels_of(dataset) -> list[int]:
    """Every image's label, read once (``dataset.items`` may build its list on each access:
    indexing it per image made the gallery quadratic in the images, hours at 50,000)."""
    return [int(label) for _, label, _ in dataset.items]


def _gallery_class(dataset, errors: list[int]) -> int | None:
    """The quickstart's shortcut class, else the class with the most errors found."""
    if getattr(dataset, "info", {}).get("kind") == "quickstart":
        from harness.data.quickstart import CLASSES, SHORTCUT_CLASS
        return CLASSES.index(SHORTCUT_CLASS)
    if errors:
        labels = labels_of(dataset)
        gts = [labels[i] for i in errors]
        return max(sorted(set(gts)), key=gts.count)
    return None


def analyse(backbone, explainer, dataset, out_dir: str | Path, *, figure_images: int = 6,
            scan_images: int = 200, gallery_class: int | None = None,
            localisation_images: int | None = -1, sanity_images: int | None = None,
            sanity_steps: int | None = None, per_image=None, voc_dir=None,
            seed: int = 0) -> dict[str, Any]:
    """All figures and numbers for one backbone x method: {'paths': [...], 'metrics': {...}}.

    ``per_image``: the run's per-image table (``per_image.parquet`` as a pyarrow table or a
    dict of lists); when it has the ``localisation.COLUMNS`` they give the localisation
    metrics and its ``class_explained``/``ground_truth`` give the errors, without forwards.
    Otherwise errors are searched in the first ``scan_images`` images and the localisation
    is recomputed over ``localisation_images`` images (-1: all for gradient/learned methods,
    32 for perturbation ones; 0 or None: skip). ``sanity_images`` (default 4, perturbation
    methods 1) images go through the randomisation test (0: skip). The gallery shows
    ``gallery_class`` (default: the quickstart's shortcut class, else the class with the
    most errors found).
    """
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    names = names_of(backbone, dataset)
    perturbation = getattr(explainer, "family", "") == "perturbation"
    paths: list[Path] = []
    metrics: dict[str, float] = {}

    def add(found: tuple[list[Path], dict[str, float]]) -> None:
        paths.extend(found[0])
        metrics.update(found[1])

    errors = _find_errors(backbone, dataset, per_image, scan_images)
    if errors:
        images, labels, ids = load_items(dataset, errors[:figure_images])
        add(error_figure(backbone, explainer, images, labels, ids, out_dir, figure_images, names))
    else:
        metrics["error_images"] = 0.0
    kind = getattr(dataset, "info", {}).get("kind")
    if gallery_class is None:
        gallery_class = _gallery_class(dataset, errors)
    if gallery_class is not None:
        members = [i for i, label in enumerate(labels_of(dataset)) if label == gallery_class]
        images, labels, ids = load_items(dataset, members[: max(figure_images * 4, 24)])
        add(class_gallery(backbone, explainer, images, labels, ids, gallery_class, out_dir,
                          max(figure_images, 8), names))
    if kind == "quickstart":
        add(shortcut_figure(backbone, explainer, dataset, out_dir, figure_images,
                            score_images=figure_images if perturbation else 30))

    table_metrics = localisation.energy_metrics(per_image) if per_image is not None else {}
    if table_metrics:
        metrics.update(table_metrics)
    elif localisation_images:
        limit = None if localisation_images == -1 and not perturbation else \
            (32 if localisation_images == -1 else localisation_images)
        metrics.update(localisation_metrics(backbone, explainer, dataset, limit, voc_dir=voc_dir))

    n_sanity = (1 if perturbation else 4) if sanity_images is None else int(sanity_images)
    if n_sanity > 0 and len(dataset):
        images, _, _ = load_items(dataset, list(range(min(n_sanity, len(dataset)))))
        result = sanity.randomisation_test(explainer, images, steps=sanity_steps, seed=seed)
        metrics.update(result.as_metrics())
    return {"paths": paths, "metrics": metrics}


__all__ = ["analyse", "caption", "class_gallery", "error_figure", "localisation_metrics",
           "predict", "save_png", "shortcut_figure"]
