"""Benchmark specs: YAML files in ``jobs/``, checked completely before anything starts.

    spec = load_spec("jobs/quickstart.yaml", ["train.epochs=2", "data.limit=20"])
    for backbone, method in spec.pairs():
        cfg = spec.train_for(backbone, method)        # global < backbone < method train keys

A bad spec raises ``SpecError`` listing *every* problem at once (the CLI prints
``SpecError.format()`` and exits 2)::

    jobs/vgg16.yaml: 2 problems; nothing was started.
      methods[2].name: unknown method 'score-cam'. Did you mean 'scorecam'? Available: ...
      evaluation.keep_fractions[2]: 15 is not a fraction in (0, 1]. To keep the top 15%, write 0.15.

Rules (every key with its default: the ``*Spec`` dataclasses in ``harness.spec_model``; an
annotated example: ``jobs/quickstart.yaml``):
- Read with a ``yaml.SafeLoader`` subclass (nothing is ever constructed, imported or run);
  a key repeated in one mapping is a problem (plain YAML silently keeps the last one).
- ``schema: 1`` is required; unknown keys are rejected at every level, with "did you mean".
- Integers are never booleans; float fields accept integers. PyYAML (YAML 1.1) reads
  ``1e-4`` as the *string* '1e-4': float fields accept such scientific-notation strings and
  convert them (``1.0e-4`` is what YAML itself understands); any other string is an error.
- Method and backbone names, variants, parameters and weights are resolved only through
  the registries (``methods.REGISTRY``, ``backbones.REGISTRY``); a method class may add a
  classmethod ``check_params(params) -> list[str]`` for value checks.
- Relative paths written in the file are relative to the file's folder (as in
  docker-compose); paths given by ``key=value`` overrides are relative to the working
  directory. Paths are checked to exist, and stored resolved (absolute).
- ``key=value`` overrides (``train.epochs=2``, ``methods[0].params.batch_size=8``; the value
  is parsed with ``yaml.safe_load``) are applied to the raw mapping before validation; a
  path that cannot be applied is itself a reported problem.

This module is the entry point: ``load_spec`` and the section builders that turn the raw
mapping into a ``Spec``. The pieces it uses live beside it, and their public names are
re-exported here (import them from ``harness.spec``):
- ``harness.spec_model``: ``SpecError`` and the resolved ``*Spec`` dataclasses;
- ``harness.spec_fields``: the field tables, ``describe()`` and the problem-collecting checker;
- ``harness.spec_yaml``: the YAML loader and ``key=value`` overrides.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from harness.registry import did_you_mean
from harness.spec_fields import (
    _ALIASES, _BAD, BACKBONE_KEYS, BUILTIN_LISTS, DATA_FIELDS, EVAL_FIELDS, METHOD_KEYS,
    PRESET_FIELDS, RAY_FIELDS, SAFE_ID, SAFE_NAME, SAFE_TAG, SHARD_FIELDS, STORAGE_FIELDS, TOP_FIELDS,
    TRACKING_FIELDS, TRAIN_FIELDS, _Checker, _F, _join, describe)
from harness.spec_model import (
    SCHEMA_VERSION, BackboneSpec, DataSpec, EvalSpec, MethodSpec, RaySpec, ShardSpec, Spec,
    SpecError, StorageSpec, TrackingSpec, TrainSpec)
from harness.spec_yaml import _apply_overrides, _parse_yaml

__all__ = [
    "load_spec", "SpecError", "Spec", "TrainSpec", "BackboneSpec", "MethodSpec", "DataSpec",
    "EvalSpec", "ShardSpec", "TrackingSpec", "RaySpec", "SCHEMA_VERSION", "BUILTIN_LISTS",
    "SAFE_ID", "SAFE_NAME", "SAFE_TAG", "TRAIN_FIELDS", "DATA_FIELDS", "EVAL_FIELDS",
    "PRESET_FIELDS", "SHARD_FIELDS", "TRACKING_FIELDS", "RAY_FIELDS", "TOP_FIELDS",
    "BACKBONE_KEYS", "METHOD_KEYS", "describe",
]


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = (),
              sections: dict[str, Callable] | None = None) -> Spec:
    """Read, override, validate and resolve a spec file; raises ``SpecError``.

    ``sections`` admits extra top-level keys (e.g. ``sweep`` for ``harness tune``): each maps
    to ``check(where, raw_value, checker, spec) -> object`` whose result is stored in
    ``spec.extras[key]``; the checker's ``add(field_path, message)`` reports problems.
    """
    shown = str(path)
    p = Path(path)
    if not p.is_file():
        raise SpecError(shown, [("", "file not found" if not p.exists() else "not a file")])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(shown, [("", f"cannot read the file: {err}")]) from None
    raw, problems = _parse_yaml(text)
    if problems and raw is None:
        raise SpecError(shown, problems)
    if raw is None:
        raise SpecError(shown, [("", "the file is empty; a spec starts with 'schema: 1' "
                                 "(see jobs/quickstart.yaml)")])
    if not isinstance(raw, dict):
        raise SpecError(shown, problems + [("", f"expected a mapping of keys at the top level, "
                                            f"got {describe(raw)} (see jobs/quickstart.yaml)")])
    ck = _Checker(p.resolve().parent, {})
    ck.problems += problems
    _apply_overrides(raw, overrides, ck)
    sections = sections or {}
    extra_raw = {k: raw.pop(k) for k in list(raw) if k in sections}
    spec = _build(raw, ck, p)
    for key, check in sections.items():
        spec.extras[key] = check(key, extra_raw.get(key), ck, spec)
        raw[key] = extra_raw.get(key)
    if ck.problems:
        raise SpecError(shown, _in_file_order(ck.problems, raw))
    spec.path = shown
    return spec


def _in_file_order(problems: list[tuple[str, str]], raw: dict) -> list[tuple[str, str]]:
    """YAML problems first, then by the position of the top-level key in the file."""
    order = {k: i for i, k in enumerate(raw)}

    def key(problem):
        where = problem[0]
        if where.startswith("line ") or not where:
            return -1
        top = re.match(r"[^.\[]*", where).group(0)
        return order.get(top, len(order))
    return sorted(problems, key=key)


def _build(raw: dict, ck: _Checker, path: Path) -> Spec:
    import backbones as bb_registry  # the registries (and torch) only once the YAML parsed
    import methods as m_registry

    ck.unknown_keys("", raw, TOP_FIELDS, _ALIASES)
    if "schema" not in raw:
        ck.add("schema", f"required: add 'schema: {SCHEMA_VERSION}' as the first line")
    elif raw["schema"] != SCHEMA_VERSION or isinstance(raw["schema"], bool):
        ck.add("schema", f"unsupported schema version {raw['schema']!r}; this harness reads "
               f"schema {SCHEMA_VERSION}")
    name = raw.get("name", None)
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem)
    elif not isinstance(name, str) or not SAFE_NAME.match(name):
        ck.add("name", f"expected a name of letters, digits, '_', '-', '.', got {describe(name)}")
    seed = ck.value("seed", raw.get("seed", 0), _F("int", 0))
    train = TrainSpec(**ck.section("train", raw.get("train"), TRAIN_FIELDS))
    data = DataSpec(**ck.section("data", raw.get("data"), DATA_FIELDS))
    method_specs = _methods(raw, ck, m_registry, train)
    declared_ids = {(m.get("id") or m.get("name")) if isinstance(m, dict) else m
                    for m in (raw.get("methods") if isinstance(raw.get("methods"), list) else [])}
    backbone_specs = _backbones(raw, ck, bb_registry,
                                {i for i in declared_ids if isinstance(i, str)})
    evaluation = _evaluation(raw.get("evaluation"), ck)
    sharding = ShardSpec(**ck.section("sharding", raw.get("sharding"), SHARD_FIELDS))
    tracking = _tracking(raw.get("tracking"), ck)
    ray = RaySpec(**ck.section("ray", raw.get("ray"), RAY_FIELDS))
    storage = StorageSpec(**ck.section("storage", raw.get("storage"), STORAGE_FIELDS))
    if storage.uri is not None:
        storage.uri = str(ck.path("storage.uri", storage.uri))
    if ray.address is not None and ray.num_cpus is not None:
        ck.add("ray.num_cpus", "conflicts with ray.address: num_cpus sizes a local Ray only "
               "(a cluster has its own resources); remove one")
    spec = Spec(SCHEMA_VERSION, name if isinstance(name, str) else "spec",
                seed if seed is not _BAD else 0, backbone_specs, data, method_specs, train,
                evaluation, sharding, tracking, ray, storage)
    _check_data(spec, ck)
    _check_gpu(spec, raw, ck)
    if tracking.experiment is None:
        tracking.experiment = spec.name
    return spec


def _items(where: str, raw: Any, ck: _Checker) -> list:
    if raw is None:
        ck.add(where, f"required: a non-empty list of {where}")
        return []
    if not isinstance(raw, list) or not raw:
        ck.add(where, f"expected a non-empty list, got {describe(raw)}")
        return []
    return raw


def _named_items(section: str, raw: dict, ck: _Checker, registry, keys: tuple[str, ...],
                 what: str) -> Iterator[tuple[int, str, dict, str]]:
    """The entries of the list section ``raw[section]`` that name a registered ``what``.

    Each entry is a name or a mapping with 'name' and only ``keys``; yields (index, field
    path, entry as a mapping, name) and reports the entries it skips. A generator, so the
    caller's problems for an entry follow that entry's naming problems, in list order."""
    for i, item in enumerate(_items(section, raw.get(section), ck)):
        where = f"{section}[{i}]"
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            ck.add(where, f"expected a mapping with at least 'name', got {describe(item)}")
            continue
        ck.unknown_keys(where, item, keys)
        name = item.get("name")
        if not isinstance(name, str):
            ck.add(f"{where}.name", f"required: a {what} name" if name is None
                   else f"expected a {what} name, got {describe(name)}")
            continue
        if name not in registry.REGISTRY:
            ck.add(f"{where}.name", registry.REGISTRY.unknown_message(name))
            continue
        yield i, where, item, name


def _methods(raw: dict, ck: _Checker, registry, train: TrainSpec) -> list[MethodSpec]:
    out, seen = [], {}
    for i, where, item, name in _named_items("methods", raw, ck, registry, METHOD_KEYS, "method"):
        cls = registry.method_class(name)
        learned = cls.family == "learned"
        mid = item.get("id") or name
        if not isinstance(mid, str) or not SAFE_ID.match(mid):
            ck.add(f"{where}.id", f"expected an MLflow-safe id (letters, digits, '_ - . /'), "
                   f"got {describe(mid)}")
        elif mid in seen:
            ck.add(f"{where}.id" if "id" in item else f"{where}.name",
                   f"duplicate method id '{mid}' (also methods[{seen[mid]}]); give each "
                   "entry a distinct 'id'")
        else:
            seen[mid] = i
        variant = item.get("variant")
        if variant is None:
            variant = cls.variants[0]
        elif variant not in cls.variants:
            shown = f"'{variant}'" if isinstance(variant, str) else describe(variant)
            ck.add(f"{where}.variant", f"{shown} is not a variant of {name}."
                   f"{did_you_mean(str(variant), cls.variants)} Available: "
                   f"{', '.join(cls.variants)}")
        params = _params(f"{where}.params", item.get("params"), cls, ck)
        checkpoint = item.get("checkpoint")
        mtrain = ck.section(f"{where}.train", item.get("train"), TRAIN_FIELDS, partial=True) \
            if item.get("train") is not None else {}
        if not learned:
            for key in ("checkpoint", "train"):
                if item.get(key) not in (None, {}):
                    ck.add(f"{where}.{key}", f"{name} is a {cls.family} method; only learned "
                           f"methods ({', '.join(_learned(registry))}) take '{key}'")
            checkpoint, mtrain = None, {}
        elif checkpoint is not None:
            if item.get("train") not in (None, {}):
                ck.add(f"{where}.train", "conflicts with checkpoint: a checkpoint skips "
                       "training; remove one of them")
            if not isinstance(checkpoint, str):
                ck.add(f"{where}.checkpoint", f"expected a file path, got {describe(checkpoint)}")
                checkpoint = None
            else:
                checkpoint = ck.existing(f"{where}.checkpoint", checkpoint, "checkpoint file")
        display = item.get("display_name")
        if display is not None and not isinstance(display, str):
            ck.add(f"{where}.display_name", f"expected a string, got {describe(display)}")
            display = None
        if display is None:
            display = cls.display_name + ("*" if learned and train.merged(mtrain).ce_only else "")
        out.append(MethodSpec(name, mid if isinstance(mid, str) else name, display,
                              variant if isinstance(variant, str) else cls.variants[0],
                              params, checkpoint, mtrain))
    return out


def _learned(registry) -> list[str]:
    return [n for n in registry.names() if registry.method_class(n).family == "learned"]


def _params(where: str, raw: Any, cls, ck: _Checker) -> dict[str, Any]:
    raw = ck.mapping(where, raw)
    declared = {k: v for k, v in cls.params.items()
                if not (cls.family == "learned" and k == "checkpoint")}
    out = {k: p.default for k, p in declared.items()}
    for key, value in raw.items():
        kw = _join(where, str(key))
        if key == "variant":
            ck.add(kw, "variant is a method-level key: write it beside 'name', not in params")
        elif key == "checkpoint" and cls.family == "learned":
            ck.add(kw, "checkpoint is a method-level key: write it beside 'name', not in params")
        elif not declared:
            ck.add(kw, f"{cls.name} accepts no params; remove '{key}'")
        elif key not in declared:
            ck.add(kw, f"unknown parameter '{key}' of {cls.name}.{did_you_mean(str(key), list(declared))}"
                   f" Accepted: {', '.join(declared)}")
        else:
            types = declared[key].type if isinstance(declared[key].type, tuple) else (declared[key].type,)
            if value is None:
                out[key] = None
            elif float in types:
                v = ck.number(kw, value, integer=False)
                if v is not _BAD:
                    out[key] = int(v) if int in types and isinstance(value, int) else v
            elif int in types:
                v = ck.number(kw, value, integer=True)
                if v is not _BAD:
                    out[key] = v
            elif isinstance(value, bool) and bool not in types or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                ck.add(kw, f"expected {names}, got {describe(value)}")
            else:
                out[key] = value
    check = getattr(cls, "check_params", None)
    if check is not None and not any(w.startswith(where) for w, _ in ck.problems):
        for msg in check(dict(out)) or ():
            ck.add(where, msg)
    return out


def _backbones(raw: dict, ck: _Checker, registry, method_ids: set[str]) -> list[BackboneSpec]:
    out, seen = [], {}
    for i, where, item, name in _named_items("backbones", raw, ck, registry, BACKBONE_KEYS,
                                             "backbone"):
        if name in seen:
            ck.add(f"{where}.name", f"backbone '{name}' is listed twice (also backbones[{seen[name]}])")
        seen[name] = i
        weights = _weights(f"{where}.weights", registry.REGISTRY.get(name), item, ck)
        btrain = ck.section(f"{where}.train", item.get("train"), TRAIN_FIELDS, partial=True)
        only = item.get("methods")
        if only is not None:
            if not isinstance(only, list) or not only:
                ck.add(f"{where}.methods", f"expected a non-empty list of method ids, got "
                       f"{describe(only)} (remove the key to run every method)")
                only = None
            else:
                for j, mid in enumerate(only):
                    if mid not in method_ids:
                        ck.add(f"{where}.methods[{j}]", f"no method has id {describe(mid)}."
                               f"{did_you_mean(str(mid), sorted(method_ids))} Method ids: "
                               f"{', '.join(sorted(method_ids))}")
                only = [str(m) for m in only]
        out.append(BackboneSpec(name, weights, btrain, only))
    return out


def _weights(where: str, entry, item: dict, ck: _Checker) -> str | None:
    """Resolve weights: a registry weights name, a state_dict file path, or None."""
    enum_name = entry.meta.get("weights_enum")
    if enum_name:
        from torchvision import models
        names = [w.name for w in getattr(models, enum_name)]
        default, what = entry.meta.get("default_weights", "IMAGENET1K_V1"), f"{enum_name} name"
    else:
        names = list(entry.meta.get("weights_names", ("embedded",)))
        default, what = entry.meta.get("default_weights", names[0]), "weights name"
    if "weights" not in item:
        return default
    w = item["weights"]
    if w is None:
        return None
    if not isinstance(w, str):
        ck.add(where, f"expected a weights name or file path, got {describe(w)}")
        return default
    if "/" in w or os.sep in w or w.endswith((".pth", ".pt", ".bin")):
        return ck.existing(where, w, "weights file")
    if w == "DEFAULT" and enum_name:
        ck.add(where, "'DEFAULT' is refused: it changes meaning between torchvision releases "
               f"(for ResNet-50 it is V2, a different model). Name the weights: {', '.join(names)}")
    elif w not in names:
        ck.add(where, f"unknown {what} '{w}' for {entry.name}.{did_you_mean(w, names)} "
               f"Available: {', '.join(names)}, a state_dict file path, or null (random init)")
    return w


def _evaluation(raw: Any, ck: _Checker) -> EvalSpec:
    out = ck.section("evaluation", raw, EVAL_FIELDS)
    raw = raw if isinstance(raw, dict) else {}
    fractions = raw.get("keep_fractions", [1.0, 0.5, 0.15])
    good: list[float] = []
    if not isinstance(fractions, list) or not fractions:
        ck.add("evaluation.keep_fractions", f"expected a non-empty list of fractions in (0, 1], "
               f"got {describe(fractions)}")
    else:
        for j, v in enumerate(fractions):
            where = f"evaluation.keep_fractions[{j}]"
            v = ck.number(where, v, integer=False)
            if v is _BAD:
                continue
            if not 0 < v <= 1:
                hint = (f" To keep the top {v:g}%, write {v / 100:g}." if 1 < v <= 100 else "")
                ck.add(where, f"{v:g} is not a fraction in (0, 1].{hint}")
            elif v in good:
                ck.add(where, f"{v:g} is listed twice")
            else:
                good.append(v)
    preset_raw = raw.get("preset", "paper")
    preset: str | dict = "paper"
    if isinstance(preset_raw, dict):
        vals = ck.section("evaluation.preset", preset_raw, PRESET_FIELDS)
        paper = {k: f.default for k, f in PRESET_FIELDS.items()}
        preset = "paper" if vals == paper else vals
    elif preset_raw != "paper":
        ck.add("evaluation.preset", f"expected 'paper' or a mapping {{soft: true|false, fill: "
               f"black|mean, score: prob|logit}}, got {describe(preset_raw)}")
    return EvalSpec(good or [1.0, 0.5, 0.15], out["batch_size"], preset, out["overlays"],
                    out["autocast"], out["channels_last"])


def _tracking(raw: Any, ck: _Checker) -> TrackingSpec:
    out = ck.section("tracking", raw, TRACKING_FIELDS)
    tags = ck.mapping("tracking.tags", (raw if isinstance(raw, dict) else {}).get("tags"))
    good = {}
    for k, v in tags.items():
        where = _join("tracking.tags", str(k))
        if not isinstance(k, str) or not SAFE_TAG.match(k):
            ck.add(where, "tag keys may use only letters, digits, '_ - . / ' and spaces")
        elif not isinstance(v, str):
            ck.add(where, f"tag values are strings, got {describe(v)}; quote it: '{v}'")
        else:
            good[k] = v
    return TrackingSpec(out["experiment"], out["uri"], good)


def _check_data(spec: Spec, ck: _Checker) -> None:
    d = spec.data
    needs_train = any(m.learned and m.checkpoint is None for m in spec.methods)
    if d.kind == "imagenet" and d.root is None:
        ck.add("data.root", "required with data.kind: imagenet: the folder holding train/ and "
               "val/. Give it on the command line: data.root=/path/to/imagenet")
    elif d.root is not None:
        root = ck.existing("data.root", d.root, "folder", folder=True)
        if root:
            d.root = root
            subs = (["train"] if needs_train else []) + (["val"] if d.list_file is None else [])
            missing = [s for s in subs if not (Path(root) / s).is_dir()]
            if missing:
                ck.add("data.root", f"{root} has no {' and no '.join(m + '/' for m in missing)}"
                       + (" (train/ is needed to train the L-CAM heads; give each learned "
                          "method a checkpoint to skip training)" if "train" in missing else ""))
    if d.list_file is not None:
        if d.random_count is not None:
            ck.add("data.random_count", "conflicts with data.list_file: the list names the images; "
                   "remove one of them")
        if d.list_file.startswith("builtin:"):
            key = d.list_file.split(":", 1)[1]
            if key not in BUILTIN_LISTS:
                ck.add("data.list_file", f"unknown built-in list '{key}'.{did_you_mean(key, BUILTIN_LISTS)}"
                       f" Available: {', '.join('builtin:' + b for b in BUILTIN_LISTS)}")
            elif d.kind != "imagenet":
                ck.add("data.list_file", f"builtin:{key} lists ImageNet validation images; it "
                       "needs data.kind: imagenet")
        else:
            found = ck.existing("data.list_file", d.list_file, "list file")
            if found:
                d.list_file = found
                _check_list_file(Path(found), ck)


def _check_list_file(path: Path, ck: _Checker, show: int = 5) -> None:
    bad, count = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        ck.add("data.list_file", f"cannot read {path}: {err}")
        return
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        count += 1
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
            bad.append(n)
            if len(bad) <= show:
                ck.add("data.list_file", f"line {n}: expected '<image file name> <integer "
                       f"label>', got {line.strip()!r}")
    if len(bad) > show:
        ck.add("data.list_file", f"... and {len(bad) - show} more malformed lines")
    if not count:
        ck.add("data.list_file", f"{path} lists no images")


def _check_gpu(spec: Spec, raw: dict, ck: _Checker) -> None:
    """A GPU request on a machine without one, when Ray will be local (not a cluster)."""
    if spec.ray.address is not None or os.environ.get("RAY_ADDRESS"):
        return
    wanted = [("train.use_gpu", spec.train.use_gpu)]
    for section in ("backbones", "methods"):
        items = raw.get(section) if isinstance(raw.get(section), list) else []
        wanted += [(f"{section}[{i}].train.use_gpu", item["train"].get("use_gpu") is True)
                   for i, item in enumerate(items)
                   if isinstance(item, dict) and isinstance(item.get("train"), dict)]
    wanted += [("sharding.gpus_per_task", spec.sharding.gpus_per_task > 0)]
    wanted = [w for w, v in wanted if v]
    if not wanted:
        return
    import torch
    if torch.cuda.is_available():
        return
    for where in wanted:
        fix = "sharding.gpus_per_task: 0" if where.startswith("sharding") else "use_gpu: false"
        ck.add(where, f"this machine has no GPU and ray.address is null (local Ray); set {fix}, "
               "or give ray.address of a cluster with GPUs")
