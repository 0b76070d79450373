"""Registries: the generic name -> entry registry, and the backbone registry with its weights.

``Registry`` is a small generic registry with "did you mean" errors; two instances exist,
``backbones.REGISTRY`` (here) and ``methods.REGISTRY``. An entry is registered with a
decorator; its registered name is its public, MLflow-safe key (letters, digits, ``_ - . /``).
Duplicate names are errors, and an unknown name is answered with the closest names and the
full list. It lives in ``backbones``, the bottom package (``methods`` builds on backbones,
``harness`` on both), so that no package imports upwards.

Names resolve here and nowhere else, in this order: an entry registered in code (built in),
a plugin (an entry point of the registry's group, e.g. ``lcam_bench.methods``), or a class
reference ``package.module:Name`` (``backbones.plugins``: imported, never evaluated; checked by
the registry's ``adopt`` function before it is used). Each entry records its ``origin``
('built-in', or the distribution that provides it). ``names()`` lists the built-in entries
only (what tests and the README enumerate); ``plugin_names()`` the installed entry points. A
name can also be *refused* with a reason (``refuse``: a torchvision ViT is no CNN).
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


class UnusableNameError(UnknownNameError):
    """A known name that cannot be used: a broken plugin, or a refused model (the message
    says why and what to do)."""


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


BUILT_IN = "built-in"


@dataclass(frozen=True)
class Entry:
    """One registered object: its key, the factory, its metadata and where it comes from
    (``origin``: 'built-in', or the plugin's distribution)."""

    name: str
    factory: Callable[..., Any]
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = BUILT_IN


class Registry:
    """Maps public names to factories with metadata (e.g. family, paper, version).

    ``plugin_group``: the entry-point group whose plugins (and class references) this
    registry resolves; ``adopt(name, obj, source) -> Entry`` checks such an object and raises
    ``backbones.plugins.PluginError`` when it cannot be used (no group: built-ins only).
    """

    def __init__(self, kind: str, plugin_group: str | None = None,
                 adopt: Callable[[str, Any, Any], Entry] | None = None):
        self.kind = kind
        self.plugin_group = plugin_group
        self._adopt = adopt
        self._entries: dict[str, Entry] = {}
        self._plugins: dict[str, Entry | UnusableNameError] = {}   # resolved once per process
        self._refused: dict[str, str] = {}
        self._deferred: list[Callable[[], Any]] = []
        self._prefixes: dict[str, Callable[[str, str], Entry]] = {}

    def defer(self, load: Callable[[], Any]) -> None:
        """Register more entries only when they are first looked for: ``load()`` (an import
        that registers them) runs on the first miss or listing, once. Torchvision's entries
        are deferred so that what needs only the embedded ones (``validate`` of the smoke
        spec) does not import torchvision (6 s here, through ``torch._dynamo``)."""
        self._deferred.append(load)

    def _complete(self) -> dict[str, Entry]:
        while self._deferred:
            self._deferred.pop(0)()
        return self._entries

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

    def add_prefix(self, prefix: str, resolve: Callable[[str, str], Entry]) -> None:
        """Answer ``<prefix>:<rest>`` with ``resolve(name, rest)``: another library's objects
        adapted by name (``pgc:LayerCAM``), before class references (which look alike). It
        raises ``UnusableNameError`` (with the choices or the install) when it cannot."""
        self._prefixes[prefix] = resolve

    def prefixes(self) -> list[str]:
        return sorted(self._prefixes)

    def refuse(self, name: str, reason: str) -> None:
        """Answer ``name`` with ``reason`` (a known model this registry cannot hold)."""
        self._refused[name] = reason

    def get(self, name: str) -> Entry:
        """The entry of ``name``: built in, else a plugin or class reference (imported and
        checked on first use). ``UnknownNameError`` (with close names) when nothing matches,
        ``UnusableNameError`` when it matches something that cannot be used."""
        if not isinstance(name, str):
            raise UnknownNameError(self.unknown_message(name))
        if name in self._entries:
            return self._entries[name]
        if name in self._complete():
            return self._entries[name]
        if name in self._refused:
            raise UnusableNameError(f"{self.kind} {name!r} is refused: {self._refused[name]}")
        found = self._plugins.get(name)
        prefix, _, rest = name.partition(":")
        if found is None and rest and prefix in self._prefixes:
            try:
                found = self._prefixes[prefix](name, rest)
            except UnusableNameError as err:
                found = err
            self._plugins[name] = found
        if found is None and self._adopt is not None:
            found = self._resolve(name)
            if found is not None:           # a miss is not kept: a plugin may be installed
                self._plugins[name] = found
        if isinstance(found, UnusableNameError):       # kept: refused the same way each time
            raise type(found)(str(found))
        if found is None:
            raise UnknownNameError(self.unknown_message(name))
        return found

    def _resolve(self, name: str) -> Entry | UnusableNameError | None:
        from backbones import plugins
        try:
            source = plugins.find(name, self.plugin_group)
            if source is None:
                return None
            obj = plugins.load(source)
            self._entries.pop(name, None)     # a plugin that registered itself on import
            return self._adopt(name, obj, source)
        except UnusableNameError as err:
            return err

    def unknown_message(self, name: Any) -> str:
        names = self.names()
        extra = [n for n in self.plugin_names() if n not in names]
        more = f"; plugins: {', '.join(extra)}" if extra else ""
        return (f"unknown {self.kind} {name!r}.{did_you_mean(str(name), names + extra)}"
                f" Available: {', '.join(names)}{more}")

    def names(self) -> list[str]:
        """The built-in entries (plugins: ``plugin_names``)."""
        return sorted(self._complete())

    def plugin_names(self) -> list[str]:
        """The installed plugins of this registry's entry-point group (not imported)."""
        if self.plugin_group is None:
            return []
        from backbones import plugins
        return sorted(set(plugins.entry_points(self.plugin_group)) - set(self._complete()))

    def refused(self) -> dict[str, str]:
        self._complete()
        return dict(self._refused)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._complete() or name in self.plugin_names()

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[k] for k in self.names())

    def __len__(self) -> int:
        return len(self._complete())


