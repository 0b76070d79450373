"""Torchvision classifiers as split backbones: the paper's three entries, and every other
torchvision classification CNN by its builder name.

The paper's entries (docs/protocol.md section 3), kept exactly as they were:
- ``vgg16``: ``features[:30]`` (ReLU after conv5_3), 14x14x512; the head is the last
  max-pool, the adaptive 7x7 average pool and the classifier.
- ``vgg16_7x7``: ``features[:31]`` (after the last max-pool), 7x7x512 (the paper's L-CAM-Img
  dagger row).
- ``resnet50``: ``layer4`` output, 7x7x2048; the head is global average pool and ``fc``.
Their weights are ImageNet ``IMAGENET1K_V1`` by default (never ``DEFAULT``: for ResNet-50
that is V2, a different model), a torchvision-format state_dict file, or ``None`` (random
init); their images are prepared by the data layer's rule (shorter side 256, crop 224).

Every other torchvision classification CNN (``FAMILIES``): A is the output of the *last
convolutional stage*, the head everything after it (pooling, flatten, classifier), so that
``head(features(x))`` is exactly the torchvision model's output on the normalised image.
Which layer, per family (shapes at each model's default weights' crop size: ``harness ls``):

    vgg11..19(_bn), alexnet   the ReLU after the last conv, before the last max-pool (as vgg16)
    resnet, resnext, wide_resnet   layer4
    densenet                  features (norm5), then the ReLU of torchvision's forward
    mobilenet_v2 / v3, efficientnet (v1, v2), convnext, squeezenet   the last of ``features``
    mnasnet                   the last of ``layers``;  shufflenet_v2: conv5
    regnet                    trunk_output;  googlenet: inception5b;  inception_v3: Mixed_7c

Weights: the builder's enum names (default ``IMAGENET1K_V1``, or the first member where there
is none; ``DEFAULT`` refused), a state_dict file, or None. Preprocessing comes from the
weights' own ``transforms()`` (``Preprocessing``: crop, resize, interpolation for the data
layer; mean/std inside the backbone); random init and files use the default weights'. With
their ImageNet weights GoogLeNet and Inception-v3 re-normalise their input to (x - 0.5) / 0.5
(``transform_input``): their backbone then normalises with mean = std = 0.5 itself.
Vision transformers (ViT, Swin, MaxViT) are refused: their last layers are attention over
tokens or windows, not a convolutional stage, so there is no A of shape (K, P, Q).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn
from torchvision import models

from .base import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, SplitBackbone  # noqa: F401
from .registry import REGISTRY, build_torchvision, last_layer_outputs


def _vgg_split(model: nn.Module, cut: int):
    body = model.features[:cut]
    rest = list(model.features[cut:])
    tail = nn.Sequential(*rest, model.avgpool, nn.Flatten(1), model.classifier)
    return body, tail


@REGISTRY.register("vgg16", paper="Simonyan & Zisserman 2015", feature_layer="features.29",
                   feature_shape=(512, 14, 14), family="torchvision", input_size=(224, 224),
                   weights_enum="VGG16_Weights")
def vgg16(weights="IMAGENET1K_V1", seed: int = 0, num_classes: int | None = None) -> SplitBackbone:
    model, wid = build_torchvision(models.vgg16, "VGG16_Weights", weights, seed, num_classes)
    body, tail = _vgg_split(model, 30)
    return SplitBackbone(name="vgg16", body=body, tail=tail, feature_layer="features.29",
                         feature_channels=512, num_classes=last_layer_outputs(model),
                         weights_id=wid)


@REGISTRY.register("vgg16_7x7", paper="Simonyan & Zisserman 2015; L-CAM-Img dagger",
                   feature_layer="features.30", feature_shape=(512, 7, 7), family="torchvision",
                   input_size=(224, 224),
                   weights_enum="VGG16_Weights")
def vgg16_7x7(weights="IMAGENET1K_V1", seed: int = 0, num_classes: int | None = None) -> SplitBackbone:
    model, wid = build_torchvision(models.vgg16, "VGG16_Weights", weights, seed, num_classes)
    body, tail = _vgg_split(model, 31)
    return SplitBackbone(name="vgg16_7x7", body=body, tail=tail, feature_layer="features.30",
                         feature_channels=512, num_classes=last_layer_outputs(model),
                         weights_id=wid)


@REGISTRY.register("resnet50", paper="He et al. 2016", feature_layer="layer4",
                   feature_shape=(2048, 7, 7), family="torchvision", input_size=(224, 224),
                   weights_enum="ResNet50_Weights")
def resnet50(weights="IMAGENET1K_V1", seed: int = 0, num_classes: int | None = None) -> SplitBackbone:
    model, wid = build_torchvision(models.resnet50, "ResNet50_Weights", weights, seed, num_classes)
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                         model.layer1, model.layer2, model.layer3, model.layer4)
    tail = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return SplitBackbone(name="resnet50", body=body, tail=tail, feature_layer="layer4",
                         feature_channels=2048, num_classes=last_layer_outputs(model),
                         weights_id=wid)


# -- every other torchvision classification CNN --------------------------------------------------
def default_weights_name(enum) -> str:
    """``IMAGENET1K_V1``, or the enum's first member where it has none."""
    return "IMAGENET1K_V1" if "IMAGENET1K_V1" in enum.__members__ else next(iter(enum)).name


