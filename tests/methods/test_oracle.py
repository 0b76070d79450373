"""Agreement with an independent implementation: pytorch-grad-cam (grad-cam 1.5.7).

pytorch-grad-cam gets our ``SplitBackbone`` itself as the model (it takes [0, 1] images and
normalises inside) and the last module of ``backbone.body`` as its target layer, so both
compute maps from the same A and mask the same pixel-space input. Its targets are
``ClassifierOutputTarget`` (the class logit), matching Grad-CAM, Grad-CAM++ (``paper``) and
Score-CAM ``channel_softmax``. Agreement = Pearson correlation over pixels >= 0.99, per image
(Score-CAM ``channel_softmax``: >= 0.999 at 2 x 2, 4 x 4, 7 x 7 and 2 x 3 feature maps, on a
small network whose channel scores are far apart, so that the masks' upsampling matters;
on VGG-16 with ``-m full``). A known difference that stays below that: Grad-CAM++ adds
1e-6 to its denominator there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import methods
from backbones.base import SplitBackbone

gradcam_lib = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

ORACLES = {"gradcam": (gradcam_lib.GradCAM, "paper"),
           "gradcampp": (gradcam_lib.GradCAMPlusPlus, "paper"),
           "scorecam": (gradcam_lib.ScoreCAM, "channel_softmax")}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def oracle_maps(cls, bb, x, targets):
    with cls(model=bb, target_layers=[bb.body[-1]]) as cam:
        cam.batch_size = 128                           # Score-CAM's masked batch (default 16)
        # requires_grad on the input: every backbone parameter is frozen, and the library
        # needs a graph from the target layer to the logits.
        maps = cam(input_tensor=x.clone().requires_grad_(True),
                   targets=[ClassifierOutputTarget(int(c)) for c in targets])
    return maps


def _compare(name, bb, x, helpers, batch_size=None):
    with torch.no_grad():
        targets = bb(x).argmax(1)                      # top-1: non-degenerate Grad-CAM
    cls, variant = ORACLES[name]
    params = {"batch_size": batch_size} if batch_size else {}
    ex = methods.create(name, bb, variant=variant, **params)
    ours = ex.explain(x, targets).numpy()
    assert not ex.last_degenerate.any()
    theirs = oracle_maps(cls, bb, x, targets)
    assert theirs.shape == ours.shape
    assert helpers.hooks(bb) == {}                     # the oracle released its hooks too
    return [pearson(ours[i], theirs[i]) for i in range(len(x))]


@pytest.mark.parametrize("name", ["gradcam", "gradcampp"])
@pytest.mark.parametrize("bb_name, size", [("vgg16", (96, 80)), ("resnet50", (128, 96))])
def test_gradient_methods_agree_with_pytorch_grad_cam(name, bb_name, size, random_backbone,
                                                      helpers):
    # VGG-16: A 6 x 5 (features.29); ResNet-50: A 4 x 3 (layer4)
    bb = random_backbone(bb_name)
    x = helpers.images(2, *size, seed=21)
    corr = _compare(name, bb, x, helpers)
    assert min(corr) >= 0.99, corr


@pytest.mark.full
def test_scorecam_channel_softmax_agrees_with_pytorch_grad_cam(random_backbone, helpers):
    # VGG-16 (K = 512) at 32 x 48: A is 2 x 3, 512 masked forwards of a tiny image each.
    # With -m full only: Score-CAM has no backbone-specific code, and the same comparison
    # runs by default on patch_backbone below, square and non-square (2 x 3, as here).
    bb = random_backbone("vgg16")
    x = helpers.images(1, 32, 48, seed=22)
    corr = _compare("scorecam", bb, x, helpers, batch_size=256)
    assert min(corr) >= 0.99, corr


def patch_backbone(k: int = 32, r: int = 5, scale: float = 60.0) -> SplitBackbone:
    """A frozen CNN whose A has one cell per 8 x 8 patch (an 8-stride convolution: A is
    H/8 x W/8) and whose head (1x1 conv, max-pool, linear with large weights) gives masked
    images logits several units apart: the channel softmax is peaked, and the way the masks
    are upsampled (align_corners) moves the map (r < 0.99 with align_corners=False)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, k, 8, stride=8), nn.ReLU())
        tail = nn.Sequential(nn.Conv2d(k, 16, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                             nn.Flatten(1), nn.Linear(16, r))
        with torch.no_grad():
            tail[-1].weight.mul_(scale)
    return SplitBackbone(name="patch", body=body, tail=tail, feature_layer="body.3",
                         feature_channels=k, num_classes=r, weights_id="random-init",
                         input_size=(16, 16))


@pytest.mark.parametrize("cells", [(2, 2), (4, 4), (7, 7), (2, 3)], ids=str)
def test_scorecam_channel_softmax_equals_pytorch_grad_cam_at_every_map_size(cells, helpers):
    # pytorch-grad-cam upsamples the masks with UpsamplingBilinear2d (align_corners=True)
    bb = patch_backbone()
    x = helpers.images(3, 8 * cells[0], 8 * cells[1], seed=22)
    corr = _compare("scorecam", bb, x, helpers)
    assert min(corr) >= 0.999, corr
