"""``resnet18_layer3``: torchvision's ResNet-18 explained at ``layer3`` instead of ``layer4``.

A = the output of ``layer3`` (256 x 14 x 14 at 224 x 224): twice the resolution of the
built-in ``resnet18``'s A, for explanations at a finer grid. The head is everything after it
(``layer4``, global average pooling, ``fc``), so ``head(features(x))`` is the model's output.
Weights: a ``ResNet18_Weights`` name (the default ``IMAGENET1K_V1`` must be in the torch hub
cache: nothing is downloaded), a state_dict file, or None (random init, seeded).
"""
from torch import nn
from torchvision import models

from backbones.base import SplitBackbone
from backbones.registry import build_torchvision


def resnet18_layer3(weights="IMAGENET1K_V1", seed: int = 0) -> SplitBackbone:
    """ResNet-18 split after ``layer3`` (see the module docstring)."""
    model, weights_id = build_torchvision(models.resnet18, "ResNet18_Weights", weights, seed)
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3)
    tail = nn.Sequential(model.layer4, model.avgpool, nn.Flatten(1), model.fc)
    return SplitBackbone(name="resnet18_layer3", body=body, tail=tail, feature_layer="layer3",
                         feature_channels=256, num_classes=1000, weights_id=weights_id)


resnet18_layer3.paper = "He et al. 2016 (A at layer3)"
resnet18_layer3.weights_names = tuple(w.name for w in models.ResNet18_Weights)
