"""Benchmark specs: YAML files in ``jobs/``, checked completely before anything starts.

    spec = load_spec("jobs/quickstart.yaml", ["train.epochs=2", "data.limit=20"])
    for backbone, method in spec.pairs():
        cfg = spec.train_for(backbone, method)        # global < backbone < method train keys

A bad spec raises ``SpecError`` listing *every* problem at once (the CLI prints
``SpecError.format()`` and exits 2)::

    jobs/vgg16.yaml: 2 problems; nothing was started.
      methods[2].name: unknown method 'score-cam'. Did you mean 'scorecam'? Available: ...
      evaluation.keep_fractions[2]: 15 is not a fraction in (0, 1]. To keep the top 15%, write 0.15.

Rules (every key with its default: the ``*Spec`` dataclasses below; an annotated example:
``jobs/quickstart.yaml``):
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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from harness.registry import did_you_mean

SCHEMA_VERSION = 1
BUILTIN_LISTS = ("Evaluation_2000",)       # 'builtin:<name>' list files (harness.data resolves)
SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-/]+$")           # MLflow-safe run keys
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")          # spec names (also used in paths)
SAFE_TAG = re.compile(r"^[A-Za-z0-9_.\-/ ]+$")         # MLflow tag keys
_SCI = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*$")
_BAD = object()


class SpecError(ValueError):
    """An invalid spec: ``path`` (as given), ``problems`` [(field_path, message)], ``format()``."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        lines = [f"{self.path}: {n} problem{'' if n == 1 else 's'}; nothing was started."]
        lines += [f"  {where}: {msg}" if where else f"  {msg}" for where, msg in self.problems]
        return "\n".join(lines)


# -- the resolved spec ---------------------------------------------------------------------
@dataclass
class TrainSpec:
    """L-CAM head training (protocol.md section 3); defaults are the paper's VGG-16 recipe."""

    epochs: int = 7
    batch_size: int = 64
    lr: float = 1e-4
    lr_decay: float = 0.75
    lambda1: float = 0.01
    lambda2: float = 2.0
    lambda3: float = 1.5
    lambda4: float = 0.3
    variant: str = "paper"
    labels: str = "model"
    workers: int = 1
    use_gpu: bool = False

    @property
    def lambdas(self) -> tuple[float, float, float, float]:
        return (self.lambda1, self.lambda2, self.lambda3, self.lambda4)

    @property
    def ce_only(self) -> bool:
        """The paper's starred ablation: no TV and no area term."""
        return self.lambda1 == 0 and self.lambda2 == 0

    def merged(self, overrides: dict[str, Any] | None) -> "TrainSpec":
        return dataclasses.replace(self, **(overrides or {}))


@dataclass
class BackboneSpec:
    """One backbone: registry ``name``, resolved ``weights`` (name, absolute path or None),
    ``train`` overrides (partial TrainSpec keys) and an optional ``methods`` id restriction."""

    name: str
    weights: str | None
    train: dict[str, Any] = field(default_factory=dict)
    methods: list[str] | None = None


@dataclass
class MethodSpec:
    """One method run: registry ``name``, unique ``id`` (the MLflow run key), resolved
    ``display_name`` and ``variant``, ``params`` (defaults filled from the method class),
    ``checkpoint`` (absolute path or None) and ``train`` overrides (learned methods only).
    The default display name is the method's, plus '*' for a learned method whose global +
    method train block has lambda1 == lambda2 == 0 (the paper's CE-only rows)."""

    name: str
    id: str
    display_name: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        import methods
        return methods.method_class(self.name).family

    @property
    def learned(self) -> bool:
        return self.family == "learned"


@dataclass
class DataSpec:
    """Where images come from and which are evaluated."""

    kind: str = "quickstart"
    root: str | None = None
    list_file: str | None = None
    random_count: int | None = None
    limit: int | None = None
    train_limit: int | None = None
    on_bad_image: str = "stop"


@dataclass
class EvalSpec:
    """AD/IC evaluation: kept fractions, batch size, protocol preset, overlay count.

    ``preset`` is ``'paper'`` or a mapping {soft, fill, score} (``protocol_preset()`` gives
    the ``harness.protocol.ProtocolPreset``)."""

    keep_fractions: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.15])
    batch_size: int = 16
    preset: str | dict = "paper"
    overlays: int = 8
    autocast: bool = False         # explanations under autocast (bf16 on CPU, fp16 on GPU)
    channels_last: bool = False    # backbone and images in channels_last memory format

    def protocol_preset(self):
        from harness.protocol import PAPER, ProtocolPreset
        return PAPER if self.preset == "paper" else ProtocolPreset(name="custom", **self.preset)


@dataclass
class ShardSpec:
    """How evaluation is split into Ray tasks."""

    images_per_task: int = 50
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3


