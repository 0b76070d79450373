"""The conformance kit (``harness.testing``): what our own methods and backbones pass, and
that it catches each way a method or a backbone can break the contract.

The six built-in methods run it on the kit's tiny CNN (Grad-CAM also on one model of every
torchvision family: tests/backbones/test_torchvision_families.py); the paper's and the
embedded backbones at 64 x 64 (the torchvision families: the same file). The example
plugin (examples/lcam-xgradcam) passes it from its source folder, installed or not.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from backbones.base import SplitBackbone
from harness.testing import (ConformanceError, check_backbone, check_explainer,
                             tiny_backbone)
from methods.base import Explainer, Param

EXAMPLE_SRC = Path(__file__).resolve().parents[2] / "examples" / "lcam-xgradcam" / "src"
FAST = {"rise": {"n_masks": 24, "batch_size": 12}, "scorecam": {"batch_size": 64}}


@pytest.mark.parametrize("name", methods.names())
def test_every_built_in_method_passes_the_kit(name):
    found = check_explainer(name, params=FAST.get(name))
    assert found["forward_passes"] == methods.create(name, tiny_backbone(),
                                                     **FAST.get(name, {})).forward_passes


@pytest.mark.parametrize("name", ["vgg16", "vgg16_7x7", "resnet50", "tiny_vgg", "tiny_resnet"])
def test_the_paper_and_embedded_backbones_pass_the_kit(name, random_backbone):
    # the session's random-init models (A's shape at the input size: tests/backbones)
    found = check_backbone(lambda weights=None: random_backbone(name), size=64)
    assert found["feature_layer"] == random_backbone(name).feature_layer


def test_the_example_plugin_passes_the_kit(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    from lcam_xgradcam import XGradCAM, resnet18_layer3
    check_explainer(XGradCAM, params={"score": "prob"})
    check_backbone(resnet18_layer3, size=64, feature_shape=(256, 14, 14))


# -- what the kit catches ---------------------------------------------------------------------
class Reference(Explainer):
    """A correct one-pass method to break in one place at a time: the class-weighted maps."""

    name, display_name, family, paper = "kit_ref", "Ref", "gradient", "tests"

    def _saliency(self, images, feats, logits, targets):
        w = self.backbone.tail[-1].weight[targets][:, :, None, None]
        return torch.relu((w * feats).sum(1))


class LeaksAHook(Reference):
    def _saliency(self, images, feats, logits, targets):
        self.backbone.body[0].register_forward_hook(lambda *a: None)
        return super()._saliency(images, feats, logits, targets)


class UndeclaredForwards(Reference):
    def _saliency(self, images, feats, logits, targets):
        self.backbone(images)                       # a second pass, #FW still says 1
        return super()._saliency(images, feats, logits, targets)


class IgnoresTargets(Reference):
    def _saliency(self, images, feats, logits, targets):
        return super()._saliency(images, feats, logits, logits.argmax(1))


class BatchDependent(Reference):
    def _saliency(self, images, feats, logits, targets):
        return super()._saliency(images, feats, logits, targets) + feats.mean(0).sum(0)


class NotDeterministic(Reference):
    def _saliency(self, images, feats, logits, targets):
        return super()._saliency(images, feats, logits, targets) * random.uniform(1, 2) \
            + torch.rand(feats.shape[-2:], generator=torch.Generator().manual_seed(
                random.randrange(1 << 30)))


class SkipsInputChecks(Reference):
    def check_inputs(self, images, targets):
        return torch.as_tensor(images).float(), None


class LeavesGradients(Reference):
    def _saliency(self, images, feats, logits, targets):
        self.backbone.tail[-1].weight.requires_grad_(True)
        return super()._saliency(images, feats, logits, targets)


class BadDeclaration(Reference):
    params = {"k": Param(int, 0, "", ge=1)}


@pytest.mark.parametrize("cls, check", [
    (LeaksAHook, "backbone left clean"), (UndeclaredForwards, "forward passes"),
    (IgnoresTargets, "targets"), (BatchDependent, "batch independence"),
    (NotDeterministic, "determinism"), (SkipsInputChecks, "input checks"),
    (LeavesGradients, "backbone left clean"), (BadDeclaration, "declarations")],
    ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_the_kit_catches_a_broken_method(cls, check):
    check_explainer(Reference)                       # the unbroken one passes
    with pytest.raises(ConformanceError) as err:
        check_explainer(cls, backbone=tiny_backbone())
    assert check in dict(err.value.failed), err.value


def _broken_backbone(what: str):
    def factory(weights=None):
        bb = tiny_backbone()
        if what == "in-place head":
            bb.tail = nn.Sequential(nn.ReLU(inplace=True), *bb.tail)
        elif what == "trainable":
            bb.tail[-1].weight.requires_grad_(True)
        elif what == "unnormalised":
            bb.mean.fill_(120.0)
        elif what == "head sees the image":
            first = bb.body[0]
            bb.tail = nn.Sequential(*bb.tail[:2], nn.Unflatten(1, (bb.feature_channels, 1, 1)),
                                    nn.Upsample(size=(3, 3)), nn.Conv2d(6, 3, 1), first,
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 5))
        return bb
    return factory


@pytest.mark.parametrize("what, check", [
    ("in-place head", "head differentiable, A unchanged"), ("trainable", "frozen, eval mode"),
    ("unnormalised", "normalisation inside"), ("head sees the image", "first layer")])
def test_the_kit_catches_a_broken_backbone(what, check):
    with pytest.raises(ConformanceError) as err:
        check_backbone(_broken_backbone(what))
    assert check in dict(err.value.failed), err.value


def test_the_kit_refuses_a_factory_that_is_not_a_split_backbone():
    with pytest.raises(ConformanceError, match="not a backbones.base.SplitBackbone"):
        check_backbone(lambda weights=None: nn.Linear(3, 3))
    assert isinstance(tiny_backbone(), SplitBackbone) and "harness.testing" in sys.modules
