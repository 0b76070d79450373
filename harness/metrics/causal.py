"""Deletion and insertion (Petsiuk, Das & Saenko, RISE, BMVC 2018): the causal metrics.

For an image X (3, H, W) in [0, 1], its map V (H, W), the explained class c and T steps,
with P = H * W pixels and n_k = ceil(k * P / T) for k = 0..T:

    S_k      = the n_k highest pixels of V (ties: docs/protocol.md 2.1, the earliest pixels
               in raster order rank lowest), so S_k is exactly the set phi_nu keeps at
               nu = n_k / P (``harness.metrics.protocol.keep_top``), and S_0 = {}, S_T = all
    deletion:  X_k = X with the pixels of S_k replaced by the canvas C_del
    insertion: X_k = the canvas C_ins with the pixels of S_k taken from X
    p_k      = softmax probability of c on X_k (always probabilities, whatever the preset)
    AUC      = sum_{k<T} (x_{k+1} - x_k) * (p_k + p_{k+1}) / 2,   x_k = n_k / P

the area under the probability curve over the share of pixels changed, by the trapezoidal
rule (with x_k = k / T whenever T divides P, e.g. 224 steps at 224 x 224: 224 pixels a step,
RISE's setting). Deletion: lower is better (removing the most salient pixels first should
destroy the class quickly); insertion: higher is better. Each AUC is in [0, 1] and costs
T + 1 forwards per image (k = 0 included), reported apart from the explanation's #FW.

Canvases (``evaluation.causal_canvas``):

- ``rise`` (default): RISE's evaluation code (``CausalMetric`` with its ``gkern(11, 5)``
  substrate), exactly: deletion replaces pixels by the dataset's mean colour (its code
  writes zeros into the *normalised* tensor), insertion starts from RISE's blur (below);
- ``blur``: our Gaussian blur for both; ``black``: pixel value 0 (the AD/IC fill) for
  both; ``mean``: the mean colour (the backbone's normalisation mean) for both.

RISE's blur (``rise_blur``) convolves the normalised tensor with scipy's
``gaussian_filter(delta, 5)`` of an 11 x 11 delta (``rise_kernel``: 1-D Gaussian taps of
radius int(4 * 5 + 0.5) = 20, each axis folded back into the 11-pixel window by scipy's
half-sample reflection, so nearly a box filter: centre 0.00883, corner 0.00774, float32)
with zero padding. Zeros of the normalised tensor are the mean colour, and a per-channel
linear filter commutes with the normalisation, so in [0, 1] pixels it is
``mean + conv(X - mean)``, zero padding of X - mean: a 5-pixel border fades towards the
mean colour. Our own blur (``blur``, the ``blur`` canvas) is a normalised separable
Gaussian, 11 taps, sigma 5 (centre 0.01196, corner 0.00440), replicate padding.

Maps are sanitised as for AD/IC (non-finite or constant maps become all zeros; the order of
an all-zero map is then the raster rule alone). Forwards are batched: at most
``batch_size`` perturbed images exist at a time, whatever T and the batch of images.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

METRICS = ("deletion", "insertion")
CANVASES = ("rise", "blur", "black", "mean")
BLUR_TAPS, BLUR_SIGMA = 11, 5.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: per-image columns written to the shards, per metric: (AUC, forwards of that metric)
COLUMNS = {m: (f"{m}_auc", f"{m}_forward_passes") for m in METRICS}


def forward_passes(steps: int) -> int:
    """Forwards per image and metric: the T + 1 points of the curve."""
    return steps + 1


def step_counts(num_pixels: int, steps: int) -> list[int]:
    """n_k = ceil(k * P / T) pixels changed at step k = 0..T (exact integers)."""
    if not 1 <= steps <= num_pixels:
        raise ValueError(f"steps must be in [1, {num_pixels}] (the pixels of the image), "
                         f"got {steps}")
    return [-(-k * num_pixels // steps) for k in range(steps + 1)]


def pixel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H*W) rank of each pixel in the stable ascending order (0 = lowest;
    among equal values the earlier raster pixel ranks lower): the top n are rank >= P - n."""
    flat = sanitise(saliency).flatten(1)
    order = torch.sort(flat, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def sanitise(saliency: torch.Tensor) -> torch.Tensor:
    """Maps as the AD/IC evaluator scores them (``Evaluator.evaluate``): non-finite or
    constant maps become zeros, the others are clamped to [0, 1]."""
    saliency = saliency.float()
    flat = saliency.flatten(1)
    bad = ~torch.isfinite(flat).all(1) | (flat.amax(1) - flat.amin(1) <= 0)
    return torch.where(bad[:, None, None], torch.zeros_like(saliency),
                       saliency.nan_to_num(0.0).clamp(0, 1))


def blur(images: torch.Tensor, taps: int = BLUR_TAPS, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Our separable Gaussian blur of (B, 3, H, W) images, normalised taps, replicate
    padding: the ``blur`` canvas (module docstring; not RISE's, see ``rise_blur``)."""
    r = torch.arange(taps, dtype=torch.float64, device=images.device) - (taps - 1) / 2
    kernel = torch.exp(-r ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c, pad = images.shape[1], taps // 2
    x = F.pad(images, (pad, pad, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, taps).expand(c, 1, 1, taps), groups=c)
    x = F.pad(x, (0, 0, pad, pad), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, taps, 1).expand(c, 1, taps, 1), groups=c)


def rise_kernel(taps: int = BLUR_TAPS, sigma: float = BLUR_SIGMA,
                truncate: float = 4.0) -> torch.Tensor:
    """RISE's ``gkern(taps, sigma)``: scipy's ``gaussian_filter`` (mode ``reflect``,
    ``truncate`` 4) of a taps x taps delta, (taps, taps) float64, computed without scipy.

    The 1-D filter has 2r + 1 normalised taps w_i, r = int(truncate * sigma + 0.5); at
    window position j it sums w_i over the offsets i whose source j + i, reflected into the
    window (half-sample symmetric: ... c b a | a b c ... | ... c b a ..., period 2 * taps),
    is the delta's centre. The delta is separable, so the 2-D result is the outer product."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets ** 2 / sigma ** 2)
    weights = weights / weights.sum()
    centre, line = taps // 2, torch.zeros(taps, dtype=torch.float64)
    for j in range(taps):
        for i, w in zip(range(-radius, radius + 1), weights):
            m = (j + i) % (2 * taps)
            if (m if m < taps else 2 * taps - 1 - m) == centre:
                line[j] += w
    return torch.outer(line, line)


def rise_blur(images: torch.Tensor, mean) -> torch.Tensor:
    """RISE's substrate of (B, 3, H, W) images in [0, 1]: its float32 ``gkern(11, 5)`` on
    the normalised tensor with zero padding, i.e. ``mean + conv(images - mean)`` (module
    docstring); ``mean``: the backbone's normalisation mean, per channel."""
    c, taps = images.shape[1], BLUR_TAPS
    kernel = rise_kernel().to(torch.float32).to(images.device, images.dtype)
    mean = torch.as_tensor(mean).to(images.device, images.dtype).reshape(1, -1, 1, 1)
    out = F.conv2d(images - mean, kernel.view(1, 1, taps, taps).expand(c, 1, taps, taps),
                   padding=taps // 2, groups=c)
    return out + mean


def _mean(backbone) -> torch.Tensor:
    """The backbone's normalisation mean (ImageNet's when it has none)."""
    mean = getattr(backbone, "mean", None)
    return torch.as_tensor(IMAGENET_MEAN if not isinstance(mean, torch.Tensor) else mean)


def canvas(metric: str, kind: str, images: torch.Tensor, backbone=None) -> torch.Tensor:
    """The canvas C of ``metric`` under canvas ``kind`` (module docstring), like ``images``."""
    if kind not in CANVASES:
        raise ValueError(f"canvas must be one of {', '.join(CANVASES)}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if kind == "rise" and metric == "insertion":
        return rise_blur(images, _mean(backbone))
    if kind == "blur":
        return blur(images)
    if kind == "black":
        return torch.zeros_like(images)
    mean = _mean(backbone).to(images.device, images.dtype)
    return mean.view(1, -1, 1, 1).expand_as(images).clone()


@torch.no_grad()
def probability_curves(backbone, images: torch.Tensor, saliency: torch.Tensor,
                       targets: torch.Tensor, steps: int, metric: str, canvas_kind: str = "rise",
                       batch_size: int = 64) -> torch.Tensor:
    """p_k for k = 0..T of every image: (B, T + 1) float64 (module docstring).

    The B * (T + 1) perturbed images are built and scored ``batch_size`` at a time."""
    b, _, h, w = images.shape
    if saliency.shape != (b, h, w):
        raise ValueError(f"saliency: expected {(b, h, w)}, got {tuple(saliency.shape)}")
    counts = torch.tensor(step_counts(h * w, steps), device=images.device)
    ranks = pixel_ranks(saliency.to(images.device))
    base = canvas(metric, canvas_kind, images, backbone)
    targets = torch.as_tensor(targets, device=images.device).long()
    curves = torch.empty(b * (steps + 1), dtype=torch.float64)
    for start in range(0, b * (steps + 1), batch_size):
        pair = torch.arange(start, min(start + batch_size, b * (steps + 1)), device=images.device)
        img, k = pair // (steps + 1), pair % (steps + 1)
        changed = (ranks[img] >= h * w - counts[k][:, None]).view(-1, 1, h, w)
        x = torch.where(changed, base[img], images[img]) if metric == "deletion" else \
            torch.where(changed, images[img], base[img])
        probs = backbone(x).float().softmax(dim=1).gather(1, targets[img][:, None])[:, 0]
        curves[start:start + len(pair)] = probs.double().cpu()
    return curves.view(b, steps + 1)


def area(curves: torch.Tensor, num_pixels: int, steps: int) -> torch.Tensor:
    """Trapezoidal area of (B, T + 1) curves over x_k = n_k / P: (B,) float64."""
    x = torch.tensor(step_counts(num_pixels, steps), dtype=torch.float64) / num_pixels
    c = curves.to(torch.float64).cpu()
    return ((x[1:] - x[:-1]) * (c[:, 1:] + c[:, :-1]) / 2).sum(dim=1)


def deletion(backbone, images, saliency, targets, steps: int = 224, canvas_kind: str = "rise",
             batch_size: int = 64) -> torch.Tensor:
    """Deletion AUC per image (B,) float64; lower is better."""
    curves = probability_curves(backbone, images, saliency, targets, steps, "deletion",
                                canvas_kind, batch_size)
    return area(curves, images.shape[-2] * images.shape[-1], steps)


def insertion(backbone, images, saliency, targets, steps: int = 224, canvas_kind: str = "rise",
              batch_size: int = 64) -> torch.Tensor:
    """Insertion AUC per image (B,) float64; higher is better."""
    curves = probability_curves(backbone, images, saliency, targets, steps, "insertion",
                                canvas_kind, batch_size)
    return area(curves, images.shape[-2] * images.shape[-1], steps)


def shard_columns(backbone, images, saliency, targets, metrics: Sequence[str], steps: int,
                  canvas_kind: str, batch_size: int) -> dict[str, list[float]]:
    """The per-image columns of the causal ``metrics`` asked for (others are ignored):
    ``<metric>_auc`` and ``<metric>_forward_passes`` (T + 1)."""
    out: dict[str, list[float]] = {}
    for metric in METRICS:
        if metric not in metrics:
            continue
        fn = deletion if metric == "deletion" else insertion
        auc = fn(backbone, images, saliency, targets, steps, canvas_kind, batch_size)
        auc_col, fw_col = COLUMNS[metric]
        out[auc_col] = [float(v) for v in auc]
        out[fw_col] = [float(forward_passes(steps))] * len(auc)
    return out


def columns_for(metrics: Sequence[str]) -> tuple[str, ...]:
    """The shard columns the causal ``metrics`` add, in a fixed order."""
    return tuple(c for m in METRICS if m in metrics for c in COLUMNS[m])


__all__ = ["CANVASES", "COLUMNS", "METRICS", "area", "blur", "canvas", "columns_for",
           "deletion", "forward_passes", "insertion", "pixel_ranks", "probability_curves",
           "rise_blur", "rise_kernel", "sanitise", "shard_columns", "step_counts"]


# -- the registry entries (harness.metrics.registry) ------------------------------------------
from typing import Literal  # noqa: E402

from pydantic import Field  # noqa: E402

from harness.metrics.base import Metric, MetricSettings, Reported  # noqa: E402
from harness.metrics.registry import register  # noqa: E402


class CausalSettings(MetricSettings):
    """Deletion's and insertion's settings; a spec's ``evaluation.causal_steps``,
    ``causal_canvas`` and ``causal_batch_size`` give them to both (an entry ``{name:
    deletion, steps: 50}`` overrides them for one)."""

    steps: int = Field(224, ge=1, description=(
        "steps T of the curve (224: RISE's 224 pixels a step at 224x224)"))
    canvas: Literal["rise", "blur", "black", "mean"] = Field("rise", description=(
        "rise: deletion to the mean colour, insertion from a blur; or one canvas for both"))
    batch_size: int = Field(64, ge=1, description="perturbed images per forward")


class _Causal(Metric):
    Settings = CausalSettings
    paper = "Petsiuk, Das & Saenko, RISE, BMVC 2018"

    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.name]

    def forward_passes(self, size=None) -> int:
        return forward_passes(self.settings.steps)

    def score(self, batch) -> dict[str, list[float]]:
        s = self.settings
        return shard_columns(batch.backbone, batch.images, batch.saliency, batch.targets,
                             (self.name,), s.steps, s.canvas, s.batch_size)


@register
class Deletion(_Causal):
    """Deletion AUC (module docstring): lower is better; T + 1 forwards per image."""

    name = "deletion"
    display_name = "Deletion"
    reported = (Reported("deletion_auc", "lower", "Del↓", column="deletion_auc", digits=3,
                         label="deletion"),)


@register
class Insertion(_Causal):
    """Insertion AUC (module docstring): higher is better; T + 1 forwards per image."""

    name = "insertion"
    display_name = "Insertion"
    reported = (Reported("insertion_auc", "higher", "Ins↑", column="insertion_auc",
                         digits=3, label="insertion"),)
