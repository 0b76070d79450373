"""Method plugins: the checks an ``Explainer`` subclass from another package must pass.

A plugin method is an entry point of the group ``lcam_bench.methods`` (its name = the class's
``name``) or a class reference ``package.module:Class`` in a spec (``backbones.plugins``
finds and imports it). ``adopt_method`` checks the class before the registry hands it out;
``declaration_problems`` is the list of what is wrong with a class's declarations (also run
on the built-in methods by the tests, and by ``harness.testing.check_explainer``):

- a subclass of ``methods.base.Explainer`` that overrides ``_saliency``;
- ``name`` MLflow-safe (letters, digits, ``_ - . /``), ``display_name`` and ``paper`` given,
  ``family`` one of gradient | perturbation | learned, ``variants`` a non-empty tuple of
  names (the first is the default), ``version`` an int >= 1;
- ``params``: a mapping of identifiers to ``methods.params.Param`` of type int, float, bool
  or str (or a tuple of them), each with a help text and a default its own declaration
  accepts (``param_problem``);
- ``planned_forward_passes(defaults, backbone metadata)`` an int >= 1.

Plugins may not be *learned* methods: the harness's head training is L-CAM's own.
"""
from __future__ import annotations

import re
from typing import Any

from backbones.plugins import PluginError, Source
from backbones.registry import Entry

from .base import Explainer
from .params import Param, param_problem

SAFE = re.compile(r"^[A-Za-z0-9_.\-/]+$")
FAMILIES = ("gradient", "perturbation", "learned")
PARAM_TYPES = (int, float, bool, str)
PROBE_BACKBONE = {"name": "plugin-check", "feature_shape": (8, 4, 4)}


def _attribute_problems(cls: type) -> list[str]:
    problems = []
    if not isinstance(cls.name, str) or not SAFE.match(cls.name) or cls.name == "base":
        problems.append(f"name: {cls.name!r} must be set to an MLflow-safe key (letters, "
                        "digits, '_ - . /')")
    for attr in ("display_name", "paper"):
        if not isinstance(getattr(cls, attr), str) or not getattr(cls, attr).strip():
            problems.append(f"{attr}: must be a non-empty string")
    if cls.family not in FAMILIES:
        problems.append(f"family: {cls.family!r} is not one of {', '.join(FAMILIES)}")
    variants = cls.variants
    if (not isinstance(variants, tuple) or not variants
            or not all(isinstance(v, str) and SAFE.match(v) for v in variants)):
        problems.append(f"variants: {variants!r} must be a non-empty tuple of names (the "
                        "first is the default)")
    if isinstance(cls.version, bool) or not isinstance(cls.version, int) or cls.version < 1:
        problems.append(f"version: {cls.version!r} must be an int >= 1")
    if cls._saliency is Explainer._saliency:
        problems.append("_saliency: not overridden (it computes the maps)")
    return problems


def param_declaration_problems(key: Any, param: Any) -> list[str]:
    """What is wrong with one ``params`` entry ([] when nothing)."""
    if not isinstance(key, str) or not key.isidentifier() or key == "variant":
        return [f"params: {key!r} is not a usable parameter name (an identifier, not "
                "'variant')"]
    if not isinstance(param, Param):
        return [f"params.{key}: {type(param).__name__} is not a methods.params.Param"]
    where, problems = f"params.{key}", []
    if not param.types or not all(t in PARAM_TYPES for t in param.types):
        problems.append(f"{where}: type {param.type!r} must be int, float, bool or str (or "
                        "a tuple of them)")
    if not param.help:
        problems.append(f"{where}: no help text")
    if not isinstance(param.choices, tuple):
        problems.append(f"{where}: choices must be a tuple")
    if any(isinstance(b, bool) or not isinstance(b, (int, float))
           for b in param.bounds.values()):
        problems.append(f"{where}: bounds (ge, gt, le, lt) must be numbers")
    if not problems:
        default_problem = param_problem(key, param, param.default)
        if default_problem:
            problems.append(f"{where}: its default {param.default!r} is refused by its own "
                            f"declaration ({default_problem})")
    return problems


def _forward_passes_problems(cls: type) -> list[str]:
    defaults = {k: p.default for k, p in cls.params.items()}
    try:
        n = cls.planned_forward_passes(defaults, dict(PROBE_BACKBONE))
    except Exception as err:
        return [f"planned_forward_passes: raised {type(err).__name__}: {err}"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return [f"planned_forward_passes: returned {n!r}, expected an int >= 1"]
    return []


def declaration_problems(cls: Any) -> list[str]:
    """Everything wrong with the declarations of the method class ``cls`` ([] = usable)."""
    if not isinstance(cls, type) or not issubclass(cls, Explainer) or cls is Explainer:
        return [f"{cls!r} is not a subclass of methods.base.Explainer"]
    problems = _attribute_problems(cls)
    if not isinstance(cls.params, dict):
        return problems + [f"params: {type(cls.params).__name__} must be a dict of Param"]
    for key, param in cls.params.items():
        problems += param_declaration_problems(key, param)
    if not problems:
        problems += _forward_passes_problems(cls)
    return problems


def adopt_method(name: str, cls: Any, source: Source) -> Entry:
    """Check a plugin method class (see the module docstring); its registry entry."""
    where = source.describe()
    problems = declaration_problems(cls)
    if problems:
        raise PluginError(f"{where}: " + "; ".join(problems)
                          + ". Fix the class's declarations and reinstall the plugin")
    if cls.family == "learned":
        raise PluginError(f"{where}: learned plugin methods are not supported (the harness "
                          "trains L-CAM heads only); declare family gradient or perturbation")
    if source.via != "class reference" and cls.name != name:
        raise PluginError(f"{where}: the entry point's name '{name}' differs from the class's "
                          f"name '{cls.name}'; make them equal")
    meta = {"display_name": cls.display_name, "family": cls.family, "paper": cls.paper}
    return Entry(name, cls, meta, origin=source.origin)
