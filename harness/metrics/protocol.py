"""The paper's evaluation protocol: phi_nu (keep the top pixels), masking, AD, IC.

Definitions (docs/protocol.md section 2, the "paper" preset; L-CAM paper Eq. 10-11):

    phi_nu(V): keep the n = ceil(nu * H * W) highest pixels of V with their soft values,
               zero elsewhere; ties at the threshold drop the first pixels in raster order.
    masked   = X (.) phi_nu(V), X in [0, 1] (removed pixels are black), then the
               backbone normalises.
    Y_i = softmax prob of the explained class c on X_i,  O_i = the same on the masked image.
    AD  = 100 / N * sum_i max(0, Y_i - O_i) / Y_i          (lower is better)
    IC  = 100 / N * sum_i [O_i > Y_i]                      (higher is better; strict >)

Every evaluated image counts in N. A degenerate map (constant, or non-finite) is normalised
to all zeros and flagged. An image with Y = 0 (probability underflow) contributes 0 to AD.
``ProtocolPreset`` also offers the common alternatives: binary masks, mean-colour fill,
logit scores.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Sequence

import torch

PAPER_FRACTIONS = (1.0, 0.5, 0.15)


@dataclass(frozen=True)
class ProtocolPreset:
    """How maps become masked images and scores. The defaults are the paper's preset."""

    name: str = "paper"
    soft: bool = True          # keep the soft saliency values (False: binary 0/1 mask)
    fill: str = "black"        # 'black' (mask the [0, 1] image) | 'mean' (mask normalised image)
    score: str = "prob"        # 'prob' (softmax probability) | 'logit'

    def __post_init__(self):
        if self.fill not in ("black", "mean"):
            raise ValueError(f"fill must be 'black' or 'mean', got {self.fill!r}")
        if self.score not in ("prob", "logit"):
            raise ValueError(f"score must be 'prob' or 'logit', got {self.score!r}")

    def as_dict(self) -> dict:
        return asdict(self)


PAPER = ProtocolPreset()


def kept_count(fraction: float, num_pixels: int) -> int:
    """n = ceil(fraction * num_pixels), computed exactly from the decimal fraction."""
    if not 0 < float(fraction) <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}. To keep the top 15%, "
                         "write 0.15.")
    return math.ceil(Fraction(str(fraction)) * num_pixels)


def keep_top(saliency: torch.Tensor, fraction: float) -> torch.Tensor:
    """phi_nu per sample: (B, H, W) -> (B, H, W) with only the top ceil(nu*H*W) values kept.

    Ties at the threshold: the first tied pixels in raster order (top-left first) are the
    ones dropped. A map with fewer positive pixels than n keeps only those (zeros stay 0).
    """
    if saliency.dim() != 3:
        raise ValueError(f"saliency: expected (B, H, W), got {tuple(saliency.shape)}")
    b, h, w = saliency.shape
    flat = saliency.reshape(b, h * w)
    n = kept_count(fraction, h * w)
    if n >= h * w:
        return saliency.clone()
    # Stable ascending sort: equal values stay in raster order, so the dropped prefix holds
    # the lowest values and, among ties, the earliest pixels.
    order = torch.sort(flat, dim=1, stable=True).indices
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep.scatter_(1, order[:, : h * w - n], False)
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(b, h, w)


def apply_mask(backbone, images: torch.Tensor, kept: torch.Tensor,
               preset: ProtocolPreset = PAPER) -> torch.Tensor:
    """Scores of the masked images: backbone(X (.) phi) under the preset (logits)."""
    mask = kept if preset.soft else (kept > 0).to(images.dtype)
    if preset.fill == "black":
        return backbone(images * mask[:, None])
    return backbone.forward_normalized(backbone.normalize(images) * mask[:, None])


def class_scores(logits: torch.Tensor, targets: torch.Tensor, preset: ProtocolPreset = PAPER):
    values = logits.softmax(dim=1) if preset.score == "prob" else logits
    return values.gather(1, targets[:, None])[:, 0]


