"""Two small backbones for the embedded quickstart: ``tiny_vgg`` and ``tiny_resnet``.

They let the whole benchmark run on a laptop CPU, offline, in minutes, with the same split
contract as the paper's networks (``SplitBackbone``; images in [0, 1], ImageNet mean/std
normalisation inside; 64x64 inputs; the 10 classes ``CLASS_NAMES`` of the quickstart data set):

- ``tiny_vgg`` mirrors VGG-16 (in its ``vgg16_bn`` form: from scratch, plain VGG stacks
  train too slowly for the time budget): 3x3 conv-BN-ReLU stacks with 2x2 max-pools.
  A = ``features.20`` (the ReLU after the last conv, before the last max-pool), 8x8x128;
  the head is that max-pool, a global max-pool and an MLP classifier with Dropout, as
  VGG-16's ``features[30:]``, ``avgpool`` and ``classifier``.
- ``tiny_resnet`` mirrors ResNet: a 3x3 conv-BN-ReLU stem with a max-pool, then three stages
  of torchvision ``BasicBlock`` residual blocks (16, 32, 64 channels). A = ``layer3``
  output, 8x8x64; the head is global average pooling and ``fc``.

This module defines the networks and loads them from a state_dict file (or random init,
``weights=None``). Their default weights, ``embedded``, are *trained by the harness* on the
quickstart data on first use and cached (``harness.data.embedded``);
``harness.data.models.load_backbone`` resolves the name to that file. The backbones package
itself never trains, generates data or touches the harness's cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .base import SplitBackbone
from .registry import (REGISTRY, WeightsError, classes_in_state, last_layer_outputs,
                       load_into)

VERSION = 1
INPUT_SIZE = 64
NUM_CLASSES = 10
# The quickstart data set's classes, sorted so that label = index = ImageFolder order.
CLASS_NAMES = tuple(sorted(("disc", "ring", "square", "triangle", "star", "cross", "crescent",
                            "stripes", "arrow", "hourglass")))


# ---------------------------------------------------------------- architectures
def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class TinyVGG(nn.Module):
    """VGG-style (as torchvision's ``vgg*_bn``): ``features``, ``pool``, ``classifier``.

    ``features``: 3x3 conv-BN-ReLU stacks of 16, 32, 64-64 and 128-128 channels, each stack
    but the last followed by a 2x2 max-pool; then the final max-pool (index 21). A is the ReLU
    after the last conv (``features.20``), 8x8x128 at 64x64 input. The head is the final
    max-pool, a global max-pool and the MLP ``classifier`` with Dropout.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 16), nn.MaxPool2d(2),                          # 0-3    64 -> 32
            *_conv_bn(16, 32), nn.MaxPool2d(2),                         # 4-7    32 -> 16
            *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),      # 8-14   16 -> 8
            *_conv_bn(64, 128), *_conv_bn(128, 128),                    # 15-20  A: 8x8x128
            nn.MaxPool2d(2),                                            # 21     8 -> 4
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class TinyResNet(nn.Module):
    """ResNet-style: ``conv1/bn1/relu/maxpool`` stem, ``layer1..3`` of BasicBlocks, ``fc``.

    Widths 16, 32, 64; ``layer2`` and ``layer3`` stride 2. A = ``layer3`` output, 8x8x64 at
    64x64 input. The head is global average pooling and ``fc``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)                                          # 64 -> 32
        self.layer1 = self._stage(widths[0], widths[0], 1)                      # 32
        self.layer2 = self._stage(widths[0], widths[1], 2)                      # 16
        self.layer3 = self._stage(widths[1], widths[2], 2)                      # 8: A
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        from torchvision.models.resnet import BasicBlock, conv1x1   # only when one is built
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHS = {"tiny_vgg": TinyVGG, "tiny_resnet": TinyResNet}


# name -> (feature layer, K)
SPLITS = {"tiny_vgg": ("features.20", 128), "tiny_resnet": ("layer3", 64)}


def _split(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    if name == "tiny_vgg":
        body = model.features[:21]
        tail = nn.Sequential(*model.features[21:], model.pool, nn.Flatten(1), model.classifier)
        return body, tail
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1,
                         model.layer2, model.layer3)
    return body, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)


def state_hash(state: dict) -> str:
    """16 hex digits of SHA-256 over a state_dict's names, dtypes, shapes and values.

    (The bytes of a ``torch.save`` file differ between saves of equal tensors.)
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]



