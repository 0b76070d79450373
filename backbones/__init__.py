"""Backbone registry: frozen classifiers split into ``features`` (A) and ``head`` (logits).

    bb = backbones.load("resnet50", weights="IMAGENET1K_V1")   # or a state_dict path, or None
    A = bb.features(x)        # x in [0, 1], (B, 3, H, W) -> (B, K, P, Q)
    logits = bb.head(A)       # == bb(x)

Entries: ``vgg16`` (14x14x512), ``vgg16_7x7`` (7x7x512), ``resnet50`` (7x7x2048) and the
small embedded networks trained offline by the harness on its quickstart data.
"""
from __future__ import annotations

from .base import SplitBackbone
from .registry import REGISTRY, WeightsError, describe_weights
from . import torchvision_models  # noqa: F401  (registers the torchvision entries)
from . import embedded  # noqa: F401  (registers tiny_vgg and tiny_resnet)

_DEFAULT = object()


def load(name: str, weights=_DEFAULT, **kwargs) -> SplitBackbone:
    """Build the registered backbone ``name``, frozen and in eval mode.

    ``weights``: a torchvision weights name (default ``IMAGENET1K_V1`` for torchvision
    entries), a path to a state_dict file, or ``None`` for random init (tests).
    """
    entry = REGISTRY.get(name)
    if weights is _DEFAULT:
        return entry.factory(**kwargs)
    return entry.factory(weights=weights, **kwargs)


def names() -> list[str]:
    return REGISTRY.names()


__all__ = ["SplitBackbone", "REGISTRY", "WeightsError", "load", "names", "describe_weights"]
