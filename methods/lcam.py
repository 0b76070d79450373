"""L-CAM-Fm and L-CAM-Img (Gkartzonika, Gkalelis & Mezaris, 2022): learned class activation maps.

An attention head g, one 1x1 convolution K -> R with bias, maps the frozen backbone's
feature maps A to one CAM per class (Eq. 2-3): L = g(A), L^(y) = channel y of L.

Training (Eq. 4-8), S = sigmoid(L^(y)) for label y:
    L-CAM-Fm:  A <- A (.) S, then the rest of the network (``head``)
    L-CAM-Img: X <- X (.) up(S) in [0, 1] pixel space, then the whole backbone again
    loss = l1 * TV(S) + l2 * AV(S) + l3 * CE(y, u),  AV = mean(S^l4),
           TV = sum_pq (s_pq - s_pq+1)^2 + (s_pq - s_p+1q)^2, per image, batch-averaged.
``variant: reference`` reproduces the authors' code (docs/protocol.md section 4.5): the maps of
every label in the batch regularise every image (B x B maps), AV = mean((S + 0.0005)^l4),
TV adds 0.3 * the squared border and is divided by 2B. "The batch" is the whole optimiser
batch: with data-parallel workers each worker passes every worker's labels
(``batch_labels``), so that its (B/W, B) maps, divided by its own 2 B/W, averaged over the W
workers (DDP averages gradients) give the one-worker loss and gradients.
The CE-only ablation (the paper's starred rows) is l1 = l2 = 0; under ``reference`` it is the
authors' separate cross-entropy model, loss = CE with weight 1 (``effective_lambdas``).

Inference (Eq. 9): V = up(minmax(L^(y))): one forward pass.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Explainer, ExplainerInputError, Param
from .registry import register

PAPER_LAMBDAS = (0.01, 2.0, 1.5, 0.3)
CE_ONLY_LAMBDAS = (0.0, 0.0, 1.5, 0.3)


class AttentionHead(nn.Module):
    """g(A): a 1x1 convolution from K feature channels to R class maps, with bias (Eq. 3)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=True)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(feats)


