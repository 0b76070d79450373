"""Backbone registry: frozen classifiers split into ``features`` (A) and ``head`` (logits).

    bb = backbones.load("resnet50", weights="IMAGENET1K_V1")   # or a state_dict path, or None
    A = bb.features(x)        # x in [0, 1], (B, 3, H, W) -> (B, K, P, Q)
    logits = bb.head(A)       # == bb(x)

Entries: the paper's ``vgg16`` (14x14x512), ``vgg16_7x7`` (7x7x512), ``resnet50``
(7x7x2048); every other torchvision classification CNN by its builder name (``resnet18``,
``densenet121``, ``efficientnet_b0``, ... ``backbones.torchvision_models.FAMILIES`` says
where A is taken); the small embedded networks trained offline by the harness on its
quickstart data; and plugins: entry points of the group ``lcam_bench.backbones`` or a
factory named ``package.module:factory`` (``backbones.plugins``).
"""
from __future__ import annotations

import importlib

from .base import Preprocessing, SplitBackbone
from .registry import REGISTRY, UnusableNameError, WeightsError, describe_weights
from . import embedded  # noqa: F401  (registers tiny_vgg and tiny_resnet)

# the torchvision entries register when a name is first looked for beyond the embedded ones
REGISTRY.defer(lambda: importlib.import_module("backbones.torchvision_models"))

_DEFAULT = object()


def load(name: str, weights=_DEFAULT, **kwargs) -> SplitBackbone:
    """Build the registered backbone ``name``, frozen and in eval mode.

    ``weights``: a torchvision weights name (default ``IMAGENET1K_V1`` for torchvision
    entries), a path to a state_dict file, or ``None`` for random init (tests).
    """
    entry = REGISTRY.get(name)
    bb = entry.factory(**kwargs) if weights is _DEFAULT else entry.factory(weights=weights,
                                                                           **kwargs)
    if not isinstance(bb, SplitBackbone):
        raise UnusableNameError(f"backbone {name!r} ({entry.origin}) returned a "
                                f"{type(bb).__name__}, not a backbones.base.SplitBackbone")
    return bb


def preprocessing(name: str, weights=_DEFAULT) -> Preprocessing:
    """How images are prepared for backbone ``name`` with ``weights`` (default: its own):
    the weights' own transforms for the torchvision families, else the data layer's rule
    at the entry's input size (``Preprocessing.resize`` None)."""
    meta = REGISTRY.get(name).meta
    if meta.get("preprocessing") == "weights":
        from .torchvision_models import weights_preprocessing
        return weights_preprocessing(meta["weights_enum"],
                                     meta["default_weights"] if weights is _DEFAULT else weights)
    return Preprocessing(crop=tuple(meta.get("input_size", (224, 224))))


def names() -> list[str]:
    """The built-in entries (installed plugins: ``REGISTRY.plugin_names()``)."""
    return REGISTRY.names()


__all__ = ["SplitBackbone", "REGISTRY", "WeightsError", "UnusableNameError", "Preprocessing",
           "load", "names", "describe_weights", "preprocessing"]
