"""Explanation-method registry: Grad-CAM, Grad-CAM++, Score-CAM, RISE, L-CAM-Fm, L-CAM-Img.

    ex = methods.create("scorecam", backbone, variant="paper", batch_size=64)
    maps = ex.explain(images)             # (B, H, W) in [0, 1]; targets default to top-1
    ex.forward_passes                     # nominal #FW per explanation (docs/protocol.md section 2)

Every method has a ``variant``: ``paper`` (its own paper, the default), ``reference`` (what
the L-CAM authors ran) and, for Score-CAM, ``channel_softmax`` (the popular libraries' form).

Other packages add methods as plugins: an ``Explainer`` subclass declared as an entry point
of the group ``lcam_bench.methods``, or named in a spec as ``package.module:Class``
(``methods.plugins`` says what is checked; docs/plugins.md shows one in 40 lines).
``names()`` lists the built-in methods, ``REGISTRY.plugin_names()`` the installed plugins;
``create`` and ``method_class`` take either.
"""
from __future__ import annotations

from typing import Any

from .base import Explainer, ExplainerInputError, minmax
from .registry import REGISTRY
from . import gradcam, gradcampp, scorecam, rise, lcam  # noqa: F401  (registration)


def create(name: str, backbone, **params: Any) -> Explainer:
    """Instantiate the registered method ``name`` on ``backbone`` with its parameters."""
    return REGISTRY.get(name).factory(backbone, **params)


def names() -> list[str]:
    """The built-in methods (installed plugins: ``REGISTRY.plugin_names()``)."""
    return REGISTRY.names()


def method_class(name: str) -> type[Explainer]:
    return REGISTRY.get(name).factory


__all__ = ["Explainer", "ExplainerInputError", "REGISTRY", "create", "names", "method_class",
           "minmax"]