# -- the backbone registry and the weights resolution shared by its entries ----------

def _adopt_backbone(name: str, factory: Any, source: Any) -> Entry:
    from backbones.plugins import adopt_backbone
    return adopt_backbone(name, factory, source)


REGISTRY = Registry("backbone", plugin_group="lcam_bench.backbones", adopt=_adopt_backbone)


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


def last_layer_outputs(model: nn.Module) -> int:
    """The number of outputs of a classifier: those of its last Linear (or 1x1 class conv,
    SqueezeNet's) layer, in the order the model registers its modules."""
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return int(last.out_features if isinstance(last, nn.Linear) else last.out_channels)


def classes_in_state(state: dict, model: nn.Module) -> int | None:
    """The number of classes a state_dict was trained for, when it differs from ``model``'s:
    the first dimension of the tensors whose shapes differ from the model's only there
    (the classifier's weight and bias, an auxiliary classifier's). None when the shapes
    agree (or differ elsewhere: then ``load_state_dict`` says where)."""
    own = model.state_dict()
    outputs = {int(v.shape[0]) for k, v in state.items()
               if k in own and hasattr(v, "shape") and v.dim() >= 1
               and tuple(v.shape) != tuple(own[k].shape)
               and tuple(v.shape[1:]) == tuple(own[k].shape[1:])}
    return outputs.pop() if len(outputs) == 1 else None


def _read_state(path: Path, text: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:            # not a torch file, truncated, pickled objects
        raise WeightsError(f"weights: {text!r} is not a readable state_dict file "
                           f"({type(err).__name__}: {str(err).strip()[:400]}). Save it with "
                           "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights: {text!r} holds a {type(state).__name__}, not a state_dict "
                           "(a mapping of parameter names to tensors). Save it with "
                           "torch.save(model.state_dict(), path)")
    return state


def load_into(model: nn.Module, state: dict, text: str, arch: str) -> None:
    """``model.load_state_dict(state)``, or ``WeightsError`` naming the file ``text``: one of
    another architecture (no parameter name in common: the names it has), or what differs."""
    own = model.state_dict()
    if not set(own) & set(state):
        keys = ", ".join(repr(k) for k in list(state)[:5]) or "none"
        raise WeightsError(f"weights: {text!r} holds no {arch} parameters (its keys: {keys}"
                           f"{', ...' if len(state) > 5 else ''}): the weights of another "
                           "model, or not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsError(f"weights: {text!r} is not a {arch} state_dict: "
                           f"{str(err).strip()[:1500]}") from None


def build_torchvision(builder, enum_name: str, weights, seed: int,
                      num_classes: int | None = None) -> tuple[nn.Module, str]:
    """Instantiate a torchvision model with ``weights`` resolved as documented in ``load``.

    A state_dict file may be of a model fine-tuned on other classes: its number of classes
    is read from the file (``classes_in_state``), or given (``num_classes``), and the model is
    built with that many outputs."""
    kwargs = {"num_classes": int(num_classes)} if num_classes else {}
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(weights=None, **kwargs), "random-init"
    text = str(weights)
    looks_like_path = os.sep in text or text.endswith((".pth", ".pt", ".bin")) or Path(text).exists()
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights: file {text!r} does not exist. Give a torchvision "
                               "weights name such as 'IMAGENET1K_V1' or an existing state_dict file.")
        state = _read_state(path, text)
        model = builder(weights=None, **kwargs)
        found = None if kwargs else classes_in_state(state, model)
        if found is not None:
            model = builder(weights=None, num_classes=found)
        load_into(model, state, text, builder.__name__)
        return model, f"file:{path.name}"
    if kwargs:
        raise WeightsError(f"weights: {text!r} are ImageNet's 1000-class weights; "
                           f"num_classes: {num_classes} needs a state_dict file of that many "
                           "classes (or weights: null for random init)")
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
