"""The paper's backbones from torchvision: VGG-16 (14x14 and 7x7 feature maps) and ResNet-50.

Feature maps A (docs/protocol.md section 3):
- ``vgg16``: ``features[:30]`` (ReLU after conv5_3), 14x14x512; the head is the last
  max-pool, the adaptive 7x7 average pool and the classifier.
- ``vgg16_7x7``: ``features[:31]`` (after the last max-pool), 7x7x512 (the paper's L-CAM-Img
  dagger row).
- ``resnet50``: ``layer4`` output, 7x7x2048; the head is global average pool and ``fc``.

Weights are ImageNet ``IMAGENET1K_V1`` by default (never ``DEFAULT``: for ResNet-50 that is
V2, a different model), a torchvision-format state_dict file, or ``None`` (random init).
"""
from __future__ import annotations

from torch import nn
from torchvision import models

from .base import SplitBackbone
from .registry import REGISTRY, build_torchvision


def _vgg_split(model: nn.Module, cut: int):
    body = model.features[:cut]
    rest = list(model.features[cut:])
    tail = nn.Sequential(*rest, model.avgpool, nn.Flatten(1), model.classifier)
    return body, tail


@REGISTRY.register("vgg16", paper="Simonyan & Zisserman 2015", feature_layer="features.29",
                   feature_shape=(512, 14, 14), family="torchvision", input_size=(224, 224),
                   weights_enum="VGG16_Weights")
def vgg16(weights="IMAGENET1K_V1", seed: int = 0) -> SplitBackbone:
    model, wid = build_torchvision(models.vgg16, "VGG16_Weights", weights, seed)
    body, tail = _vgg_split(model, 30)
    return SplitBackbone(name="vgg16", body=body, tail=tail, feature_layer="features.29",
                         feature_channels=512, num_classes=1000, weights_id=wid)


@REGISTRY.register("vgg16_7x7", paper="Simonyan & Zisserman 2015; L-CAM-Img dagger",
                   feature_layer="features.30", feature_shape=(512, 7, 7), family="torchvision",
                   input_size=(224, 224),
                   weights_enum="VGG16_Weights")
def vgg16_7x7(weights="IMAGENET1K_V1", seed: int = 0) -> SplitBackbone:
    model, wid = build_torchvision(models.vgg16, "VGG16_Weights", weights, seed)
    body, tail = _vgg_split(model, 31)
    return SplitBackbone(name="vgg16_7x7", body=body, tail=tail, feature_layer="features.30",
                         feature_channels=512, num_classes=1000, weights_id=wid)


@REGISTRY.register("resnet50", paper="He et al. 2016", feature_layer="layer4",
                   feature_shape=(2048, 7, 7), family="torchvision", input_size=(224, 224),
                   weights_enum="ResNet50_Weights")
def resnet50(weights="IMAGENET1K_V1", seed: int = 0) -> SplitBackbone:
    model, wid = build_torchvision(models.resnet50, "ResNet50_Weights", weights, seed)
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3, model.layer4)
    tail = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return SplitBackbone(name="resnet50", body=body, tail=tail, feature_layer="layer4",
                         feature_channels=2048, num_classes=1000, weights_id=wid)
