"""Grad-CAM++ (Chattopadhay et al., WACV 2018), Eq. 19 of its paper.

With g = dS_c/dA_k (S_c the class logit) and the closed form for the exponential output:

    alpha_k[ij] = g^2 / (2 g^2 + sum_ab(A_k) * g^3)      (0 where the denominator is 0)
    w_k = sum_ij alpha_k[ij] * ReLU(g[ij]),    CAM = ReLU(sum_k w_k A_k)

``variant: reference`` is what the L-CAM authors ran: gradients of the softmax probability
and the per-channel denominator 2 g^2 + sum_ab(A_k * g^3).
Gradients are taken through the head only (see ``gradcam.head_gradients``).
"""
from __future__ import annotations

import torch

from .base import Explainer
from .gradcam import head_gradients
from .registry import register


@register
class GradCAMPlusPlus(Explainer):
    """Grad-CAM++: pixel-wise weighted positive gradients (Eq. 19)."""

    name = "gradcampp"
    display_name = "Grad-CAM++"
    family = "gradient"
    paper = "Chattopadhay et al., Grad-CAM++, WACV 2018"
    variants = ("paper", "reference")

    def _saliency(self, images, feats, logits, targets):
        reference = self.variant == "reference"
        g = head_gradients(self.backbone, feats, targets, "prob" if reference else "logit",
                           self._graph)
        g2, g3 = g * g, g * g * g
        if reference:
            denom = 2 * g2 + (feats * g3).sum(dim=(2, 3), keepdim=True)
        else:
            denom = 2 * g2 + feats.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(denom))
        weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)
        return torch.relu((weights * feats).sum(dim=1))
