"""A worked example of benchmarking your own data set: a generated 3-class folder and a
small classifier trained on it (docs/datasets.md walks through it).

    python examples/own-dataset/shapes3.py make  shapes3             # the data set (seconds)
    python examples/own-dataset/shapes3.py train shapes3 tiny_vgg-shapes3.pt   # ~1 min, CPU
    python -m harness run examples/own-dataset/benchmark.yaml data.root=shapes3 \\
        'backbones[0].weights=tiny_vgg-shapes3.pt'

``make`` writes an image-classification folder in the layout the harness reads
(``data.kind: folder``): ``classes.txt`` (house, sun, tree), ``train/<class>/*.png``,
``val/<class>/*.png`` with each object's mask beside it (``<stem>.mask.png``) and its box in
``val/annotations.json``, so that the localisation metrics run too. ``train`` trains the
embedded ``tiny_vgg`` architecture with 3 outputs on the training split (plain torch, seeded)
and saves its state_dict: the harness reads the number of classes from the file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("house", "sun", "tree")
SIZE = 64


def _background(rng: np.random.Generator) -> Image.Image:
    base = rng.uniform(60, 200, 3)
    noise = rng.normal(0, 18, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _draw(cls: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image, list[int]]:
    """An image of ``cls``, its mask (L, 0/255) and its box [x0, y0, x1, y1]."""
    img, mask = _background(rng), Image.new("L", (SIZE, SIZE), 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    r = int(rng.integers(10, 16))
    cx, cy = (int(v) for v in rng.integers(r + 4, SIZE - r - 4, 2))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    if cls == "house":
        body = [cx - r, cy - r // 3, cx + r, cy + r]
        roof = [(cx - r - 2, cy - r // 3), (cx + r + 2, cy - r // 3), (cx, cy - r - 4)]
        for draw, fill in ((d, colour), (m, 255)):
            draw.rectangle(body, fill=fill)
            draw.polygon(roof, fill=fill)
    elif cls == "sun":
        for draw, fill in ((d, (250, 210, 40)), (m, 255)):
            draw.ellipse([cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2], fill=fill)
            for k in range(8):
                a = k * np.pi / 4
                draw.line([cx, cy, cx + r * np.cos(a), cy + r * np.sin(a)], fill=fill, width=2)
    else:
        for draw, fill_trunk, fill_top in ((d, (110, 70, 30), (30, 140, 40)), (m, 255, 255)):
            draw.rectangle([cx - 2, cy, cx + 2, cy + r], fill=fill_trunk)
            draw.ellipse([cx - r + 3, cy - r, cx + r - 3, cy + 3], fill=fill_top)
    rows, cols = np.nonzero(np.asarray(mask) > 127)
    box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
    return img, mask, box


def make(root: str | Path, train_per_class: int = 120, val_per_class: int = 30,
         seed: int = 0) -> Path:
    """Write the data set under ``root`` (see the module docstring); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        boxes = {}
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, mask, box = _draw(cls, rng)
                img.save(folder / f"{cls}_{i:04d}.png")
                if split == "val":
                    mask.save(folder / f"{cls}_{i:04d}.mask.png")
                    boxes[f"{cls}/{cls}_{i:04d}.png"] = {"box": box}
        if boxes:
            (root / split / "annotations.json").write_text(json.dumps(boxes))
    return root


def train(root: str | Path, out: str | Path, epochs: int = 4, seed: int = 0) -> float:
    """Train ``tiny_vgg`` with 3 outputs on ``root``'s training split, save its state_dict
    to ``out``; returns the accuracy on the val split."""
    import torch
    from torch.nn import functional as F

    from backbones.embedded import ARCHS
    from harness.data.images import build_dataset
    torch.manual_seed(seed)
    model = ARCHS["tiny_vgg"](num_classes=len(CLASSES))
    data = build_dataset("folder", "train", SIZE, root=root, train=True)
    val = build_dataset("folder", "val", SIZE, root=root)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for _ in range(epochs):
        model.train()
        for x, y, _ in loader:
            opt.zero_grad()
            F.cross_entropy(model((x - mean) / std), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        x = torch.stack([val[i][0] for i in range(len(val))])
        accuracy = float((model((x - mean) / std).argmax(1) == torch.tensor(val.labels))
                         .float().mean())
    torch.save(model.state_dict(), out)
    return accuracy


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "make":
        print(f"wrote {make(argv[1])}")
        return 0
    if len(argv) >= 3 and argv[0] == "train":
        print(f"wrote {argv[2]}: val accuracy {train(argv[1], argv[2]):.3f}")
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
