"""Split backbones: the features/head contract, frozen eval mode, feature shapes, weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import backbones
from backbones import SplitBackbone, describe_weights
from backbones.base import IMAGENET_MEAN, IMAGENET_STD

PAPER_SHAPES = {"vgg16": (512, 14, 14), "vgg16_7x7": (512, 7, 7), "resnet50": (2048, 7, 7)}
# The paper's and the embedded entries; the 66 other torchvision models (17 families) are
# covered by tests/backbones/test_torchvision_families.py (one model per family, metadata of all).
CORE = [n for n in backbones.names()
        if backbones.REGISTRY.get(n).meta.get("family") in ("torchvision", "embedded")]


@pytest.mark.parametrize("name", CORE)
def test_every_entry_fulfils_the_split_contract(name, random_backbone):
    bb = random_backbone(name)
    meta = backbones.REGISTRY.get(name).meta
    assert isinstance(bb, SplitBackbone) and bb.name == name
    assert bb.weights_id == "random-init" and bb.feature_layer == meta["feature_layer"]
    # frozen and in eval mode, whatever the caller asks
    assert not any(p.requires_grad for p in bb.parameters())
    assert not any(m.training for m in bb.modules())
    bb.train()
    assert not any(m.training for m in bb.modules())
    # A at the backbone's own input size has the registered shape (K, P, Q)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = bb.features(torch.rand(1, 3, *bb.input_size, generator=gen))
    assert tuple(a.shape[1:]) == tuple(meta["feature_shape"])
    assert a.shape[1] == bb.feature_channels
    # forward == head(features) == forward_normalized(normalize(x)), on a smaller input
    x = torch.rand(2, 3, *(max(s // 4, 32) for s in bb.input_size), generator=gen)
    with torch.no_grad():
        logits = bb.head(bb.features(x))
        full = bb(x)
        assert torch.allclose(bb.forward_normalized(bb.normalize(x)), full, atol=1e-5)
    assert logits.shape == (2, bb.num_classes)
    assert torch.allclose(full, logits, atol=1e-5)
    assert isinstance(bb.first_layer, nn.Conv2d) and bb.first_layer.in_channels == 3


@pytest.mark.parametrize("name, shape", PAPER_SHAPES.items())
def test_paper_feature_maps(name, shape):
    meta = backbones.REGISTRY.get(name).meta
    assert tuple(meta["feature_shape"]) == shape
    assert meta["feature_layer"] == {"vgg16": "features.29", "vgg16_7x7": "features.30",
                                     "resnet50": "layer4"}[name]


def test_vgg16_split_points(random_backbone):
    bb = random_backbone("vgg16")
    assert len(bb.body) == 30 and isinstance(bb.body[-1], nn.ReLU)          # ReLU after conv5_3
    assert isinstance(bb.tail[0], nn.MaxPool2d)                              # then the last pool
    assert isinstance(bb.body[0], nn.Conv2d) and bb.first_layer is bb.body[0]


def test_resnet50_split_points(random_backbone):
    bb = random_backbone("resnet50")
    assert bb.body[-1][-1].conv3.out_channels == 2048                         # layer4
    assert isinstance(bb.tail[0], nn.AdaptiveAvgPool2d) and isinstance(bb.tail[-1], nn.Linear)
    assert bb.first_layer is bb.body[0]


def test_normalisation_is_imagenet_mean_std_inside(random_backbone):
    bb = random_backbone("resnet50")
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(bb.normalize(x), (x - mean) / std)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = backbones.load("resnet50", weights=None, seed=0)
    assert torch.equal(torch.rand(3), expected_next)         # global RNG untouched
    b = backbones.load("resnet50", weights=None, seed=0)
    c = backbones.load("resnet50", weights=None, seed=1)
    assert torch.equal(a.tail[-1].weight, b.tail[-1].weight)
    assert not torch.equal(a.tail[-1].weight, c.tail[-1].weight)


def test_state_dict_file_round_trip(tmp_path):
    src = backbones.load("resnet50", weights=None, seed=3)
    from torchvision import models
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = models.resnet50(weights=None)
    path = tmp_path / "resnet50_seed3.pth"
    torch.save({"state_dict": model.state_dict()}, path)             # wrapped form accepted
    bb = backbones.load("resnet50", weights=str(path))
    assert bb.weights_id == "file:resnet50_seed3.pth"
    assert torch.equal(bb.tail[-1].weight, src.tail[-1].weight)
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(bb(x), src(x), atol=1e-5)


def test_describe_weights():
    assert describe_weights(None) == "random-init"
    assert describe_weights("IMAGENET1K_V1") == "IMAGENET1K_V1"