def average_drop(y: torch.Tensor, o: torch.Tensor) -> float:
    """AD in percent: 100/N * sum max(0, Y - O) / Y (terms with Y <= 0 count as 0)."""
    y, o = torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(o, dtype=torch.float64)
    if y.numel() == 0:
        return float("nan")
    drop = torch.clamp(y - o, min=0)
    terms = torch.where(y > 0, drop / torch.where(y > 0, y, torch.ones_like(y)), torch.zeros_like(y))
    return float(100.0 * terms.mean())


def increase_in_confidence(y: torch.Tensor, o: torch.Tensor) -> float:
    """IC in percent: 100/N * count(O > Y), strict."""
    y, o = torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(o, dtype=torch.float64)
    if y.numel() == 0:
        return float("nan")
    return float(100.0 * (o > y).double().mean())


def fraction_key(fraction: float) -> str:
    """MLflow-safe percent label: 1.0 -> '100', 0.5 -> '50', 0.15 -> '15', 0.025 -> '2.5'."""
    pct = Fraction(str(fraction)) * 100
    return str(pct.numerator) if pct.denominator == 1 else f"{float(pct):g}"


@dataclass
class BatchScores:
    """Per-image results of one evaluated batch."""

    targets: torch.Tensor        # (B,) class explained
    y: torch.Tensor              # (B,) score on the clean image
    o: torch.Tensor              # (B, F) score on the masked image at each kept fraction
    degenerate: torch.Tensor     # (B,) bool
    fractions: tuple


class Evaluator:
    """Scores saliency maps for a backbone: Y, and O at every kept fraction.

    ``evaluate(images, saliency, targets)`` scores given maps; ``evaluate_explainer``
    runs the explainer first (targets default to the top-1 class on the clean image) and
    scores Y on the explainer's own clean pass (``last_logits``) instead of a second one.
    """

    def __init__(self, backbone, fractions: Sequence[float] = PAPER_FRACTIONS,
                 preset: ProtocolPreset = PAPER):
        for f in fractions:
            kept_count(f, 1)
        self.backbone, self.fractions, self.preset = backbone, tuple(fractions), preset

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, saliency: torch.Tensor,
                 targets: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> BatchScores:
        """Y and O for each image. ``logits``: the backbone's float32 output on these very
        ``images`` when the caller has it (an explainer's clean pass), else computed here."""
        bb = self.backbone
        images = images.to(bb.device)
        saliency = saliency.to(images.device, torch.float32)
        if saliency.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"saliency: expected {(images.shape[0], *images.shape[-2:])}, "
                             f"got {tuple(saliency.shape)}")
        flat = saliency.flatten(1)
        degenerate = ~torch.isfinite(flat).all(1) | (flat.amax(1) - flat.amin(1) <= 0) \
            if flat.shape[1] else torch.ones(len(flat), dtype=torch.bool)
        # Non-finite maps are never passed on: they count as degenerate (all zeros).
        saliency = torch.where(degenerate[:, None, None], torch.zeros_like(saliency),
                               saliency.nan_to_num(0.0).clamp(0, 1))
        logits = bb(images) if logits is None else logits.to(images.device, torch.float32)
        if targets is None:
            targets = logits.argmax(1)
        targets = targets.to(images.device)
        y = class_scores(logits, targets, self.preset)
        o = torch.stack([class_scores(apply_mask(bb, images, keep_top(saliency, f), self.preset),
                                      targets, self.preset) for f in self.fractions], dim=1)
        return BatchScores(targets.cpu(), y.cpu(), o.cpu(), degenerate.cpu(), self.fractions)

    def evaluate_explainer(self, explainer, images: torch.Tensor,
                           targets: torch.Tensor | None = None) -> BatchScores:
        saliency = explainer.explain(images, targets)
        scores = self.evaluate(images, saliency, targets, getattr(explainer, "last_logits", None))
        scores.degenerate |= getattr(explainer, "last_degenerate", torch.zeros_like(scores.degenerate))
        return scores

    @staticmethod
    def summarise(y: torch.Tensor, o: torch.Tensor, fractions: Sequence[float]) -> dict[str, float]:
        """{'AD_100': .., 'IC_100': .., 'AD_50': ..} from per-image Y (N,) and O (N, F)."""
        out = {}
        for j, f in enumerate(fractions):
            key = fraction_key(f)
            out[f"AD_{key}"] = average_drop(y, o[:, j])
            out[f"IC_{key}"] = increase_in_confidence(y, o[:, j])
        return out