def select_maps(cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L^(y_b) for each image b: (B, R, P, Q) -> (B, P, Q)."""
    return cams[torch.arange(len(labels), device=cams.device), labels]


def area_loss(s: torch.Tensor, power: float, variant: str = "paper") -> torch.Tensor:
    """AV(S) (Eq. 7) averaged over the batch; ``reference`` adds 0.0005 before the power.

    ``paper``: S is clamped at the smallest normal float first (a change below 1e-11 in
    S^0.3): d(S^l4)/dS is infinite at S = 0 (a sigmoid that underflowed), and inf * 0
    would make every gradient of the head NaN.
    """
    if variant == "reference":
        return ((s + 0.0005) ** power).mean()
    return (s.clamp_min(torch.finfo(s.dtype).tiny) ** power).mean()


def tv_loss(s: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """TV(S) (Eq. 8): squared right and down differences summed per map, batch-averaged.

    ``s`` is (B, P, Q) for ``paper`` and (B, M, P, Q) for ``reference``, which also adds
    0.3 * the sum of squared border pixels (each of the four edges) and divides by 2B.
    """
    dx = (s[..., :, 1:] - s[..., :, :-1]) ** 2
    dy = (s[..., 1:, :] - s[..., :-1, :]) ** 2
    if variant == "reference":
        border = 0.3 * ((s[..., 0, :] ** 2).sum() + (s[..., -1, :] ** 2).sum()
                        + (s[..., :, 0] ** 2).sum() + (s[..., :, -1] ** 2).sum())
        return (dx.sum() + dy.sum() + border) / (2.0 * s.shape[0])
    return (dx.sum() + dy.sum()) / s.shape[0]


def effective_lambdas(lambdas, variant: str = "paper") -> tuple[float, float, float, float]:
    """The weights a loss really uses: under ``reference``, l1 = l2 = 0 is the authors'
    cross-entropy-only model (``*_L_CAM_*A.py``: ``loss = CrossEntropyLoss()``), so the CE
    weight is 1 whatever l3 says; otherwise the lambdas as given."""
    l1, l2, l3, l4 = (float(v) for v in lambdas)
    if variant == "reference" and l1 == 0 and l2 == 0:
        l3 = 1.0
    return (l1, l2, l3, l4)


def lcam_loss(cams: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
              lambdas=PAPER_LAMBDAS, variant: str = "paper",
              batch_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 6: returns {'loss', 'tv', 'area', 'ce'} (terms before weighting).

    ``batch_labels`` (``reference`` only): the labels of the whole optimiser batch when this
    process holds a part of it (data-parallel workers); default ``labels``. ``lambdas`` go
    through ``effective_lambdas`` (the reference CE-only model weighs CE by 1).
    """
    l1, l2, l3, l4 = effective_lambdas(lambdas, variant)
    if variant == "reference":
        every = labels if batch_labels is None else batch_labels
        s = torch.sigmoid(cams[:, every])                  # (B, B, P, Q): the authors' slip
    else:
        s = torch.sigmoid(select_maps(cams, labels))       # (B, P, Q)
    tv, av = tv_loss(s, variant), area_loss(s, l4, variant)
    ce = F.cross_entropy(logits, labels)
    return {"loss": l1 * tv + l2 * av + l3 * ce, "tv": tv, "area": av, "ce": ce}


def training_forward(backbone, head: AttentionHead, mode: str, images: torch.Tensor,
                     labels: torch.Tensor, feats: torch.Tensor | None = None):
    """One L-CAM training forward: returns (cams (B, R, P, Q), logits (B, R)).

    ``mode`` 'fm' multiplies A by S (Eq. 4); 'img' multiplies the [0, 1] image by up(S)
    (Eq. 5) and runs the whole backbone again. ``feats`` may be passed if already computed.
    """
    if feats is None:
        with torch.no_grad():
            feats = backbone.features(images)
    cams = head(feats)
    s = torch.sigmoid(select_maps(cams, labels))[:, None]
    if mode == "fm":
        logits = backbone.head(feats * s)
    elif mode == "img":
        up = F.interpolate(s, size=images.shape[-2:], mode="bilinear", align_corners=False)
        logits = backbone(images * up)
    else:
        raise ValueError(f"mode must be 'fm' or 'img', got {mode!r}")
    return cams, logits


def load_head(path: str | Path, backbone, expect_mode: str | None = None) -> tuple[AttentionHead, dict]:
    """Load a head checkpoint written by ``lcam_train.save_head`` and check it fits ``backbone``."""
    path = Path(path)
    if not path.is_file():
        raise ExplainerInputError(f"checkpoint: file {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("meta", {})
    k, r = backbone.feature_channels, backbone.num_classes
    if (meta.get("in_channels"), meta.get("num_classes")) != (k, r):
        raise ExplainerInputError(
            f"checkpoint: {path.name} is a head for K={meta.get('in_channels')}, "
            f"R={meta.get('num_classes')} ({meta.get('backbone')}), but backbone "
            f"{backbone.name} has K={k}, R={r}")
    trained_on, name = meta.get("backbone"), getattr(backbone, "name", None)
    if trained_on is not None and name is not None and trained_on != name:
        # Same K and R is not enough: vgg16 and vgg16_7x7 share them, their A do not match.
        raise ExplainerInputError(
            f"checkpoint: {path.name} is a head trained on backbone {trained_on!r}, "
            f"not {name!r}")
    if expect_mode and meta.get("mode") not in (None, expect_mode):
        raise ExplainerInputError(f"checkpoint: {path.name} was trained as L-CAM-"
                                  f"{meta['mode'].capitalize()}, not {expect_mode}")
    head = AttentionHead(k, r)
    head.load_state_dict(ckpt["state_dict"])
    return head.eval(), meta


class _LCAM(Explainer):
    """Shared inference for both L-CAM methods: one forward, the head, Eq. 9."""

    family = "learned"
    paper = "Gkartzonika, Gkalelis & Mezaris, L-CAM, 2022"
    variants = ("paper", "reference")
    mode = "fm"
    params = {"checkpoint": Param(str, None, "trained head (.pt); None = fresh head")}

    def setup(self) -> None:
        bb, ckpt = self.backbone, self.config["checkpoint"]
        if ckpt:
            self.head, self.head_meta = load_head(ckpt, bb, self.mode)
        else:
            self.head = AttentionHead(bb.feature_channels, bb.num_classes).eval()
            self.head_meta = {"trained": False}
        self.head.to(bb.device)
        for p in self.head.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def _saliency(self, images, feats, logits, targets):
        # Only the explained class's row of the 1x1 conv is needed: L^(y) = w_y . A + b_y.
        conv = self.head.conv
        w = conv.weight[targets, :, 0, 0]                      # (B, K)
        return torch.einsum("bk,bkpq->bpq", w, feats) + conv.bias[targets][:, None, None]


@register
class LCAMFm(_LCAM):
    """L-CAM-Fm: the head is trained with the CAM applied to the feature maps (Eq. 4)."""

    name = "lcam_fm"
    display_name = "L-CAM-Fm"
    mode = "fm"


@register
class LCAMImg(_LCAM):
    """L-CAM-Img: the head is trained with the upsampled CAM applied to the image (Eq. 5)."""

    name = "lcam_img"
    display_name = "L-CAM-Img"
    mode = "img"
