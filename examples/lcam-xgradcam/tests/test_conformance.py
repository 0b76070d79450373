"""The plugin passes lcam-bench's conformance kit, and XGrad-CAM matches an independent
implementation (pytorch-grad-cam's XGradCAM, when installed). Run: pytest examples/lcam-xgradcam
"""
import numpy as np
import pytest
import torch

import backbones
from harness.testing import check_backbone, check_explainer, sample_images
from lcam_xgradcam import XGradCAM, resnet18_layer3


def test_xgradcam_passes_the_kit():
    check_explainer(XGradCAM)                                   # the kit's tiny CNN
    check_explainer(XGradCAM, backbone=backbones.load("resnet18", weights=None), size=64,
                    params={"score": "prob"})


def test_resnet18_layer3_passes_the_kit():
    check_backbone(resnet18_layer3, size=64, feature_shape=(256, 14, 14))


def test_xgradcam_agrees_with_pytorch_grad_cam():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    bb = backbones.load("resnet18", weights=None)
    x = sample_images(2, 96, 96, seed=4)
    with torch.no_grad():
        targets = bb(x).argmax(1)
    ours = XGradCAM(bb).explain(x, targets).numpy()
    with pgc.XGradCAM(model=bb, target_layers=[bb.body[-1]]) as cam:
        theirs = cam(input_tensor=x.clone().requires_grad_(True),
                     targets=[ClassifierOutputTarget(int(c)) for c in targets])
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99
