"""Class-specific saliency overlays for your own images (the L-CAM paper's fig. 4), as PNG.

    python -m harness explain cat.jpg dog.png --backbone vgg16_7x7 --method lcam_img \\
        --checkpoint heads/vgg16_7x7/img.pt --classes 282 285
    python -m harness explain img/*.png --backbone tiny_vgg --method gradcam --top-k 3

For each image, one PNG ``<out>/<NNN>-<stem>-<method>.png``: the image, then the map of each
requested class blended over it, labelled with the class name (when the backbone has
``class_names``) and its softmax probability. Classes: ``--classes`` (indices, the same for
every image) or ``--top-k K`` (each image's own K most probable classes; default 1).

Images are read with ``harness.data.load_image`` and prepared with the backbone's eval
transform (``harness.data.make_transform``: shorter side to 256/224 of the input size, center
crop; the embedded backbones use the quickstart's transform). Any registered method works
(``--variant``, ``--param key=value`` for its parameters, ``--checkpoint`` for a trained
L-CAM head); ``--weights`` names the backbone weights (``none`` for random init).
A summary ``explain.json`` lists the files, classes and probabilities.

Exit 2 for bad input (a missing or undecodable image, an unknown backbone or method, bad
weights or parameters, a class index out of range), with one line naming the problem.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from harness.errors import UserError
from harness.data.cache import write_text_atomic

DEFAULT_OUT = "explanations"


class InputProblem(UserError):
    """Bad command-line input: exit 2."""


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--backbone", required=True, help="registered backbone name")
    parser.add_argument("--weights", default=None,
                        help="backbone weights (default: the registry's; 'none' = random init)")
    parser.add_argument("--method", required=True, help="registered method name")
    parser.add_argument("--variant", default=None, help="method variant (default: paper)")
    parser.add_argument("--checkpoint", default=None, metavar="HEAD.pt",
                        help="trained L-CAM head")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a method parameter (YAML value), repeatable")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", nargs="+", type=int, metavar="C",
                       help="class indices to explain (for every image)")
    group.add_argument("--top-k", type=int, default=None, metavar="K",
                       help="explain each image's K most probable classes (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: {DEFAULT_OUT})")


def transform_kind(backbone_name: str) -> str:
    """'quickstart' for the embedded backbones (their data's transform), else 'imagenet'."""
    import backbones
    meta = backbones.REGISTRY.get(backbone_name).meta
    return "quickstart" if str(meta.get("dataset", "")).startswith("quickstart") else "imagenet"


def load_images(paths: Sequence[str | Path], input_size, kind: str, resize: int | None = None,
                interpolation: str = "bilinear") -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] through the eval transform (``resize``, ``interpolation``: the
    backbone weights' own, ``backbones.preprocessing``); ``InputProblem`` naming bad files."""
    from harness.data.images import DataError, load_image, make_transform
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise InputProblem(f"image file(s) not found: {', '.join(missing)}")
    transform = make_transform(input_size, train=False, kind=kind, resize=resize,
                               interpolation=interpolation)
    try:
        return torch.stack([transform(load_image(p)) for p in paths])
    except DataError as err:
        raise InputProblem(str(err)) from None


def parse_params(items: Sequence[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputProblem(f"--param {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def choose_classes(probs: torch.Tensor, classes: Sequence[int] | None, top_k: int | None,
                   num_classes: int) -> list[list[int]]:
    """The classes to explain for each image (validated)."""
    if classes:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise InputProblem(f"--classes: {', '.join(map(str, bad))} out of range: the backbone "
                               f"has classes 0..{num_classes - 1}")
        return [list(classes) for _ in range(len(probs))]
    k = 1 if top_k is None else int(top_k)
    if not 1 <= k <= num_classes:
        raise InputProblem(f"--top-k: {k} must be in 1..{num_classes}")
    return probs.topk(k, dim=1).indices.tolist()


def render(image: torch.Tensor, maps: torch.Tensor, classes: Sequence[int], probs: torch.Tensor,
           names: Sequence[str] | None, title: str):
    """One row: the image, then each class's overlay, captioned (a PIL image)."""
    from harness.results.analysis import caption, class_name, image_tile, map_tile
    from harness.results.overlays import grid
    row = [caption(image_tile(image), [Path(title).name[:40], "input"])]
    for c, m in zip(classes, maps):
        row.append(caption(map_tile(image, m), [class_name(names, int(c)),
                                                 f"p={float(probs[c]):.3f}"]))
    return grid([row])


def explain_images(backbone, explainer, images: torch.Tensor, titles: Sequence[str],
                   out_dir: str | Path, classes: Sequence[int] | None = None,
                   top_k: int | None = None, suffix: str = "") -> list[dict]:
    """Write one PNG per image (see the module doc); returns one record per image."""
    from harness.results.analysis import predict, save_png
    out_dir = Path(out_dir)
    _, probs = predict(backbone, images)
    chosen = choose_classes(probs, classes, top_k, backbone.num_classes)
    names = getattr(backbone, "class_names", None)
    records = []
    for i, (image, cls) in enumerate(zip(images, chosen)):
        batch = image[None].expand(len(cls), -1, -1, -1).contiguous()
        maps = explainer.explain(batch, torch.tensor(cls)).cpu()
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(titles[i]).stem)
        path = save_png(render(image, maps, cls, probs[i], names, titles[i]),
                        out_dir / f"{i:03d}-{stem}{suffix}.png")
        records.append({"image": str(titles[i]), "png": str(path), "classes": [int(c) for c in cls],
                        "class_names": [names[c] if names else None for c in cls],
                        "probabilities": [float(probs[i, c]) for c in cls],
                        "degenerate": [bool(d) for d in explainer.last_degenerate.tolist()]})
    return records


def run(args) -> list[dict]:
    """The command body; raises ``InputProblem`` for bad input."""
    import backbones
    import methods
    from backbones.registry import UnknownNameError
    from harness.data.models import load_backbone
    try:
        kind = transform_kind(args.backbone)
        methods.method_class(args.method)
    except UnknownNameError as err:
        raise InputProblem(str(err)) from None
    weights = args.weights
    kwargs = {}
    if weights is not None:
        kwargs["weights"] = None if weights.lower() in ("none", "null", "random") else weights
    try:
        bb = load_backbone(args.backbone, **kwargs)
    except backbones.WeightsError as err:
        raise InputProblem(str(err)) from None
    pre = backbones.preprocessing(args.backbone, *kwargs.values())       # the weights' own
    own = kind == "imagenet"
    images = load_images(args.images, bb.input_size, kind, pre.resize if own else None,
                         pre.interpolation if own else "bilinear")
    params = parse_params(args.param)
    if args.checkpoint:
        params["checkpoint"] = args.checkpoint
    try:
        explainer = methods.create(args.method, bb, variant=args.variant, **params)
    except methods.ExplainerInputError as err:
        raise InputProblem(str(err)) from None
    records = explain_images(bb, explainer, images, list(args.images), args.out, args.classes,
                             args.top_k, suffix=f"-{args.method}")
    summary = {"backbone": bb.name, "weights_id": bb.weights_id, **explainer.describe(),
               "images": records}
    write_text_atomic(Path(args.out) / "explain.json",
                      json.dumps(summary, indent=1, default=str) + "\n")
    return records


def main(args) -> int:
    records = run(args)
    for r in records:
        names = ", ".join(f"{n or c} ({p:.3f})" for c, n, p in
                          zip(r["classes"], r["class_names"], r["probabilities"]))
        print(f"{r['png']}: {names}")
    return 0