# ---------------------------------------------------------------- registry entries
def _model_from_file(name: str, path: Path) -> tuple[nn.Module, str, dict]:
    """``(model, weights_id, info)`` from a state_dict file; ``info`` is its JSON sidecar.

    A file with the sidecar that ``harness.data.embedded`` writes (it records the
    ``weights_hash``) is identified as ``embedded:<stem>:<hash>``, any other file as
    ``file:<name>``."""
    if not path.is_file():
        raise WeightsError(f"weights: {str(path)!r} is not an existing state_dict file. Pass a "
                           "file path or null (random init); the 'embedded' weights are trained "
                           "by the harness on first use: harness.data.models.load_backbone("
                           f"{name!r}) resolves them.")
    side = path.with_suffix(".json")
    info = json.loads(side.read_text()) if side.is_file() else {}
    model = ARCHS[name]()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:            # not a torch file, truncated, pickled objects
        raise WeightsError(f"weights: {str(path)!r} is not a readable state_dict file "
                           f"({type(err).__name__}: {str(err).strip()[:400]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights: {str(path)!r} holds a {type(state).__name__}, not a "
                           "state_dict")
    classes = classes_in_state(state, model)       # trained on a data set of its own
    if classes is not None:
        model = ARCHS[name](num_classes=classes)
    load_into(model, state, str(path), name)
    wid = (f"embedded:{path.stem}:{info['weights_hash']}" if info.get("weights_hash")
           else f"file:{path.name}")
    return model, wid, info


def _build(name: str, weights, seed: int) -> SplitBackbone:
    info: dict = {}
    if weights == "embedded":
        raise WeightsError(f"weights: 'embedded' names the weights the harness trains on the "
                           f"quickstart data on first use; load them with "
                           f"harness.data.models.load_backbone({name!r}), or pass a state_dict "
                           "file path, or null for random init")
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ARCHS[name]()
        wid = "random-init"
    else:
        model, wid, info = _model_from_file(name, Path(str(weights)).expanduser())
    body, tail = _split(name, model)
    layer, k = SPLITS[name]
    bb = SplitBackbone(name=name, body=body, tail=tail, feature_layer=layer,
                       feature_channels=k, num_classes=last_layer_outputs(model),
                       weights_id=wid, input_size=(INPUT_SIZE, INPUT_SIZE),
                       class_names=list(CLASS_NAMES)
                       if last_layer_outputs(model) == NUM_CLASSES else None)
    bb.weights_info = info
    return bb


_META = dict(family="embedded", input_size=(INPUT_SIZE, INPUT_SIZE), num_classes=NUM_CLASSES,
             dataset="quickstart-v1", default_weights="embedded", weights_names=("embedded",),
             version=VERSION)


@REGISTRY.register("tiny_vgg", paper="VGG-style (Simonyan & Zisserman 2015), embedded",
                   feature_layer="features.20", feature_shape=(128, 8, 8), **_META)
def tiny_vgg(weights="embedded", seed: int = 0) -> SplitBackbone:
    """VGG-style embedded backbone (A = features.20, 8x8x128); see the module doc."""
    return _build("tiny_vgg", weights, seed)


@REGISTRY.register("tiny_resnet", paper="ResNet-style (He et al. 2016), embedded",
                   feature_layer="layer3", feature_shape=(64, 8, 8), **_META)
def tiny_resnet(weights="embedded", seed: int = 0) -> SplitBackbone:
    """ResNet-style embedded backbone (A = layer3, 8x8x64); see the module doc."""
    return _build("tiny_resnet", weights, seed)
