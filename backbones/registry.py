"""The backbone registry and the weights resolution shared by its entries."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from harness.registry import Registry, did_you_mean

REGISTRY = Registry("backbone")


class WeightsError(ValueError):
    """Weights that cannot be resolved (unknown name, missing file, wrong shapes)."""


def _weights_names(enum_name: str) -> list[str]:
    from torchvision import models
    enum = getattr(models, enum_name)
    return [w.name for w in enum]


def describe_weights(weights) -> str:
    """A stable id for the weights argument (used in provenance)."""
    if weights is None:
        return "random-init"
    return str(weights)


def build_torchvision(builder, enum_name: str, weights, seed: int) -> tuple[nn.Module, str]:
    """Instantiate a torchvision model with ``weights`` resolved as documented in ``load``."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(weights=None), "random-init"
    text = str(weights)
    looks_like_path = os.sep in text or text.endswith((".pth", ".pt", ".bin")) or Path(text).exists()
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights: file {text!r} does not exist. Give a torchvision "
                               "weights name such as 'IMAGENET1K_V1' or an existing state_dict file.")
        model = builder(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsError(f"weights: {text!r} is not a {builder.__name__} state_dict: "
                               f"{str(err).splitlines()[0]}") from None
        return model, f"file:{path.name}"
    names = _weights_names(enum_name)
    if text == "DEFAULT":
        raise WeightsError(f"weights: 'DEFAULT' is refused because it changes meaning between "
                           f"torchvision releases (for ResNet-50 it is V2). Name the weights: "
                           f"{', '.join(names)}.")
    if text not in names:
        raise WeightsError(f"weights: unknown {enum_name} {text!r}.{did_you_mean(text, names)} "
                           f"Available: {', '.join(names)}, a state_dict file path, or null "
                           "for random init.")
    from torchvision import models
    enum_member = getattr(getattr(models, enum_name), text)
    try:
        model = builder(weights=enum_member)
    except Exception as err:  # offline machines cannot download
        raise WeightsError(f"weights: could not load {enum_name}.{text} ({err}). Download "
                           "it once into the torch hub cache (TORCH_HOME) or pass a "
                           "state_dict file path.") from None
    return model, f"{enum_name}.{text}"
