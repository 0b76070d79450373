"""Grad-CAM++ (Chattopadhay et al., WACV 2018), Eq. 19 of its paper.

With g = dS_c/dA_k (S_c the class logit) and the closed form for the exponential output:

    alpha_k[ij] = g^2 / (2 g^2 + sum_ab(A_k) * g^3)      (0 where the denominator is 0)
    w_k = sum_ij alpha_k[ij] * ReLU(g[ij]),    CAM = ReLU(sum_k w_k A_k)

``variant: reference`` is what the L-CAM authors ran (yiskw713/ScoreCAM's ``GradCAMpp`` on
a network ending in a Softmax): g is the gradient of the softmax probability, the
denominator is per channel, 2 g^2 + sum_ab(A_k * g^3), a zero denominator is replaced by 1
and 1e-7 is added to every denominator:

    den = 2 g^2 + sum_ab(A_k g^3);   alpha = g^2 / (where(den != 0, den, 1) + 1e-7)

At probability gradients of 1e-4 and below, 2 g^2 is 1e-8 or less and the 1e-7 dominates:
alpha departs from the formula over most of the map (docs/protocol.md section 4.2).

Gradients are taken through the head only (see ``gradcam.head_gradients``). g, g^2 and g^3
are float32 whatever the backbone's precision: under ``evaluation.autocast`` only the
backbone's passes run in bf16/fp16 (``SplitBackbone.with_autocast``), and g^3 of a float16
gradient below 4e-3 would underflow to 0 (alpha would collapse to 1/2).
"""
from __future__ import annotations

import torch

from .base import Explainer
from .gradcam import head_gradients
from .registry import register

#: the authors' (yiskw713's) constant added to every denominator of the reference variant
REFERENCE_EPS = 1e-7


def powers(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g^2, g^3) in float32, whatever the precision ``g`` arrives in."""
    g = g.float()
    g2 = g * g
    return g2, g2 * g


def alpha_paper(g2: torch.Tensor, g3: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Eq. 19: g^2 / (2 g^2 + sum_ab(A_k) g^3), and 0 where that denominator is 0."""
    denom = 2 * g2 + feats.sum(dim=(2, 3), keepdim=True) * g3
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    return torch.where(denom != 0, g2 / safe, torch.zeros_like(denom))


def alpha_reference(g2: torch.Tensor, g3: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """The authors' alpha: g^2 / (where(den != 0, den, 1) + 1e-7), den = 2 g^2 + sum(A g^3)."""
    denom = 2 * g2 + (feats * g3).sum(dim=(2, 3), keepdim=True)
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    return g2 / (denom + REFERENCE_EPS)


@register
class GradCAMPlusPlus(Explainer):
    """Grad-CAM++: pixel-wise weighted positive gradients (Eq. 19)."""

    name = "gradcampp"
    display_name = "Grad-CAM++"
    family = "gradient"
    paper = "Chattopadhay et al., Grad-CAM++, WACV 2018"
    version = 2                     # 2: the reference variant's guarded denominator + 1e-7
    variants = ("paper", "reference")

    def _saliency(self, images, feats, logits, targets):
        reference = self.variant == "reference"
        g = head_gradients(self.backbone, feats, targets, "prob" if reference else "logit",
                           self._graph)
        feats = feats.float()
        g2, g3 = powers(g)
        alpha = alpha_reference(g2, g3, feats) if reference else alpha_paper(g2, g3, feats)
        weights = (alpha * torch.relu(g.float())).sum(dim=(2, 3), keepdim=True)
        return torch.relu((weights * feats).sum(dim=1))
