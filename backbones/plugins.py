"""Plugins: methods and backbones from other installed packages, by the Python convention.

A distribution declares entry points in its ``pyproject.toml``::

    [project.entry-points."lcam_bench.methods"]
    xgradcam = "lcam_xgradcam.method:XGradCAM"        # an Explainer subclass
    [project.entry-points."lcam_bench.backbones"]
    my_net = "my_pkg.nets:my_net"                      # a factory returning a SplitBackbone

and a spec may also name an object directly by a *class reference*,
``name: my_pkg.my_module:MyExplainer``. Either way only installed, importable code runs:
the module is imported by its dotted name (``importlib.import_module``), nothing is
evaluated and no file path is executed. The registries (``backbones.registry.Registry``) call
``find`` and ``load`` on the first use of a name they do not hold, then their ``adopt``
function checks the object (methods: ``methods.plugins.adopt_method``; backbones:
``adopt_backbone`` below). Whatever fails (the import, the base class, the declarations)
raises ``PluginError`` naming the distribution and the fix: ``validate`` and ``run`` report it
at the entry's ``name`` (exit 2) before anything starts.

A backbone plugin is a callable ``factory(weights=..., [seed=...]) -> SplitBackbone``; its
metadata (A's layer and shape, input size) is read from one random-init instance
(``weights=None``) when the name is first resolved. Optional attributes on the factory:
``paper`` (a reference) and ``weights_names`` (the weights names a spec may give); the default
weights are the factory's own default for ``weights``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .registry import Entry, UnusableNameError

#: ``package.module:Name`` (dotted identifiers on both sides; no paths, no expressions).
REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PluginError(UnusableNameError):
    """A plugin (entry point or class reference) that cannot be used; the message names the
    distribution, what is wrong and the fix."""


@dataclass(frozen=True)
class Source:
    """Where a plugin object comes from: ``value`` ('module:attr'), its distribution ('name
    version', or None when the module is not from an installed distribution) and how it was
    named ('entry point <group>' or 'class reference')."""

    name: str
    value: str
    distribution: str | None
    via: str

    @property
    def module(self) -> str:
        return self.value.partition(":")[0]

    @property
    def origin(self) -> str:
        """What ``harness ls`` shows: the distribution and how it was named."""
        where = self.distribution or f"module {self.module}"
        return f"{where} ({self.via})"

    def describe(self) -> str:
        """The words every problem with this plugin starts with."""
        dist = (f"distribution '{self.distribution}'" if self.distribution
                else f"module '{self.module}' (not from an installed distribution)")
        if self.via == "class reference":
            return f"class reference '{self.value}' ({dist})"
        return f"plugin '{self.name}' ({dist}, {self.via}: {self.name} = {self.value})"


def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The installed entry points of ``group``, by name (read, not imported)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def _distribution_text(dist) -> str | None:
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"


def _distribution_of_module(module: str) -> str | None:
    """The installed distribution that provides the top-level package of ``module``."""
    names = importlib.metadata.packages_distributions().get(module.split(".")[0], [])
    for name in names:
        try:
            return _distribution_text(importlib.metadata.distribution(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _duplicates(group: str, name: str) -> list[str]:
    dists = {_distribution_text(ep.dist) or ep.value
             for ep in importlib.metadata.entry_points(group=group) if ep.name == name}
    return sorted(dists)


def find(name: str, group: str | None) -> Source | None:
    """The plugin ``name`` stands for (an entry point of ``group`` or a class reference), or
    None when it is neither."""
    if group:
        ep = entry_points(group).get(name)
        if ep is not None:
            dists = _duplicates(group, name)
            if len(dists) > 1:
                raise PluginError(f"plugin '{name}' is declared by {len(dists)} distributions "
                                  f"({', '.join(dists)}, entry point group {group}); "
                                  "uninstall all but one")
            return Source(name, ep.value, _distribution_text(ep.dist), f"entry point {group}")
    if REFERENCE.match(name):
        return Source(name, name, _distribution_of_module(name), "class reference")
    if ":" in name:
        raise PluginError(f"'{name}' is not a class reference: write 'package.module:Name', "
                          "an importable module and an attribute (no file paths)")
    return None


def load(source: Source) -> Any:
    """Import the module of ``source`` and return its attribute; ``PluginError`` if either
    fails."""
    module_name, _, attr = source.value.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:        # the plugin's own import may fail in any way
        raise PluginError(f"{source.describe()} cannot be imported: {type(err).__name__}: "
                          f"{err}. Install it (and what it needs) into the environment that "
                          "runs the harness; on a Ray cluster also into the workers' "
                          "(ray.runtime_env: {pip: [...]} or {py_modules: [...]})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{source.describe()}: module '{module_name}' has no attribute "
                              f"'{attr}'; fix the entry point or the reference") from None
    return obj


# -- backbones -------------------------------------------------------------------------------
def call_factory(factory: Callable, **kwargs: Any):
    """``factory(weights=None[, seed=0])`` with the global RNG left as it was."""
    params = _parameters(factory)
    if "seed" in params:
        kwargs.setdefault("seed", 0)
    with torch.random.fork_rng(devices=[]):
        return factory(**kwargs)


def _parameters(factory: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return {}


def default_weights_of(factory: Callable) -> Any:
    """The factory's own default for ``weights`` (None when it has none)."""
    param = _parameters(factory).get("weights")
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def adopt_backbone(name: str, factory: Any, source: Source) -> Entry:
    """Check a backbone plugin and read its metadata from a random-init instance."""
    from .base import SplitBackbone
    where = source.describe()
    if not callable(factory):
        raise PluginError(f"{where}: {factory!r} is not callable; a backbone plugin is a "
                          "factory returning a backbones.base.SplitBackbone")
    try:
        bb = call_factory(factory, weights=None)
    except Exception as err:
        raise PluginError(f"{where}: calling it with weights=None (random init) failed: "
                          f"{type(err).__name__}: {err}") from None
    if not isinstance(bb, SplitBackbone):
        raise PluginError(f"{where} returned a {type(bb).__name__}, not a "
                          "backbones.base.SplitBackbone: split the classifier into body (-> A) "
                          "and tail (A -> logits) and wrap them in a SplitBackbone")
    with torch.no_grad():
        a = bb.features(torch.rand(1, 3, *bb.input_size, generator=torch.Generator()))
    if a.dim() != 4 or a.shape[1] != bb.feature_channels:
        raise PluginError(f"{where}: features(x) has shape {tuple(a.shape)}, expected (B, K, P, "
                          f"Q) with K = feature_channels = {bb.feature_channels}")
    default = default_weights_of(factory)
    names = tuple(getattr(factory, "weights_names", ()) or
                  ((default,) if isinstance(default, str) else ()))
    meta = {"family": "plugin", "feature_layer": bb.feature_layer,
            "feature_shape": tuple(a.shape[1:]), "input_size": tuple(bb.input_size),
            "paper": str(getattr(factory, "paper", "") or source.value),
            "default_weights": default, "weights_names": names}
    return Entry(name, factory, meta, origin=source.origin)
