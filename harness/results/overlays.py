"""Saliency overlays as PNG: a jet-like colour map blended over the image, in a grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from harness.data.cache import atomic_write


def colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB uint8 with a piecewise-linear jet palette (blue -> red)."""
    v = np.clip(values, 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: torch.Tensor, saliency: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """One (3, H, W) [0, 1] image with its (H, W) map blended on top."""
    img = (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.float32)
    heat = colormap(saliency.detach().cpu().numpy()).astype(np.float32)
    return Image.fromarray(((1 - alpha) * img + alpha * heat).astype(np.uint8))


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, scale: int = 1,
         col_labels: list[str] | None = None) -> Image.Image:
    """Tile PIL images into a grid with optional row and column labels."""
    h = max(im.height for row in rows for im in row) * scale
    w = max(im.width for row in rows for im in row) * scale
    left = 110 if labels else 0
    top = 16 if col_labels else 0
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + ncol * w, top + len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels or []):
        draw.text((left + j * w + 2, 2), text[:18], fill="black")
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, top + i * h + h // 2 - 6), labels[i][:16], fill="black")
        for j, im in enumerate(row):
            canvas.paste(im.resize((w, h), Image.NEAREST), (left + j * w, top + i * h))
    return canvas


def save_overlay_grid(path: Path, images: torch.Tensor, saliency: torch.Tensor,
                      titles: list[str] | None = None, scale: int = 2) -> Path:
    """A two-row grid: the images, and their overlays; written atomically."""
    originals = [overlay(im, torch.zeros(im.shape[-2:]), alpha=0.0) for im in images]
    overlays = [overlay(im, s) for im, s in zip(images, saliency)]
    out = grid([originals, overlays], ["image", "saliency"], scale, titles)
    return atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