def weights_preprocessing(enum_name: str, weights=None) -> Preprocessing:
    """The preprocessing of ``weights`` (an enum member name; anything else, such as None or a
    state_dict path: the enum's default member), from its ``transforms()``."""
    enum = getattr(models, enum_name)
    name = weights if isinstance(weights, str) and weights in enum.__members__ \
        else default_weights_name(enum)
    t = enum[name].transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return Preprocessing(crop=(crop, crop), resize=resize, interpolation=t.interpolation.value,
                         mean=tuple(t.mean), std=tuple(t.std))


class GlobalMean(nn.Module):
    """``x.mean([2, 3])``: the global pooling of ShuffleNetV2 and MNASNet, as they compute it."""

    def forward(self, x):
        return x.mean([2, 3])


def _modules(model: nn.Module, names: tuple[str, ...]) -> nn.Sequential:
    return nn.Sequential(*(getattr(model, n) for n in names))


def _split_vgg(model):            # vgg*, alexnet: cut after the last ReLU of ``features``
    cut = max(i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)) + 1
    return _vgg_split(model, cut)


def _split_resnet(model):
    return (_modules(model, ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                             "layer4")),
            nn.Sequential(model.avgpool, nn.Flatten(1), model.fc))


def _split_densenet(model):       # torchvision's forward applies a ReLU after ``features``
    return (nn.Sequential(model.features, nn.ReLU()),
            nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1), model.classifier))


def _split_features(model):       # mobilenet_v2/v3, efficientnet, convnext
    pool = model.avgpool if hasattr(model, "avgpool") else nn.AdaptiveAvgPool2d((1, 1))
    flatten = [] if isinstance(model, models.ConvNeXt) else [nn.Flatten(1)]   # in its classifier
    return model.features, nn.Sequential(pool, *flatten, model.classifier)


def _split_regnet(model):
    return (_modules(model, ("stem", "trunk_output")),
            nn.Sequential(model.avgpool, nn.Flatten(1), model.fc))


def _split_shufflenet(model):
    return (_modules(model, ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")),
            nn.Sequential(GlobalMean(), model.fc))


def _split_mnasnet(model):
    return model.layers, nn.Sequential(GlobalMean(), model.classifier)


def _split_squeezenet(model):     # the head keeps SqueezeNet's 1x1 class conv and pooling
    return model.features, nn.Sequential(model.classifier, nn.Flatten(1))


def _split_googlenet(model):      # the auxiliary classifiers run in training only
    stages = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
              "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d",
              "inception4e", "maxpool4", "inception5a", "inception5b")
    return (_modules(model, stages),
            nn.Sequential(model.avgpool, nn.Flatten(1), model.dropout, model.fc))


def _split_inception(model):
    stages = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
              "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
              "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
    return (_modules(model, stages),
            nn.Sequential(model.avgpool, model.dropout, nn.Flatten(1), model.fc))


@dataclass(frozen=True)
class Family:
    """Torchvision builders split the same way: ``split(model) -> (body, tail)``; ``members``:
    builder -> (A's layer in torchvision's module names, K, P) at the default weights' crop."""

    name: str
    paper: str
    head: str
    split: Callable[[nn.Module], tuple[nn.Module, nn.Module]]
    members: dict[str, tuple[str, int, int]]


