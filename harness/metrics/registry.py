"""The metric registry (one ``backbones.registry.Registry``), and what reads it.

Built-in metrics register with ``register`` in their own modules (``BUILT_IN`` lists them:
imported on the first lookup); plugins are entry points of the group ``lcam_bench.metrics``
(or a class reference ``package.module:Class``), resolved on first use and checked by
``adopt_metric`` (``harness.metrics.base.declaration_problems``).

``direction(key)``, ``header(key)`` and ``digits(key)`` answer for any reported number
(``AD_15``, ``deletion_auc``, ``road_morf``): the table's marks, the paired tests and the
reports read them here instead of guessing from names.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator

from backbones.registry import Entry, Registry

PLUGIN_GROUP = "lcam_bench.metrics"
#: the modules of the built-in metrics, in the order their columns are written
BUILT_IN = ("harness.metrics.protocol", "harness.metrics.localisation",
            "harness.metrics.causal", "harness.metrics.road", "harness.metrics.sanity")


def _adopt(name: str, cls: Any, source) -> Entry:
    from backbones.plugins import PluginError

    from harness.metrics.base import declaration_problems
    where = source.describe()
    problems = declaration_problems(cls)
    if problems:
        raise PluginError(f"{where}: " + "; ".join(problems)
                          + ". Fix the class's declarations and reinstall the plugin")
    if source.via != "class reference" and cls.name != name:
        raise PluginError(f"{where}: the entry point's name '{name}' differs from the class's "
                          f"name '{cls.name}'; make them equal")
    if cls.always or cls.stage != "image":
        raise PluginError(f"{where}: a plugin metric is a per-image metric (stage 'image') "
                          "that a spec lists in evaluation.metrics, not 'always' computed")
    return Entry(name, cls, {"display_name": cls.display_name, "paper": cls.paper},
                 origin=source.origin)


REGISTRY = Registry("metric", plugin_group=PLUGIN_GROUP, adopt=_adopt)
REGISTRY.defer(lambda: [importlib.import_module(m) for m in BUILT_IN])


def register(cls):
    """Register a built-in ``Metric`` subclass under ``cls.name`` (a class decorator)."""
    REGISTRY.register(cls.name, display_name=cls.display_name, paper=cls.paper)(cls)
    return cls


def metric_class(name: str):
    return REGISTRY.get(name).factory


def create(name: str, settings: dict | None = None):
    """An instance of metric ``name`` with ``settings`` (validated by its ``Settings``)."""
    return metric_class(name)(settings)


def names() -> list[str]:
    """The built-in metrics, in ``BUILT_IN`` order (plugins: ``REGISTRY.plugin_names``)."""
    order = {m: i for i, m in enumerate(BUILT_IN)}
    return sorted(REGISTRY.names(),
                  key=lambda n: (order.get(metric_class(n).__module__, len(order)), n))


def classes() -> Iterator[type]:
    """Every usable metric class: built in, then installed plugins (broken ones skipped)."""
    from backbones.registry import UnknownNameError
    for name in names():
        yield metric_class(name)
    for name in REGISTRY.plugin_names():
        try:
            yield metric_class(name)
        except UnknownNameError:
            continue


def reported_for(key: str):
    """The ``Reported`` declaration of the number ``key`` (e.g. 'AD_15'), or None."""
    for cls in classes():
        for rep in cls.reported:
            if rep.match(key):
                return rep
    return None


def metric_for(key: str):
    """The metric class that reports ``key``, or None."""
    for cls in classes():
        if any(rep.match(key) for rep in cls.reported):
            return cls
    return None


def direction(key: str) -> str | None:
    """'lower' or 'higher' (is better) for a reported number; #FW: 'lower'; else None."""
    if key == "FW" or key.startswith("FW_"):
        return "lower"
    rep = reported_for(key)
    return rep.direction if rep else None


