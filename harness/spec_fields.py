"""What a spec may contain, and the checker that reports what it does not.

The field tables (``TRAIN_FIELDS`` ... ``RAY_FIELDS``: each key's type, default and range as
an ``_F``), the accepted keys of list items, ``describe()`` for values in messages, and
``_Checker``, which collects ``(field_path, message)`` problems (noting which fields a
``key=value`` override set) and checks scalars, mappings and paths against those tables.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from harness.registry import did_you_mean

BUILTIN_LISTS = ("Evaluation_2000",)       # 'builtin:<name>' list files (harness.data resolves)
SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-/]+$")           # MLflow-safe run keys
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")          # spec names (also used in paths)
SAFE_TAG = re.compile(r"^[A-Za-z0-9_.\-/ ]+$")         # MLflow tag keys
_SCI = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")
_BAD = object()            # a value that failed its check (the problem is already added)


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
TRACKING_FIELDS = {"experiment": _F("str", None, nullable=True),
                   "uri": _F("str", None, nullable=True), "tags": None}
STORAGE_FIELDS = {"uri": _F("str", None, nullable=True)}
RAY_FIELDS = {"address": _F("str", None, nullable=True),
              "num_cpus": _F("int", None, lo=1, nullable=True)}
TOP_FIELDS = ("schema", "name", "seed", "backbones", "data", "methods", "train", "evaluation",
              "sharding", "tracking", "storage", "ray")
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
