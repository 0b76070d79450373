"""The ``backbones`` and ``methods`` lists: each entry checked against its model and resolved
through the registries (``backbones.REGISTRY``, ``methods.REGISTRY``).

A method entry resolves its variant (default: the class's first), its parameters (the
class's parameter model, ``harness.spec.params``), its id (default: the name; unique), its
display name, and a learned method's checkpoint or train overrides. A backbone entry
resolves its weights (a registry weights name, a state_dict path, or null) and checks its
``methods`` restriction against the method ids. Problems go to the ``Report``.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from harness.spec.params import declared, params_model
from harness.spec.problems import INVALID, Report
from harness.spec.schema import BackboneEntry, MethodEntry, Spec
from harness.spec.sections import TrainSection
from harness.spec.values import describe, did_you_mean


def checked_entries(section: str, items: Any, model, registry,
                    report: Report) -> Iterator[tuple[int, Any, type]]:
    """(index, entry, its registry entry) of every entry of ``items`` that names a
    registered entry; problems are reported (an entry whose other keys had problems is
    still yielded, so that its remaining keys are checked too). A name is resolved by the
    registry: built in, an installed plugin or a class reference (imported and checked
    there); an unknown, refused or broken one is reported at its ``name``."""
    from backbones.registry import UnknownNameError
    if items is None:
        report.add((section,), Spec.messages[(section, "missing")])
        return
    if not isinstance(items, list) or not items:
        report.add((section,), f"expected a non-empty list, got {describe(items)}")
        return
    for i, item in enumerate(items):
        entry = report.check(model, item, (section, i), salvage=True)
        if entry is INVALID:
            continue
        try:
            found = registry.REGISTRY.get(entry.name)
        except UnknownNameError as err:          # unknown, refused, or a broken plugin
            report.add((section, i, "name"), str(err))
            continue
        yield i, entry, found


# -- methods ---------------------------------------------------------------------------------
def resolve_methods(items: Any, train: TrainSection, report: Report) -> list[MethodEntry]:
    import methods as registry     # the registries (and torch) only once the YAML parsed
    learned = [n for n in registry.names() if registry.method_class(n).family == "learned"]
    out, seen = [], {}
    for i, entry, reg in checked_entries("methods", items, MethodEntry, registry, report):
        cls, loc = reg.factory, ("methods", i)
        mid = entry.id or cls.name       # a class reference's default id: the class's name
        if mid in seen:
            report.add(loc + (("id",) if entry.id else ("name",)), f"duplicate method id "
                       f"'{mid}' (also methods[{seen[mid]}]); give each entry a distinct 'id'")
        seen.setdefault(mid, i)
        update = {"id": mid, "variant": _variant(entry, cls, loc, report),
                  "params": _params(entry.params, cls, loc + ("params",), report)}
        update.update(_learned_keys(entry, cls, learned, loc, report))
        if entry.display_name is None:
            ce_only = cls.family == "learned" and train.merged(update["train"]).ce_only
            update["display_name"] = cls.display_name + ("*" if ce_only else "")
        out.append(entry.model_copy(update=update))
    return out


def _variant(entry: MethodEntry, cls, loc: tuple, report: Report) -> str:
    if entry.variant is None:
        return cls.variants[0]
    if entry.variant not in cls.variants:
        report.add(loc + ("variant",), f"'{entry.variant}' is not a variant of {cls.name}."
                   f"{did_you_mean(entry.variant, cls.variants)} Available: "
                   f"{', '.join(cls.variants)}")
    return entry.variant


def _params(raw: dict, cls, loc: tuple, report: Report) -> dict[str, Any]:
    """The parameters, declared defaults filled in; keys that are not parameters reported."""
    accepted, given = declared(cls), dict(raw)
    for key in list(given):
        if key == "variant" or (key == "checkpoint" and cls.family == "learned"):
            report.add(loc + (key,), f"{key} is a method-level key: write it beside 'name', "
                       "not in params")
        elif not accepted and isinstance(key, str):
            report.add(loc + (key,), f"{cls.name} accepts no params; remove '{key}'")
        else:
            continue
        del given[key]
    params = report.check(params_model(cls), given, loc)
    return {k: p.default for k, p in accepted.items()} if params is INVALID \
        else params.model_dump()


def _learned_keys(entry: MethodEntry, cls, learned: list[str], loc: tuple,
                  report: Report) -> dict[str, Any]:
    """checkpoint and train: learned methods take one of them, other methods neither."""
    if cls.family != "learned":
        for key in ("checkpoint", "train"):
            if getattr(entry, key) not in (None, {}):
                report.add(loc + (key,), f"{cls.name} is a {cls.family} method; only learned "
                           f"methods ({', '.join(learned)}) take '{key}'")
        return {"checkpoint": None, "train": {}}
    if entry.checkpoint is None:
        return {"train": entry.train}
    if "train" in entry.model_fields_set and entry.train:
        report.add(loc + ("train",), "conflicts with checkpoint: a checkpoint skips training; "
                   "remove one of them")
    return {"checkpoint": report.existing(loc + ("checkpoint",), entry.checkpoint,
                                          "checkpoint file"), "train": entry.train}


# -- backbones -------------------------------------------------------------------------------
def resolve_backbones(items: Any, method_ids: list[str],
                      report: Report) -> list[BackboneEntry]:
    """``method_ids``: every id the spec's method entries declare (valid or not), so that
    a restriction is not reported for a method whose own entry has a problem."""
    import backbones as registry
    out, seen = [], {}
    for i, entry, reg in checked_entries("backbones", items, BackboneEntry, registry, report):
        loc = ("backbones", i)
        if entry.name in seen:
            report.add(loc + ("name",), f"backbone '{entry.name}' is listed twice (also "
                       f"backbones[{seen[entry.name]}])")
        seen.setdefault(entry.name, i)
        for j, mid in enumerate(entry.methods or ()):
            if mid not in method_ids:
                report.add(loc + ("methods", j), f"no method has id {describe(mid)}."
                           f"{did_you_mean(mid, method_ids)} Method ids: "
                           f"{', '.join(method_ids)}")
        weights = _weights(entry, reg, loc + ("weights",), report)
        out.append(entry.model_copy(update={"weights": weights}))
    return out


def _weight_names(reg) -> tuple[list[str], str, str | None]:
    """(accepted weights names, the default, the torchvision enum's name or None)."""
    enum_name = reg.meta.get("weights_enum")
    if enum_name:
        from torchvision import models
        names = [w.name for w in getattr(models, enum_name)]
        return names, reg.meta.get("default_weights", "IMAGENET1K_V1"), enum_name
    names = list(reg.meta.get("weights_names", ("embedded",)))
    return names, reg.meta.get("default_weights", names[0] if names else None), None


def _weights(entry: BackboneEntry, reg, loc: tuple, report: Report) -> str | None:
    """Resolve weights: a registry weights name, a state_dict file path, or None."""
    names, default, enum_name = _weight_names(reg)
    if "weights" not in entry.model_fields_set:
        return default
    w = entry.weights
    if w is None:
        return None
    if "/" in w or os.sep in w or w.endswith((".pth", ".pt", ".bin")):
        return report.existing(loc, w, "weights file")
    if w == "DEFAULT" and enum_name:
        report.add(loc, "'DEFAULT' is refused: it changes meaning between torchvision releases "
                   f"(for ResNet-50 it is V2, a different model). Name the weights: "
                   f"{', '.join(names)}")
    elif w not in names:
        what = f"{enum_name} name" if enum_name else "weights name"
        report.add(loc, f"unknown {what} '{w}' for {reg.name}.{did_you_mean(w, names)} "
                   f"Available: {', '.join(names)}, a state_dict file path, or null "
                   "(random init)")
    return w