def lower_is_better(key: str) -> bool:
    return direction(key) == "lower"


def header(key: str) -> str:
    """The table header of a reported number (its key when none is declared)."""
    if key == "FW":
        return "#FW"
    rep = reported_for(key)
    return rep.header_of(key) if rep else key


def digits(key: str) -> int:
    rep = reported_for(key)
    return rep.digits if rep else 2


def table_columns() -> list[str]:
    """The Table 1 columns of the per-image metrics other than AD/IC, in registry order
    (the deletion/insertion AUCs, ROAD's MoRF and LeRF, plugins'), shown when present."""
    return [r.key for cls in classes() if cls.stage == "image" and cls.name != "ad_ic"
            for r in cls.reported if r.table and "{k}" not in r.key]


def directions_text(keys) -> str:
    """'AD, deletion: lower is better; IC, insertion: higher is better.' for the shown
    ``keys`` (by the metrics' declarations; a number without one is left out)."""
    groups: dict[str, list[str]] = {"lower": [], "higher": []}
    for key in keys:
        rep = reported_for(key)
        if rep is None:
            continue
        word = rep.label or key
        if word not in groups[rep.direction]:
            groups[rep.direction].append(word)
    parts = [f"{', '.join(v)}: {d} is better" for d, v in groups.items() if v]
    return "; ".join(parts) + "." if parts else ""




# -- a run's metrics (harness.pipeline.plan.EvaluationPlan) -----------------------------------
LEGACY_CAUSAL = ("deletion", "insertion")


def _causal_settings(evaluation) -> dict:
    return {"steps": evaluation.causal_steps, "canvas": evaluation.causal_canvas,
            "batch_size": evaluation.causal_batch_size}


def _listed(evaluation) -> list:
    given = dict(getattr(evaluation, "metric_settings", ()) or ())
    out = []
    for name in evaluation.causal:
        settings = dict(given.get(name) or {})
        if name in LEGACY_CAUSAL:
            settings = {**_causal_settings(evaluation), **settings}
        out.append(create(name, settings))
    return out


def planned(evaluation) -> list:
    """The per-image metrics of ``evaluation`` (an ``EvaluationPlan``) with their settings,
    in column order: the ``always`` ones (AD/IC with the evaluation's fractions and preset,
    localisation), then those listed, in the spec's order."""
    preset = evaluation.preset
    out = []
    for name in names():
        cls = metric_class(name)
        if cls.always and cls.stage == "image":
            out.append(cls({"fractions": tuple(evaluation.fractions), "soft": preset.soft,
                            "fill": preset.fill, "score": preset.score}
                           if name == "ad_ic" else None))
    return out + _listed(evaluation)


def identity(evaluation) -> dict:
    """The listed metrics' part of a cell's shard identity. Deletion and insertion with the
    evaluation's ``causal_*`` settings keep the key they always had (``causal``: names,
    steps, canvas, batch); every other listed metric adds ``metrics: {name: its
    identity()}`` (version and settings). Nothing when only ``ad_ic`` is listed, so the
    folders of such cells keep their names."""
    listed = _listed(evaluation)
    shared = metric_class("deletion").Settings(**_causal_settings(evaluation))
    legacy = [m.name for m in listed if m.name in LEGACY_CAUSAL and m.settings == shared]
    out: dict = {}
    if legacy:
        out["causal"] = {"metrics": legacy, "steps": evaluation.causal_steps,
                         "canvas": evaluation.causal_canvas,
                         "batch": evaluation.causal_batch_size}
    others = {m.name: m.identity() for m in listed if m.name not in legacy}
    if others:
        out["metrics"] = others
    return out


__all__ = ["BUILT_IN", "PLUGIN_GROUP", "REGISTRY", "classes", "create", "digits",
           "direction", "directions_text", "header", "identity", "lower_is_better", "metric_for",
           "metric_class", "names", "planned", "register", "reported_for", "table_columns"]