@dataclass
class TrackingSpec:
    """MLflow experiment name (default: the spec name) and extra tags."""

    experiment: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RaySpec:
    """``address`` None = local Ray (or the cluster when run inside a Ray job)."""

    address: str | None = None
    num_cpus: int | None = None


@dataclass
class Spec:
    """A validated benchmark spec with every default resolved."""

    schema: int
    name: str
    seed: int
    backbones: list[BackboneSpec]
    data: DataSpec
    methods: list[MethodSpec]
    train: TrainSpec
    evaluation: EvalSpec
    sharding: ShardSpec
    tracking: TrackingSpec
    ray: RaySpec
    path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)   # extra sections (e.g. ``sweep``)

    def train_for(self, backbone: BackboneSpec, method: MethodSpec) -> TrainSpec:
        """The train block for one pair: global, then backbone, then method overrides."""
        return self.train.merged(backbone.train).merged(method.train)

    def pairs(self) -> list[tuple[BackboneSpec, MethodSpec]]:
        """Every (backbone, method) run, honouring each backbone's ``methods`` restriction."""
        return [(b, m) for b in self.backbones for m in self.methods
                if b.methods is None or m.id in b.methods]

    def method(self, method_id: str) -> MethodSpec:
        return next(m for m in self.methods if m.id == method_id)

    def backbone(self, name: str) -> BackboneSpec:
        return next(b for b in self.backbones if b.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-dumpable data (loads back to an equal spec)."""
        out = dataclasses.asdict(self)
        out.pop("path")
        extras = out.pop("extras")
        for key, value in extras.items():
            out[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def fingerprint(self) -> str:
        """A stable hash of the resolved spec, excluding ``tracking`` and ``ray`` (where the
        results are recorded and computed, not what they are)."""
        data = self.to_dict()
        data.pop("tracking")
        data.pop("ray")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- field checks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _F:
    kind: str                       # int | float | bool | str | choice
    default: Any = None
    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    choices: tuple = ()
    nullable: bool = False


TRAIN_FIELDS = {
    "epochs": _F("int", 7, lo=1), "batch_size": _F("int", 64, lo=1),
    "lr": _F("float", 1e-4, lo=0, lo_open=True),
    "lr_decay": _F("float", 0.75, lo=0, lo_open=True, hi=1),
    "lambda1": _F("float", 0.01, lo=0), "lambda2": _F("float", 2.0, lo=0),
    "lambda3": _F("float", 1.5, lo=0), "lambda4": _F("float", 0.3, lo=0, lo_open=True),
    "variant": _F("choice", "paper", choices=("paper", "reference")),
    "labels": _F("choice", "model", choices=("model", "ground_truth")),
    "workers": _F("int", 1, lo=1), "use_gpu": _F("bool", False),
}
DATA_FIELDS = {
    "kind": _F("choice", "quickstart", choices=("quickstart", "imagenet")),
    "root": _F("str", None, nullable=True), "list_file": _F("str", None, nullable=True),
    "random_count": _F("int", None, lo=1, nullable=True),
    "limit": _F("int", None, lo=1, nullable=True),
    "train_limit": _F("int", None, lo=1, nullable=True),
    "on_bad_image": _F("choice", "stop", choices=("stop", "skip")),
}
EVAL_FIELDS = {"keep_fractions": None, "batch_size": _F("int", 16, lo=1), "preset": None,
               "overlays": _F("int", 8, lo=0), "autocast": _F("bool", False),
               "channels_last": _F("bool", False)}
PRESET_FIELDS = {"soft": _F("bool", True), "fill": _F("choice", "black", choices=("black", "mean")),
                 "score": _F("choice", "prob", choices=("prob", "logit"))}
SHARD_FIELDS = {"images_per_task": _F("int", 50, lo=1),
                "cpus_per_task": _F("float", 1.0, lo=0, lo_open=True),
                "gpus_per_task": _F("float", 0.0, lo=0), "max_retries": _F("int", 3, lo=0)}
TRACKING_FIELDS = {"experiment": _F("str", None, nullable=True), "tags": None}
RAY_FIELDS = {"address": _F("str", None, nullable=True),
              "num_cpus": _F("int", None, lo=1, nullable=True)}
TOP_FIELDS = ("schema", "name", "seed", "backbones", "data", "methods", "train", "evaluation",
              "sharding", "tracking", "ray")
BACKBONE_KEYS = ("name", "weights", "train", "methods")
METHOD_KEYS = ("name", "id", "display_name", "variant", "params", "checkpoint", "train")
_ALIASES = {"metrics": "evaluation", "dataset": "data", "eval": "evaluation", "mlflow": "tracking",
            "model": "backbones", "models": "backbones", "backbone": "backbones",
            "method": "methods", "version": "schema", "shards": "sharding", "training": "train"}
_SECTION_HINTS = {"sweep": "a sweep spec: run it with 'python -m harness tune SPEC'"}


def describe(value: Any) -> str:
    """A short, typed rendering of a YAML value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"'{value}' (a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    kind = type(value).__name__
    return f"{value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


class _Checker:
    """Collects problems; notes which fields were set by an override."""

    def __init__(self, spec_dir: Path, overrides: dict[str, str]):
        self.problems: list[tuple[str, str]] = []
        self.spec_dir, self.overrides = spec_dir, overrides

    def origin(self, where: str) -> str | None:
        for path, text in self.overrides.items():
            if where == path or where.startswith((path + ".", path + "[")):
                return text
        return None

    def add(self, where: str, msg: str) -> None:
        text = self.origin(where)
        self.problems.append((where, msg + (f" (set by override '{text}')" if text else "")))

    def path(self, where: str, value: str) -> Path:
        base = Path.cwd() if self.origin(where) else self.spec_dir
        return (base / Path(value).expanduser()).resolve()

    # ---- scalars --------------------------------------------------------------------------
    def value(self, where: str, v: Any, f: _F) -> Any:
        if v is None:
            if f.nullable:
                return None
            self.add(where, f"null is not allowed; remove the key for the default ({f.default!r})")
            return _BAD
        if f.kind == "bool":
            if not isinstance(v, bool):
                self.add(where, f"expected true or false, got {describe(v)}")
                return _BAD
            return v
        if f.kind in ("str", "choice"):
            if not isinstance(v, str):
                self.add(where, f"expected a string, got {describe(v)}")
                return _BAD
            if f.kind == "choice" and v not in f.choices:
                self.add(where, f"'{v}' is not one of {', '.join(f.choices)}."
                         f"{did_you_mean(v, f.choices)}")
                return _BAD
            return v
        v = self.number(where, v, f.kind == "int")
        if v is _BAD:
            return v
        lo_ok = f.lo is None or (v > f.lo if f.lo_open else v >= f.lo)
        if not lo_ok or (f.hi is not None and v > f.hi):
            if f.hi is not None:
                rng = f"in {'(' if f.lo_open else '['}{f.lo:g}, {f.hi:g}]"
            else:
                rng = f"{'>' if f.lo_open else '>='} {f.lo:g}"
            self.add(where, f"{v!r} is out of range: must be {rng}")
            return _BAD
        return v

    def number(self, where: str, v: Any, integer: bool) -> Any:
        if isinstance(v, str) and not integer and _SCI.match(v.strip()):
            v = float(v)          # PyYAML reads 1e-4 as a string; we accept it
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and isinstance(v, float)):
            hint = ""
            if integer and isinstance(v, float) and v.is_integer():
                hint = f" Write {int(v)}."
            elif integer and isinstance(v, str) and _SCI.match(v.strip()):
                hint = " Write the integer out in digits."
            self.add(where, f"expected {'an integer' if integer else 'a number'}, "
                     f"got {describe(v)}.{hint}")
            return _BAD
        if isinstance(v, float) and not math.isfinite(v):
            self.add(where, f"expected a finite number, got {v!r}")
            return _BAD
        return float(v) if not integer else v

    # ---- mappings -------------------------------------------------------------------------
    def mapping(self, where: str, raw: Any) -> dict:
        """``raw`` as a dict (None -> {}); any other type is reported and gives {}."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.add(where, f"expected a mapping, got {describe(raw)}")
            return {}
        return raw

    def unknown_keys(self, where: str, raw: dict, accepted: Iterable[str],
                     hints: dict[str, str] | None = None) -> None:
        accepted = list(accepted)
        for key in raw:
            if not isinstance(key, str):
                self.add(_join(where, str(key)), f"keys must be strings, got {describe(key)}")
            elif key not in accepted:
                if where == "" and key in _SECTION_HINTS:
                    self.add(key, f"'{key}' belongs in {_SECTION_HINTS[key]}")
                    continue
                hint = (f" Did you mean '{hints[key]}'?" if hints and key in hints
                        else did_you_mean(key, accepted))
                self.add(_join(where, key), f"unknown key '{key}'.{hint} "
                         f"Accepted here: {', '.join(accepted)}")

    def section(self, where: str, raw: Any, fields: dict[str, _F], partial: bool = False) -> dict:
        """Check a mapping of scalar fields; defaults filled unless ``partial``."""
        raw = self.mapping(where, raw)
        self.unknown_keys(where, raw, fields)
        out = {}
        for key, f in fields.items():
            if f is None:
                continue
            if key in raw:
                v = self.value(_join(where, key), raw[key], f)
                if v is not _BAD:
                    out[key] = v
                elif not partial:
                    out[key] = f.default
            elif not partial:
                out[key] = f.default
        return out

    def existing(self, where: str, value: str, what: str, folder: bool = False) -> str | None:
        p = self.path(where, value)
        ok = p.is_dir() if folder else p.is_file()
        if not ok:
            self.add(where, f"{what} '{value}' does not exist" + (f" (looked for {p})"
                     if str(p) != value else ""))
            return None
        return str(p)


# -- YAML and overrides ----------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that records keys repeated within one mapping."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any, int]] = []


def _construct_mapping(loader: _Loader, node, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                loader.duplicates.append((key_node.start_mark.line + 1, key, seen[key]))
            else:
                seen[key] = key_node.start_mark.line + 1
        except TypeError:
            pass                      # unhashable: the base constructor reports it
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> tuple[Any, list[tuple[str, str]]]:
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(x) for x in (getattr(err, "context", None),
                                         getattr(err, "problem", None)) if x) or str(err)
        return None, [(where, f"not valid YAML: {what}")]
    finally:
        loader.dispose()
    return data, [(f"line {line}", f"key '{key}' is repeated (first at line {first}); YAML would "
                   "silently keep only the last one. Remove one of them.")
                  for line, key, first in loader.duplicates]


def _apply_overrides(raw: dict, overrides: Iterable[str], ck: _Checker) -> None:
    for text in overrides:
        path, eq, value = str(text).partition("=")
        path = path.strip()
        if not eq or not _OVERRIDE.match(path):
            ck.problems.append(("overrides", f"'{text}' is not key=value with a dotted key "
                                "(e.g. train.epochs=2, methods[0].params.batch_size=8)"))
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        steps: list[str | int] = []
        for part in path.split("."):
            name, _, rest = part.partition("[")
            steps.append(name)
            steps += [int(i) for i in re.findall(r"\d+", "[" + rest if rest else "")]
        node, where = raw, ""
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list):
                    ck.problems.append((where, f"override '{text}': {where} is "
                                        f"{describe(node)}, not a list; cannot take [{step}]"))
                    break
                if step >= len(node):
                    ck.problems.append((_join(where, step), f"override '{text}': there is no "
                                        f"{_join(where, step)}; {where} has {len(node)} "
                                        f"entr{'y' if len(node) == 1 else 'ies'}"))
                    break
            elif not isinstance(node, dict):
                ck.problems.append((where, f"override '{text}': {where} is {describe(node)}, "
                                    f"not a mapping; cannot set '{step}'"))
                break
            if last:
                node[step] = parsed
                ck.overrides[_join_all(steps)] = text
            else:
                if isinstance(step, str) and node.get(step) is None:
                    if isinstance(steps[i + 1], int):
                        ck.problems.append((_join(where, step), f"override '{text}': "
                                            f"{_join(where, step)} is not set; cannot index it"))
                        break
                    node[step] = {}
                node, where = node[step], _join(where, step)


def _join_all(steps: list[str | int]) -> str:
    where = ""
    for s in steps:
        where = _join(where, s)
    return where


# -- the spec sections -----------------------------------------------------------------------
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
    if ray.address is not None and ray.num_cpus is not None:
        ck.add("ray.num_cpus", "conflicts with ray.address: num_cpus sizes a local Ray only "
               "(a cluster has its own resources); remove one")
    spec = Spec(SCHEMA_VERSION, name if isinstance(name, str) else "spec",
                seed if seed is not _BAD else 0, backbone_specs, data, method_specs, train,
                evaluation, sharding, tracking, ray)
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


def _methods(raw: dict, ck: _Checker, registry, train: TrainSpec) -> list[MethodSpec]:
    out, seen = [], {}
    for i, item in enumerate(_items("methods", raw.get("methods"), ck)):
        where = f"methods[{i}]"
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            ck.add(where, f"expected a mapping with at least 'name', got {describe(item)}")
            continue
        ck.unknown_keys(where, item, METHOD_KEYS)
        name = item.get("name")
        if not isinstance(name, str):
            ck.add(f"{where}.name", "required: a method name" if name is None
                   else f"expected a method name, got {describe(name)}")
            continue
        if name not in registry.REGISTRY:
            ck.add(f"{where}.name", registry.REGISTRY.unknown_message(name))
            continue
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
    for i, item in enumerate(_items("backbones", raw.get("backbones"), ck)):
        where = f"backbones[{i}]"
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            ck.add(where, f"expected a mapping with at least 'name', got {describe(item)}")
            continue
        ck.unknown_keys(where, item, BACKBONE_KEYS)
        name = item.get("name")
        if not isinstance(name, str):
            ck.add(f"{where}.name", "required: a backbone name" if name is None
                   else f"expected a backbone name, got {describe(name)}")
            continue
        if name not in registry.REGISTRY:
            ck.add(f"{where}.name", registry.REGISTRY.unknown_message(name))
            continue
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
    return TrackingSpec(out["experiment"], good)


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
