"""From the raw mapping (the YAML with its overrides applied) to a resolved ``Spec``.

Each top-level field of ``Spec`` is validated on its own, and each list entry on its own,
so that one bad value does not hide the problems elsewhere: a section with problems is
replaced by its defaults (after its other keys were checked too), an entry with problems is
left out. Then the rules that span sections run (``harness.spec.rules``, ``.entries``).
The caller raises ``SpecError`` when the report holds any problem.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from harness.spec import entries, rules
from harness.spec.problems import INVALID, Report
from harness.spec.schema import SCHEMA_VERSION, Spec
from harness.spec.sections import Section
from harness.spec.sweep import SweepSection, check_references
from harness.spec.values import unknown_key

_BY_HAND = ("backbones", "methods", "sweep", "path")     # resolved below, not by type alone
_FALLBACK = {"schema_version": SCHEMA_VERSION, "name": None, "seed": 0}


def build_spec(raw: dict, report: Report, file: Path, sweep: bool = False) -> Spec:
    """The resolved spec of ``raw``; problems go to ``report`` (the result is then partial)."""
    _unknown_keys(raw, report, sweep)
    values = {name: _field(name, field, raw, report)
              for name, field in Spec.model_fields.items() if name not in _BY_HAND}
    values["methods"] = entries.resolve_methods(raw.get("methods"), values["train"], report)
    values["backbones"] = entries.resolve_backbones(raw.get("backbones"), _declared_ids(raw),
                                                    report)
    needs_train = any(m.learned and m.checkpoint is None for m in values["methods"])
    values["data"] = rules.check_data(values["data"], needs_train, report)
    values["storage"] = rules.check_storage(values["storage"], report)
    values["evaluation"] = rules.check_metrics(values["evaluation"], report)
    rules.check_gpu(raw, values["train"], values["sharding"], values["ray"], report)
    if values["name"] is None:
        values["name"] = re.sub(r"[^A-Za-z0-9_.\-]", "_", file.stem)
    if values["tracking"].experiment is None:
        values["tracking"] = values["tracking"].model_copy(
            update={"experiment": values["name"]})
    values["sweep"] = _sweep(raw, values, report) if sweep else None
    return Spec.model_construct(**values)


def _unknown_keys(raw: dict, report: Report, sweep: bool) -> None:
    accepted = Spec.keys() + (["sweep"] if sweep else [])
    for key in raw:
        if key not in accepted:
            report.add((str(key),), Spec.unknown_key(key) or unknown_key(key, accepted))


def _field(name: str, field, raw: dict, report: Report) -> Any:
    """One top-level field: validated, or its default (or fallback) after a problem."""
    key = field.alias or name
    section = isinstance(field.annotation, type) and issubclass(field.annotation, Section)
    default = (field.get_default(call_default_factory=True) if not field.is_required()
               else _FALLBACK.get(name))
    if key not in raw or (section and raw[key] is None):
        if field.is_required():
            report.add((key,), Spec.messages.get((key, "missing"), "required"))
        return default
    tp = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    value = report.check(tp, raw[key], (key,), root=Spec, salvage=section)
    return default if value is INVALID else value


def _declared_ids(raw: dict) -> list[str]:
    """The method ids the file declares, valid or not (for backbone restrictions)."""
    items = raw.get("methods") if isinstance(raw.get("methods"), list) else []
    ids = [(m.get("id") or m.get("name")) if isinstance(m, dict) else m for m in items]
    return sorted({i for i in ids if isinstance(i, str)})


def _sweep(raw: dict, values: dict, report: Report) -> SweepSection | None:
    if raw.get("sweep") is None:
        report.add(("sweep",), Spec.messages[("sweep", "missing")])
        return None
    section = report.check(SweepSection, raw["sweep"], ("sweep",), root=Spec, salvage=True)
    backbones = [b.name for b in values["backbones"]]
    learned = [m.id for m in values["methods"] if m.learned]
    if section is not INVALID:
        return section.resolved(backbones, learned, report)
    written = raw["sweep"] if isinstance(raw["sweep"], dict) else {}
    refs = [written.get(k) for k in ("backbone", "method")]
    if all(r is None or isinstance(r, str) for r in refs):      # (other types: reported)
        check_references(*refs, backbones, learned, report)
    return None