# -- the registry entry (harness.metrics.registry) --------------------------------------------
from pydantic import Field  # noqa: E402

from harness.metrics.base import Metric, MetricSettings, Reported  # noqa: E402
from harness.metrics.registry import register  # noqa: E402


class ADICSettings(MetricSettings):
    """AD/IC's settings are the spec's ``evaluation.keep_fractions`` and ``.preset``."""

    fractions: tuple[float, ...] = Field(PAPER_FRACTIONS, min_length=1, description=(
        "kept fractions nu in (0, 1]"))
    soft: bool = Field(True, description="soft saliency values (False: binary mask)")
    fill: str = Field("black", description="black | mean")
    score: str = Field("prob", description="prob | logit")

    def preset(self) -> ProtocolPreset:
        paper = (self.soft, self.fill, self.score) == (PAPER.soft, PAPER.fill, PAPER.score)
        return PAPER if paper else ProtocolPreset(name="custom", soft=self.soft,
                                                  fill=self.fill, score=self.score)


@register
class AverageDropIncrease(Metric):
    """Average Drop and Increase in Confidence at each kept fraction (module docstring):
    per image Y and O_<k>; AD_<k> (lower is better) and IC_<k> (higher is better). Its
    settings are the evaluation's fractions and preset, already in every shard identity."""

    name = "ad_ic"
    display_name = "AD/IC"
    paper = "Chattopadhay et al., Grad-CAM++, WACV 2018; the L-CAM paper's Eq. 10-11"
    Settings = ADICSettings
    always = True
    reported = (Reported("AD_{k}", "lower", "AD({k}%)↓", label="AD"),
                Reported("IC_{k}", "higher", "IC({k}%)↑", label="IC"))

    def columns(self) -> tuple[str, ...]:
        return ("Y", *(f"O_{fraction_key(f)}" for f in self.settings.fractions))

    def forward_passes(self, size=None) -> int:
        return len(self.settings.fractions)       # Y comes from the explainer's clean pass

    def identity(self) -> dict:
        return {}                                  # cell_identity's "fractions" and "preset"

    def score(self, batch) -> dict[str, list[float]]:
        scores = batch.scores
        if scores is None:
            scores = Evaluator(batch.backbone, self.settings.fractions,
                               self.settings.preset()).evaluate(
                batch.images, batch.saliency, batch.targets, batch.logits)
        out = {"Y": [float(v) for v in scores.y]}
        for j, col in enumerate(self.columns()[1:]):
            out[col] = [float(v) for v in scores.o[:, j]]
        return out

    def aggregate(self, table) -> dict[str, float]:
        y = torch.tensor(table.column("Y").to_pylist(), dtype=torch.float64)
        out = {}
        for f in self.settings.fractions:
            o = torch.tensor(table.column(f"O_{fraction_key(f)}").to_pylist(),
                             dtype=torch.float64)
            out[f"AD_{fraction_key(f)}"] = average_drop(y, o)
            out[f"IC_{fraction_key(f)}"] = increase_in_confidence(y, o)
        return out

    def terms(self, table) -> dict:
        import numpy as np
        y = np.asarray(table.column("Y").to_numpy(), dtype=np.float64)
        out = {}
        for f in self.settings.fractions:
            o = np.asarray(table.column(f"O_{fraction_key(f)}").to_numpy(), dtype=np.float64)
            safe = np.where(y > 0, y, 1.0)
            out[f"AD_{fraction_key(f)}"] = np.where(y > 0, 100.0 * np.maximum(y - o, 0) / safe,
                                                    0.0)
            out[f"IC_{fraction_key(f)}"] = 100.0 * (o > y)
        return out
