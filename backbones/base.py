"""The split-backbone contract that every explanation method relies on.

A ``SplitBackbone`` wraps a frozen, eval-mode classifier as two parts:

    features(x) -> A   (B, K, P, Q), the last convolutional feature maps
    head(A)     -> logits (B, R)
    forward(x)  == head(features(x))

``x`` is an image batch in [0, 1] pixel space; the backbone applies its own
mean/std normalisation inside (``normalize``), so that masking by methods and
metrics always happens in pixel space (removed pixels are black). Methods that
mask the *normalised* input (RISE's own code, the L-CAM authors' Score-CAM) call
``forward_normalized`` / ``features_normalized``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a backbone: the shorter side resized to ``resize`` (None:
    the data layer's rule, 256/224 of the crop) with ``interpolation``, then a center crop of
    ``crop``; ``mean``/``std`` are the weights' own (the backbone normalises inside)."""

    crop: tuple[int, int]
    resize: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


class SplitBackbone(nn.Module):
    """A frozen classifier split at its last convolutional feature maps.

    Attributes: ``name`` (registry key), ``weights_id`` (what was loaded),
    ``feature_layer`` (where A is taken, in torchvision's module names),
    ``feature_channels`` (K), ``num_classes`` (R), ``input_size`` (H, W the
    backbone was trained at), ``class_names`` (optional list).
    """

    def __init__(self, *, name: str, body: nn.Module, tail: nn.Module, feature_layer: str,
                 feature_channels: int, num_classes: int, weights_id: str,
                 input_size: tuple[int, int] = (224, 224), mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, class_names: list[str] | None = None):
        super().__init__()
        self.name = name
        self.body = body
        self.tail = tail
        self.feature_layer = feature_layer
        self.feature_channels = int(feature_channels)
        self.num_classes = int(num_classes)
        self.weights_id = weights_id
        self.input_size = tuple(input_size)
        self.class_names = class_names
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    # The backbone is frozen: it stays in eval mode whatever the caller asks.
    def train(self, mode: bool = True) -> "SplitBackbone":
        return super().train(False)

    @property
    def first_layer(self) -> nn.Module:
        """The first module that sees every image (used to count forward passes)."""
        for m in self.body.modules():
            if not list(m.children()):
                return m
        return self.body

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    #: set on a view made by ``with_autocast``: the passes run in this dtype
    autocast_dtype: torch.dtype | None = None

    def with_autocast(self, dtype: torch.dtype) -> "SplitBackbone":
        """A view of this backbone (the same modules and buffers) whose forward passes run
        under ``torch.autocast(dtype)`` and return float32: an explainer given the view
        computes only the backbone in reduced precision, its own arithmetic (gradients,
        powers, sums of thousands of terms) in float32."""
        view = copy.copy(self)              # shares _modules and _buffers with ``self``
        view.autocast_dtype = dtype
        return view

    def _pass(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return fn(x)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            out = fn(x)
        return out.float()

    def features_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self._pass(self.body, z)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._pass(self.body, self.normalize(x))

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self._pass(self.tail, a)

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self._pass(lambda v: self.tail(self.body(v)), z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pass(lambda v: self.tail(self.body(v)), self.normalize(x))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, weights={self.weights_id!r}, A={self.feature_layer} "
                f"(K={self.feature_channels}), classes={self.num_classes}")
