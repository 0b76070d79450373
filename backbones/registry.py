"""Registries: the generic name -> entry registry, and the backbone registry with its weights.

``Registry`` is a small generic registry with "did you mean" errors; two instances exist,
``backbones.REGISTRY`` (here) and ``methods.REGISTRY``. An entry is registered with a
decorator; its registered name is its public, MLflow-safe key (letters, digits, ``_ - . /``).
Duplicate names are errors, and an unknown name is answered with the closest names and the
full list. It lives in ``backbones``, the bottom package (``methods`` builds on backbones,
``harness`` on both), so that no package imports upwards.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists close matches and all names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    low = {c.lower().replace("-", "").replace("_", ""): c for c in choices}
    key = str(name).lower().replace("-", "").replace("_", "")
    if key in low:
        return f" Did you mean '{low[key]}'?"
    close = difflib.get_close_matches(str(name), list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


@dataclass(frozen=True)
class Entry:
    """One registered object: its key, the factory, and its metadata."""

    name: str
    factory: Callable[..., Any]
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Maps public names to factories with metadata (e.g. family, paper, version)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable:
        def decorate(factory: Callable) -> Callable:
            key = name or factory.__name__
            if not _SAFE_KEY.match(key):
                raise ValueError(f"{self.kind} name {key!r} is not MLflow-safe")
            if key in self._entries:
                raise ValueError(f"duplicate {self.kind} name {key!r}")
            self._entries[key] = Entry(key, factory, dict(meta))
            return factory

        return decorate

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        names = self.names()
        return (f"unknown {self.kind} {name!r}.{did_you_mean(str(name), names)}"
                f" Available: {', '.join(names)}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[k] for k in self.names())

    def __len__(self) -> int:
        return len(self._entries)


# -- the backbone registry and the weights resolution shared by its entries ----------

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