_VGG_HEAD = "last max-pool, avgpool, classifier"
FAMILIES = (
    Family("vgg", "Simonyan & Zisserman 2015", _VGG_HEAD, _split_vgg, {
        "vgg11": ("features.19", 512, 14), "vgg11_bn": ("features.27", 512, 14),
        "vgg13": ("features.23", 512, 14), "vgg13_bn": ("features.33", 512, 14),
        "vgg16_bn": ("features.42", 512, 14), "vgg19": ("features.35", 512, 14),
        "vgg19_bn": ("features.51", 512, 14)}),
    Family("alexnet", "Krizhevsky et al. 2012", _VGG_HEAD, _split_vgg, {
        "alexnet": ("features.11", 256, 13)}),
    Family("resnet", "He et al. 2016", "avgpool, fc", _split_resnet, {
        "resnet18": ("layer4", 512, 7), "resnet34": ("layer4", 512, 7),
        "resnet101": ("layer4", 2048, 7), "resnet152": ("layer4", 2048, 7)}),
    Family("resnext", "Xie et al. 2017", "avgpool, fc", _split_resnet, {
        "resnext50_32x4d": ("layer4", 2048, 7), "resnext101_32x8d": ("layer4", 2048, 7),
        "resnext101_64x4d": ("layer4", 2048, 7)}),
    Family("wide_resnet", "Zagoruyko & Komodakis 2016", "avgpool, fc", _split_resnet, {
        "wide_resnet50_2": ("layer4", 2048, 7), "wide_resnet101_2": ("layer4", 2048, 7)}),
    Family("densenet", "Huang et al. 2017", "ReLU, avgpool, classifier", _split_densenet, {
        f"densenet{n}": ("features.norm5+relu", k, 7)
        for n, k in ((121, 1024), (161, 2208), (169, 1664), (201, 1920))}),
    Family("mobilenet_v2", "Sandler et al. 2018", "avgpool, classifier", _split_features, {
        "mobilenet_v2": ("features.18", 1280, 7)}),
    Family("mobilenet_v3", "Howard et al. 2019", "avgpool, classifier", _split_features, {
        "mobilenet_v3_large": ("features.16", 960, 7),
        "mobilenet_v3_small": ("features.12", 576, 7)}),
    Family("efficientnet", "Tan & Le 2019", "avgpool, classifier", _split_features, {
        f"efficientnet_b{i}": ("features.8", k, p) for i, (k, p) in enumerate((
            (1280, 7), (1280, 8), (1408, 9), (1536, 10), (1792, 12), (2048, 15), (2304, 17),
            (2560, 19)))}),
    Family("efficientnet_v2", "Tan & Le 2021", "avgpool, classifier", _split_features, {
        "efficientnet_v2_s": ("features.7", 1280, 12),
        "efficientnet_v2_m": ("features.8", 1280, 15),
        "efficientnet_v2_l": ("features.8", 1280, 15)}),
    Family("convnext", "Liu et al. 2022", "avgpool, classifier (LayerNorm2d, Linear)",
           _split_features, {"convnext_tiny": ("features.7", 768, 7),
                             "convnext_small": ("features.7", 768, 7),
                             "convnext_base": ("features.7", 1024, 7),
                             "convnext_large": ("features.7", 1536, 7)}),
    Family("regnet", "Radosavovic et al. 2020", "avgpool, fc", _split_regnet, {
        f"regnet_{n}": ("trunk_output", k, 7) for n, k in (
            ("x_400mf", 400), ("x_800mf", 672), ("x_1_6gf", 912), ("x_3_2gf", 1008),
            ("x_8gf", 1920), ("x_16gf", 2048), ("x_32gf", 2520), ("y_400mf", 440),
            ("y_800mf", 784), ("y_1_6gf", 888), ("y_3_2gf", 1512), ("y_8gf", 2016),
            ("y_16gf", 3024), ("y_32gf", 3712))} | {
        "regnet_y_128gf": ("trunk_output", 7392, 12)}),
    Family("shufflenet_v2", "Ma et al. 2018", "global mean, fc", _split_shufflenet, {
        f"shufflenet_v2_x{w}": ("conv5", 2048 if w == "2_0" else 1024, 7)
        for w in ("0_5", "1_0", "1_5", "2_0")}),
    Family("mnasnet", "Tan et al. 2019", "global mean, classifier", _split_mnasnet, {
        f"mnasnet{w}": ("layers.16", 1280, 7) for w in ("0_5", "0_75", "1_0", "1_3")}),
    Family("squeezenet", "Iandola et al. 2016", "classifier (1x1 class conv, ReLU, avgpool)",
           _split_squeezenet, {"squeezenet1_0": ("features.12", 512, 13),
                               "squeezenet1_1": ("features.12", 512, 13)}),
    Family("googlenet", "Szegedy et al. 2015", "avgpool, dropout, fc", _split_googlenet, {
        "googlenet": ("inception5b", 1024, 7)}),
    Family("inception_v3", "Szegedy et al. 2016", "avgpool, dropout, fc", _split_inception, {
        "inception_v3": ("Mixed_7c", 2048, 8)}),
)

