"""Grad-CAM (Selvaraju et al., ICCV 2017).

    w_k^c = 1/(PQ) * sum_ij dS_c / dA_k[i, j]      (S_c = the class logit)
    CAM^c = ReLU(sum_k w_k^c A_k)

then min-max at feature resolution and bilinear upsampling. One forward and one backward,
and the backward covers only the head: A is computed once without autograd, marked as a
leaf that requires grad, and the gradient is taken of head(A) with respect to A. No
backward through the frozen feature extractor, no module hooks (in-place ReLUs are safe).
"""
from __future__ import annotations

import torch

from .base import Explainer
from .registry import register


def head_gradients(backbone, feats: torch.Tensor, targets: torch.Tensor,
                   score: str = "logit", graph=None) -> torch.Tensor:
    """d score_c / dA for each sample's own class c, through the head only.

    ``score``: 'logit' (the class logit) or 'prob' (its softmax probability). Samples are
    independent in the head (eval mode), so summing over the batch gives per-sample grads.
    ``graph``: (A leaf, logits) of a head pass already run with autograd (the explainer's
    clean pass), reused instead of running the head again.
    """
    with torch.enable_grad():
        if graph is not None:
            a, logits = graph
        else:
            a = feats.detach().requires_grad_(True)
            logits = backbone.head(a)
        if score == "prob":
            logits = logits.softmax(dim=1)
        picked = logits.gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, a)
    return grad


@register
class GradCAM(Explainer):
    """Grad-CAM: ReLU of the feature maps weighted by their spatially averaged gradients.

    Variants: ``paper`` (the class logit, as in Grad-CAM's paper) and ``reference`` (what
    the L-CAM authors ran, which is the same computation here).
    """

    name = "gradcam"
    display_name = "Grad-CAM"
    family = "gradient"
    paper = "Selvaraju et al., Grad-CAM, ICCV 2017"
    variants = ("paper", "reference")

    def _saliency(self, images, feats, logits, targets):
        grad = head_gradients(self.backbone, feats, targets, "logit", self._graph)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * feats).sum(dim=1))
