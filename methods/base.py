"""The shared explainer template: input checks, the clean forward, targets, normalisation.

Every method computes a saliency map V (B, H, W) in [0, 1] at input resolution for the
class it is asked to explain (default: the backbone's top-1 on the clean image, the
"model truth"). Subclasses override one step, ``_saliency``; the template does the rest.

Min-max normalisation follows docs/protocol.md section 2.3: a constant map (max == min, or any NaN/inf)
is *degenerate* and normalises to all zeros; ``last_degenerate`` records which were.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbones.registry import did_you_mean

from .params import Param, param_problem  # noqa: F401  (Param: the methods' declarations)


class ExplainerInputError(ValueError):
    """Bad arguments to ``create`` or ``explain``; the message names the argument."""


def minmax(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample min-max over all but the first dim; degenerate maps become 0.

    Returns (normalised maps, bool degenerate flags of shape (B,)).
    """
    flat = maps.reshape(maps.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    safe = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    lo = safe.min(dim=1, keepdim=True).values
    hi = safe.max(dim=1, keepdim=True).values
    span = hi - lo
    degenerate = (span.squeeze(1) <= 0) | ~finite
    out = torch.where(degenerate[:, None], torch.zeros_like(safe),
                      (safe - lo) / torch.where(span > 0, span, torch.ones_like(span)))
    return out.reshape(maps.shape), degenerate


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, P, Q) or (B, C, P, Q) maps."""
    squeeze = maps.dim() == 3
    x = maps[:, None] if squeeze else maps
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[:, 0] if squeeze else x




class Explainer:
    """Base class of every registered method.

    Class attributes set by subclasses: ``name`` (registry key), ``display_name``,
    ``family`` ('gradient' | 'perturbation' | 'learned'), ``variants`` (first = default),
    ``params`` (name -> Param), ``version`` (bumped whenever outputs can change),
    ``class_agnostic`` (True: the map ignores the explained class by definition, as
    Eigen-CAM's principal component; the conformance kit then does not ask two classes'
    maps to differ).
    """

    name = "base"
    display_name = "Base"
    family = "gradient"
    paper = ""
    version = 1
    variants: tuple[str, ...] = ("paper",)
    params: dict[str, Param] = {}
    class_agnostic = False

    def __init__(self, backbone: nn.Module, variant: str | None = None, **params: Any):
        self.backbone = backbone
        if variant is None:
            variant = self.variants[0]
        if variant not in self.variants:
            raise ExplainerInputError(
                f"variant: {variant!r} is not a variant of {self.name}."
                f"{did_you_mean(str(variant), self.variants)} Available: {', '.join(self.variants)}")
        self.variant = variant
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = sorted(self.params) + ["variant"]
            hints = "; ".join(f"{u!r}{did_you_mean(u, known)}" for u in unknown)
            raise ExplainerInputError(
                f"{self.name}: unknown parameter(s) {hints}. Accepted: {', '.join(known)}")
        self.config: dict[str, Any] = {}
        for key, spec in self.params.items():
            value = params.get(key, spec.default)
            problem = param_problem(key, spec, value)
            if problem:
                raise ExplainerInputError(f"{self.name}: {key}: {problem}")
            self.config[key] = value
        self.last_degenerate = torch.zeros(0, dtype=torch.bool)
        self._graph = None             # (A leaf, logits with graph) during a gradient explain
        self.last_forward_passes: float | None = None
        self.last_logits: torch.Tensor | None = None   # the clean pass of the last explain
        self.setup()

    # -- hooks for subclasses -------------------------------------------------------------
    def setup(self) -> None:
        """Derive state from the checked parameters (called at the end of __init__).

        Parameter values are checked against their ``Param`` declarations (type, range,
        choices) before this runs: a range belongs in the declaration, not here."""

    @classmethod
    def planned_forward_passes(cls, params: dict[str, Any], backbone: dict[str, Any]) -> int:
        """Nominal #FW per explanation (docs/protocol.md section 2.4) from the parameters and
        the backbone's registry metadata (``name``, ``feature_shape``), before anything is
        built: what a plan states and what ``forward_passes`` returns."""
        return 1

    @property
    def forward_passes(self) -> int:
        """Nominal backbone forward passes per explanation (docs/protocol.md section 2.4)."""
        meta = {"name": getattr(self.backbone, "name", ""),
                "feature_shape": (self.backbone.feature_channels,)}
        return int(self.planned_forward_passes(self.config, meta))

    def _saliency(self, images: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
        """Return raw maps (B, P, Q) or (B, H, W), or already-final maps via _final."""
        raise NotImplementedError

    #: 'feature': min-max at feature resolution then upsample (CAM-style);
    #: 'input': upsample first then min-max (Score-CAM, RISE).
    normalise_at = "feature"

    # -- the template ---------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Provenance of this explainer: name, variant, version and parameters."""
        return {"method": self.name, "display_name": self.display_name, "variant": self.variant,
                "version": self.version, **{f"param.{k}": v for k, v in self.config.items()}}

    def check_inputs(self, images: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(images, torch.Tensor):
            raise ExplainerInputError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ExplainerInputError(
                f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ExplainerInputError(f"images: expected a float tensor in [0, 1], got {images.dtype}")
        if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
            raise ExplainerInputError(
                "images: values must be finite and in [0, 1] pixel space (the backbone normalises "
                "inside); got range "
                f"[{images.min().item():.3g}, {images.max().item():.3g}]. Do not pass normalised images.")
        if targets is None:
            return images, None
        if isinstance(targets, int):
            targets = [targets]
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or len(targets) != len(images):
            raise ExplainerInputError(
                f"targets: expected {len(images)} class indices (one per image), got shape "
                f"{tuple(targets.shape)}")
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise ExplainerInputError(f"targets: expected integer class indices, got {targets.dtype}")
        r = self.backbone.num_classes
        if len(targets) and (targets.min() < 0 or targets.max() >= r):
            raise ExplainerInputError(f"targets: class indices must be in [0, {r - 1}]")
        return images, targets.long()

    def explain(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Saliency (B, H, W) in [0, 1] for ``targets`` (default: each image's top-1)."""
        images, targets = self.check_inputs(images, targets)
        images = images.to(self.backbone.device)
        size = tuple(images.shape[-2:])
        with torch.no_grad():
            feats = self.backbone.features(images)
        if self.family == "gradient":
            # Keep the head's graph: the gradient step reuses this pass instead of a second one.
            with torch.enable_grad():
                leaf = feats.detach().requires_grad_(True)
                self._graph = (leaf, self.backbone.head(leaf))
            logits = self._graph[1].detach()
        else:
            with torch.no_grad():
                logits = self.backbone.head(feats)
        self.last_logits = logits
        targets = logits.argmax(1) if targets is None else targets.to(images.device)
        self.last_forward_passes = None
        try:
            raw = self._saliency(images, feats, logits, targets)
        finally:
            self._graph = None
        if self.normalise_at == "feature" and tuple(raw.shape[-2:]) != size:
            normed, degenerate = minmax(raw)
            out = upsample(normed, size).clamp_(0, 1)
        else:
            normed, degenerate = minmax(upsample(raw, size))
            out = normed
        self.last_degenerate = degenerate.cpu()
        if self.last_forward_passes is None:
            self.last_forward_passes = float(self.forward_passes)
        return out.detach()
