"""Score-CAM (Wang et al., CVPR Workshops 2020).

``paper`` (default):  for each channel k,
    M_k = minmax(up(A_k)),   s_k = softmax_c( f(X * M_k) )     (X in [0, 1]: black fill)
    V   = minmax( ReLU( sum_k s_k * up(A_k) ) )                (upsample first, then min-max)
``reference`` (what the L-CAM authors ran): ReLU on A first, M_k = up(ReLU(A_k)) / (max - min)
    (no min subtracted), the *normalised* input is masked, V = minmax(ReLU(sum_k s_k * M_k)).
``channel_softmax`` (the popular libraries' form, as jacobgil/pytorch-grad-cam computes it):
    M_k = minmax(up_ac(A_k)), up_ac the bilinear resize with align_corners=True (torch's
    ``UpsamplingBilinear2d``, which pytorch-grad-cam uses); the scores are the logits of
    X * M_k, softmax across the K channels, the weighted sum of the A_k at feature resolution,
    ReLU, min-max, then upsample (align_corners=False, as every CAM-style map here).

Cost: K masked forwards (512 for VGG-16, 2048 for ResNet-50), batched by ``batch_size``.
Exact savings: every constant channel (max == min, e.g. an all-zero ReLU map) has an all-zero
mask, so all of them share one forward of the fill image; in ``paper`` and ``reference``
an all-zero channel contributes nothing and needs no forward at all. ``last_forward_passes``
reports the count actually run per image beside the nominal ``forward_passes`` = K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Explainer, Param, upsample
from .registry import register


def channel_masks_upsampled(acts: torch.Tensor, size: tuple[int, int],
                            variant: str) -> torch.Tensor:
    """(n, P, Q) channels -> (n, H, W): bilinear; align_corners=True for ``channel_softmax``
    (pytorch-grad-cam's masks), False (``methods.base.upsample``) for the others."""
    if variant != "channel_softmax":
        return upsample(acts[None], size)[0]
    return F.interpolate(acts[None], size=size, mode="bilinear", align_corners=True)[0]


@register
class ScoreCAM(Explainer):
    """Score-CAM: feature maps weighted by the class score of the image they mask."""

    name = "scorecam"
    display_name = "Score-CAM"
    family = "perturbation"
    paper = "Wang et al., Score-CAM, CVPR-W 2020"
    variants = ("paper", "reference", "channel_softmax")
    version = 2                     # 2: channel_softmax's masks upsampled with align_corners=True
    params = {"batch_size": Param(int, 64, "masked images per forward", ge=1)}

    def setup(self) -> None:
        self.normalise_at = "feature" if self.variant == "channel_softmax" else "input"

    @classmethod
    def planned_forward_passes(cls, params, backbone) -> int:
        return int(backbone["feature_shape"][0])          # K masked forwards

    def _score(self, batch: torch.Tensor, target: int, normalized: bool) -> torch.Tensor:
        bb = self.backbone
        out = bb.forward_normalized(batch) if normalized else bb(batch)
        if self.variant == "channel_softmax":
            return out[:, target]
        return out.softmax(dim=1)[:, target]

    @torch.no_grad()
    def _saliency(self, images, feats, logits, targets):
        size = tuple(images.shape[-2:])
        variant, bs = self.variant, self.config["batch_size"]
        normalized = variant == "reference"
        acts = torch.relu(feats) if variant == "reference" else feats
        flat = acts.flatten(2)
        span_lowres = flat.amax(2) - flat.amin(2)            # (B, K); 0 <=> constant channel
        maps, counts = [], []
        for b in range(len(images)):
            x = self.backbone.normalize(images[b:b + 1]) if normalized else images[b:b + 1]
            c = int(targets[b])
            varying = torch.nonzero(span_lowres[b] > 0).flatten()
            constant = torch.nonzero(span_lowres[b] <= 0).flatten()
            scores = torch.zeros(acts.shape[1], device=acts.device, dtype=acts.dtype)
            acc = torch.zeros(size, device=acts.device, dtype=acts.dtype)
            n_fw = 0
            for start in range(0, len(varying), bs):
                idx = varying[start:start + bs]
                up = channel_masks_upsampled(acts[b, idx], size, variant)   # (n, H, W)
                lo = up.flatten(1).amin(1)[:, None, None]
                hi = up.flatten(1).amax(1)[:, None, None]
                span = (hi - lo).clamp_min(torch.finfo(up.dtype).tiny)
                masks = up / span if variant == "reference" else (up - lo) / span
                s = self._score(x * masks[:, None], c, normalized)
                n_fw += len(idx)
                scores[idx] = s
                if variant == "paper":
                    acc += torch.einsum("n,nhw->hw", s, up)
                elif variant == "reference":
                    acc += torch.einsum("n,nhw->hw", s, masks)
            needs_fill = len(constant) and (
                variant == "channel_softmax"
                or (variant == "paper" and bool((flat[b, constant, 0] != 0).any())))
            if needs_fill:                       # all constant channels mask to the fill image
                s0 = self._score(torch.zeros_like(x), c, normalized)
                n_fw += 1
                scores[constant] = s0
                if variant == "paper":
                    acc += s0 * flat[b, constant, 0].sum()
            if variant == "channel_softmax":
                w = scores.softmax(dim=0)
                maps.append(torch.relu(torch.einsum("k,kpq->pq", w, acts[b])))
            else:
                maps.append(torch.relu(acc))
            counts.append(n_fw)
        self.last_forward_passes = sum(counts) / max(len(counts), 1)
        return torch.stack(maps)