#: torchvision classifiers that are not CNNs, and why they are refused.
NOT_CNN = {
    "vit_": "a Vision Transformer: its last layers attend over patch tokens, there is no "
            "convolutional stage whose output is A (K x P x Q)",
    "swin_": "a Swin Transformer: its stages are windowed self-attention blocks, not "
             "convolutions",
    "maxvit_": "MaxViT: its last stage is attention blocks, not a convolutional stage",
}
_CNN_ONLY = ("; the methods here explain a CNN's last convolutional feature maps. Use a CNN "
             "(python -m harness ls lists them)")


def _torchvision_builder(name: str) -> Callable:
    """``models.<name>`` without the init-scheme FutureWarning of GoogLeNet/Inception-v3."""
    fn = getattr(models, name)

    def build(weights=None, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message="The default weight initialization")
            return fn(weights=weights, **kwargs)

    build.__name__ = name
    return build


def torchvision_model(builder: str, weights=None, seed: int = 0,
                      num_classes: int | None = None) -> tuple[nn.Module, str]:
    """The unsplit torchvision model and its weights id (weights as in ``build_torchvision``)."""
    enum_name = models.get_model_weights(builder).__name__
    return build_torchvision(_torchvision_builder(builder), enum_name, weights, seed,
                             num_classes)


def family_backbone(family: Family, builder: str, weights, seed: int = 0,
                    num_classes: int | None = None) -> SplitBackbone:
    """Build ``builder`` of ``family`` (weights as in ``build_torchvision``) and split it."""
    enum_name = models.get_model_weights(builder).__name__
    model, wid = torchvision_model(builder, weights, seed, num_classes)
    body, tail = family.split(model)
    pre = weights_preprocessing(enum_name, weights)
    mean, std = pre.mean, pre.std
    if getattr(model, "transform_input", False):          # GoogLeNet/Inception-v3 weights
        mean = std = (0.5, 0.5, 0.5)
    layer, k, _ = family.members[builder]
    return SplitBackbone(name=builder, body=body, tail=tail, feature_layer=layer,
                         feature_channels=k, num_classes=last_layer_outputs(model),
                         weights_id=wid, input_size=pre.crop, mean=mean, std=std)


def _register(family: Family, builder: str) -> None:
    enum = models.get_model_weights(builder)
    default = default_weights_name(enum)
    layer, k, p = family.members[builder]

    def factory(weights=default, seed: int = 0, num_classes: int | None = None) -> SplitBackbone:
        return family_backbone(family, builder, weights, seed, num_classes)

    factory.__name__ = builder
    REGISTRY.register(builder, paper=family.paper, family=family.name, feature_layer=layer,
                      feature_shape=(k, p, p), head=family.head,
                      input_size=weights_preprocessing(enum.__name__).crop,
                      weights_enum=enum.__name__, default_weights=default,
                      preprocessing="weights")(factory)


def _register_all() -> None:
    for family in FAMILIES:
        for builder in family.members:
            _register(family, builder)
    for name in models.list_models(module=models):
        reason = next((r for prefix, r in NOT_CNN.items() if name.startswith(prefix)), None)
        if reason:
            REGISTRY.refuse(name, f"torchvision's {name} is {reason}{_CNN_ONLY}")


_register_all()
