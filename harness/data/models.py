"""Loading a registered backbone the way the harness does: weights names resolved to files.

``backbones.load`` builds a model from a torchvision weights name, a state_dict file or None
(random init). The embedded backbones' default weights, ``embedded``, are not a file until
the harness has trained them on the quickstart data (``harness.data.embedded``): this module
resolves that name (training on first use, under a lock, into the cache) and is what every
part of the harness calls, on the driver and in Ray workers alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import backbones
from backbones.base import SplitBackbone

EMBEDDED = "embedded"
_DEFAULT: Any = object()


def default_weights(name: str) -> str | None:
    """The registry entry's default weights name (``IMAGENET1K_V1``, ``embedded``, ...)."""
    meta = backbones.REGISTRY.get(name).meta
    return meta.get("default_weights", "IMAGENET1K_V1" if meta.get("weights_enum") else None)


def resolve_weights(name: str, weights: Any = _DEFAULT, progress=None) -> Any:
    """``weights`` as ``backbones.load`` takes it: ``embedded`` becomes the cached file."""
    if weights is _DEFAULT:
        weights = default_weights(name)
    if weights == EMBEDDED:
        from harness.data.embedded import ensure_embedded_weights
        path, _ = ensure_embedded_weights(name, progress)
        return str(path)
    return weights


def load_backbone(name: str, weights: Any = _DEFAULT, progress=None, **kwargs) -> SplitBackbone:
    """``backbones.load(name, weights)`` after ``resolve_weights`` (frozen, eval mode).

    Weights from a file are identified by their content: ``weights_id`` ends in
    ``@<SHA-256 of the file's bytes>`` (``content_digest``, remembered by path, size and
    time), so a file retrained and saved under the same name gives another id, and every
    head and shard made from the old one is recomputed instead of answered from the cache."""
    resolved = resolve_weights(name, weights, progress)
    bb = backbones.load(name, weights=resolved, **kwargs)
    if isinstance(resolved, (str, Path)) and Path(str(resolved)).expanduser().is_file():
        from harness.data.cache import content_digest
        bb.weights_id = f"{bb.weights_id}@{content_digest(resolved)}"
    return bb
