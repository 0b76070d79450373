"""RISE: Randomized Input Sampling for Explanation (Petsiuk et al., BMVC 2018).

N random masks M_i: an s x s grid of Bernoulli(p1) cells (s = ``cell``), bilinearly upsampled
to (s + 1) * ceil(H / s), shifted by a random 0..ceil(H / s) - 1 pixels in each direction and
cropped to H x W. For class c:

    saliency_c = 1 / (N * p1) * sum_i p_c(X (.) M_i) * M_i,   then min-max.

``variant``: how the grids are upsampled. ``paper``: torch's bilinear resize
(align_corners=False), which clamps at the border. ``reference`` (RISE's own code, which the
L-CAM authors ran): scikit-image's ``resize(order=1, mode='reflect')``, the same bilinear
resize but mirrored at the border: a source coordinate x = (j + 0.5) * s / n - 0.5 outside
[0, s - 1] is reflected about the edge cell (x -> -x, x -> 2 (s - 1) - x) instead of being
clamped (``mirror_resize_matrix``). The two differ only in the outer half cell of the
upsampled grid (rows and columns 0-17 and 238-255 of the 256 canvas for s = 7 at 224),
which a shift exposes in a mask.
``fill``: 'mean' (default, RISE's own code: the *normalised* image is masked, so removed
pixels take the dataset mean colour) or 'black' (the [0, 1] image is masked).

The mask set is defined by (n_masks, cell, p1, size, seed) alone and identified by a
SHA-256 hash; only the s x s grids and shifts are kept, and full-size masks are rebuilt one
batch at a time, so memory grows with ``batch_size``, never with N. Cost: N forwards.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from .base import Explainer, Param
from .registry import register

DEFAULT_MASKS = {"vgg16": 4000, "vgg16_7x7": 4000, "resnet50": 8000}


UPSAMPLING = ("clamp", "mirror")    # paper: torch's bilinear; reference: scikit-image's


def mirror_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of a bilinear resize with half-pixel centres and mirror borders.

    Output pixel j samples the input at x = (j + 0.5) * n_in / n_out - 0.5 (pixel centres
    aligned, as align_corners=False and scipy's ``zoom(grid_mode=True)``); x is reflected
    about the first and last cells ('mirror': ... c b | a b c ... x y | x w ...), and the
    row gets 1 - f at floor(x) and f at floor(x) + 1, f = x - floor(x). A 2-D resize is
    ``W_rows @ grid @ W_cols^T``: scikit-image's ``resize(order=1, mode='reflect',
    anti_aliasing=False)``, which RISE's code calls.
    """
    x = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    if n_in > 1:
        period = 2 * (n_in - 1)
        x = torch.remainder(x.abs(), period)
        x = torch.where(x > n_in - 1, period - x, x)
    else:
        x = torch.zeros_like(x)
    lo = x.floor().long().clamp(0, n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = x - lo
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.float()


class MaskSet:
    """A seeded RISE mask set, rebuilt lazily batch by batch (see module docstring).

    ``upsample``: 'clamp' (torch's bilinear, the ``paper`` variant) or 'mirror' (scikit-image's
    reflect mode, the ``reference`` variant); the grids and shifts do not depend on it."""

    def __init__(self, n_masks: int, cell: int, p1: float, size: tuple[int, int], seed: int,
                 upsample: str = "clamp"):
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
        self.n_masks, self.cell, self.p1, self.size, self.seed = n_masks, cell, p1, tuple(size), seed
        self.upsample = upsample
        gen = torch.Generator().manual_seed(seed)
        self.grids = (torch.rand(n_masks, 1, cell, cell, generator=gen) < p1).float()
        self.cell_px = (math.ceil(size[0] / cell), math.ceil(size[1] / cell))
        self.shifts = torch.stack([torch.randint(0, self.cell_px[0], (n_masks,), generator=gen),
                                   torch.randint(0, self.cell_px[1], (n_masks,), generator=gen)], 1)
        h = hashlib.sha256()
        mode = "" if upsample == "clamp" else f"{upsample}|"      # clamp: hashes kept
        h.update(f"rise-v1|{n_masks}|{cell}|{p1!r}|{self.size}|{seed}|{mode}".encode())
        h.update(self.grids.to(torch.uint8).numpy().tobytes())
        h.update(self.shifts.numpy().astype("int64").tobytes())
        self.hash = h.hexdigest()[:16]

    def __len__(self) -> int:
        return self.n_masks

    def upsampled(self, start: int, stop: int, device=None) -> torch.Tensor:
        """Grids start..stop-1 resized to (s + 1) * cell pixels per side, (n, H', W')."""
        size = ((self.cell + 1) * self.cell_px[0], (self.cell + 1) * self.cell_px[1])
        grids = self.grids[start:stop].to(device)
        if self.upsample == "clamp":
            return F.interpolate(grids, size=size, mode="bilinear", align_corners=False)[:, 0]
        rows = mirror_resize_matrix(self.cell, size[0]).to(grids.device)
        cols = mirror_resize_matrix(self.cell, size[1]).to(grids.device)
        return rows @ grids[:, 0] @ cols.T

    def batch(self, start: int, stop: int, device=None) -> torch.Tensor:
        """Masks start..stop-1 as a (n, H, W) float tensor in [0, 1]."""
        h, w = self.size
        up = self.upsampled(start, stop, device)
        out = torch.empty(len(up), h, w, device=up.device)
        for i, (dy, dx) in enumerate(self.shifts[start:stop].tolist()):
            out[i] = up[i, dy:dy + h, dx:dx + w]
        return out


@lru_cache(maxsize=8)
def mask_set(n_masks: int, cell: int, p1: float, size: tuple[int, int], seed: int,
             upsample: str = "clamp") -> MaskSet:
    """The shared mask set for these parameters (generated once per process)."""
    return MaskSet(n_masks, cell, p1, size, seed, upsample)


@register
class RISE(Explainer):
    """RISE: the class probability of randomly masked copies, averaged over the masks."""

    name = "rise"
    display_name = "RISE"
    family = "perturbation"
    paper = "Petsiuk et al., RISE, BMVC 2018"
    variants = ("paper", "reference")
    version = 2                     # 2: the reference variant's masks mirrored at the border
    normalise_at = "input"
    # p1 is open at both ends: p1 = 0 keeps no cell (every mask is 0 and the 1 / (N p1)
    # normalisation divides by zero); p1 = 1 keeps every cell (RISE's code draws
    # rand < p1, always true), so every mask is all ones and every map is constant
    # (degenerate). For the same reason cell >= 2: a 1 x 1 grid upsamples to a constant mask.
    params = {
        "n_masks": Param(int, None, "number of masks N (default 4000 VGG-16, 8000 ResNet-50)",
                         ge=1),
        "cell": Param(int, 7, "grid size s (s x s cells)", ge=2),
        "p1": Param((int, float), 0.5, "probability that a grid cell is kept", gt=0, lt=1),
        "seed": Param(int, 0, "seed of the mask set", ge=0),
        "fill": Param(str, "mean", "'mean' (mask the normalised image) or 'black'",
                      choices=("mean", "black")),
        "batch_size": Param(int, 64, "masked images per forward", ge=1),
    }

    def setup(self) -> None:
        if self.config["n_masks"] is None:
            self.config["n_masks"] = DEFAULT_MASKS.get(getattr(self.backbone, "name", ""), 4000)

    @classmethod
    def planned_forward_passes(cls, params, backbone) -> int:
        n = params.get("n_masks")
        return int(n if n is not None else DEFAULT_MASKS.get(backbone.get("name", ""), 4000))

    def masks_for(self, size: tuple[int, int]) -> MaskSet:
        c = self.config
        return mask_set(c["n_masks"], c["cell"], float(c["p1"]), tuple(size), c["seed"],
                        "mirror" if self.variant == "reference" else "clamp")

    def describe(self) -> dict:
        info = super().describe()
        size = getattr(self.backbone, "input_size", (224, 224))
        info["rise_mask_hash"] = self.masks_for(tuple(size)).hash
        return info

    @torch.no_grad()
    def _saliency(self, images, feats, logits, targets):
        c = self.config
        size = tuple(images.shape[-2:])
        masks = self.masks_for(size)
        self.last_mask_hash = masks.hash
        bb = self.backbone
        black = c["fill"] == "black"
        inputs = images if black else bb.normalize(images)
        acc = torch.zeros(len(images), *size, device=images.device)
        for start in range(0, len(masks), c["batch_size"]):
            m = masks.batch(start, min(start + c["batch_size"], len(masks)), images.device)
            for b in range(len(images)):
                batch = inputs[b:b + 1] * m[:, None]
                out = bb(batch) if black else bb.forward_normalized(batch)
                p = out.softmax(dim=1)[:, targets[b]]
                acc[b] += torch.einsum("n,nhw->hw", p, m)
        return acc / (len(masks) * float(c["p1"]))
