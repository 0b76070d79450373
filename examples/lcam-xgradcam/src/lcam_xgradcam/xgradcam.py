"""XGrad-CAM (Fu et al., Axiom-based Grad-CAM, BMVC 2020), written from the paper's formula.

With A_k the k-th feature map and S_c the score of class c, each channel's weight is its
gradient averaged with the map's own values as weights (the paper's Eq. 11, chosen so that
the explanation satisfies its Sensitivity and Conservation axioms):

    w_k = sum_ij ( A_k[ij] / sum_ab A_k[ab] ) * dS_c / dA_k[ij]      (0 when sum_ab A_k = 0)
    XGrad-CAM = ReLU( sum_k w_k A_k )

then, as for every CAM of lcam-bench, min-max at feature resolution and bilinear upsampling.
One forward pass (#FW = 1) and one backward through the classifier head only.
``score``: the class logit (the paper) or its softmax probability.
"""
import torch

from methods.base import Explainer, Param
from methods.gradcam import head_gradients


class XGradCAM(Explainer):
    """XGrad-CAM: feature maps weighted by their activation-weighted average gradient."""

    name = "xgradcam"                   # the registry key: equal to the entry point's name
    display_name = "XGrad-CAM"
    family = "gradient"                 # one forward; the template keeps the head's graph
    paper = "Fu et al., Axiom-based Grad-CAM (XGrad-CAM), BMVC 2020"
    variants = ("paper",)
    params = {"score": Param(str, "logit", "the class score differentiated: logit (the "
                             "paper) or prob (softmax)", choices=("logit", "prob"))}

    def _saliency(self, images, feats, logits, targets):
        grad = head_gradients(self.backbone, feats, targets, self.config["score"], self._graph)
        total = feats.sum(dim=(2, 3), keepdim=True)
        nonzero = total != 0
        weights = torch.where(nonzero, (grad * feats).sum(dim=(2, 3), keepdim=True)
                              / torch.where(nonzero, total, torch.ones_like(total)),
                              torch.zeros_like(total))
        return torch.relu((weights * feats).sum(dim=1))
