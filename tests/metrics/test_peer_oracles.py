"""Our AD/IC against a peer library's: pytorch-grad-cam's ``CamMultImageConfidenceChange``
(the masked image = the *normalised* image times the map, scored by the softmax probability)
computes O under our preset ``fill: mean, soft, prob`` at 100% kept, independently of our
Evaluator; its ``DropInConfidence`` is max(0, Y - O) (our AD term times Y) and its
``IncreaseInConfidence`` is [O > Y] (our IC term). Maps of Grad-CAM on a random-init
``tiny_vgg`` and random maps, 6 images at 64 x 64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import backbones
import methods
from harness.metrics.protocol import (Evaluator, ProtocolPreset, average_drop,
                                      increase_in_confidence)
from harness.testing import sample_images

pgc_metrics = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # noqa: E402

MEAN_FILL = ProtocolPreset(name="custom", soft=True, fill="mean", score="prob")


class _Normalised(torch.nn.Module):
    """The backbone on normalised images: the model pytorch-grad-cam's metrics are given."""

    def __init__(self, bb):
        super().__init__()
        self.bb = bb

    def forward(self, z):
        return self.bb.forward_normalized(z)


@pytest.mark.parametrize("maps_from", ["gradcam", "random"])
def test_o_ad_and_ic_at_100_percent_equal_pytorch_grad_cams(maps_from):
    bb = backbones.load("tiny_vgg", weights=None, seed=4)
    x = sample_images(6, 64, 64, seed=9)
    if maps_from == "gradcam":
        maps = methods.create("gradcam", bb).explain(x)
    else:
        maps = torch.rand(6, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        targets = bb(x).argmax(1)
    ours = Evaluator(bb, (1.0,), MEAN_FILL).evaluate(x, maps, targets)
    z, cams = bb.normalize(x), maps.numpy().astype(np.float32)
    chosen = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets]
    model = _Normalised(bb)
    change = pgc_metrics.CamMultImageConfidenceChange()(z, cams, chosen, model)
    drop = pgc_metrics.DropInConfidence()(z, cams, chosen, model)
    increase = pgc_metrics.IncreaseInConfidence()(z, cams, chosen, model)
    y, o = ours.y.double().numpy(), ours.o[:, 0].double().numpy()
    np.testing.assert_allclose(o - y, change, atol=1e-6)              # O - Y per image
    np.testing.assert_allclose(np.maximum(y - o, 0), drop, atol=1e-6)
    assert average_drop(ours.y, ours.o[:, 0]) == pytest.approx(
        100 * float(np.mean(drop / y)), rel=1e-5)
    assert increase_in_confidence(ours.y, ours.o[:, 0]) == pytest.approx(
        100 * float(np.mean(increase)))
