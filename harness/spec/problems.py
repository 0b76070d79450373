"""The problem list of a spec: ``SpecError``, the ``Report`` that collects problems, and the
translation of pydantic's ``ValidationError`` into our words.

A problem is ``(field_path, message)``: ``methods[2].params.n_masks``, ``evaluation.
keep_fractions[1]``, ``line 7`` for the YAML itself. Messages name the value found
(``describe()``), what is accepted and, for unknown names, the closest one ("Did you mean
'x'?"); a field set by a ``key=value`` override says so ("(set by override 'k=v')").
Every problem of a file is reported at once, in the order of the file.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel, Tag, TypeAdapter, ValidationError

from harness.errors import UserError
from harness.spec import values as words

Loc = tuple  # a field path as a tuple of keys and list indices
INVALID = object()          # a value that failed validation (its problems are reported)
_TYPE_KINDS = {"int_type": "int", "int_parsing": "int", "int_from_float": "int",
               "float_type": "number", "float_parsing": "number", "finite_number": "number",
               "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
               "list_type": "list", "dict_type": "mapping", "model_type": "mapping",
               "model_attributes_type": "mapping"}
_RANGE = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


class SpecError(UserError, ValueError):
    """An invalid spec: ``path`` (as given), ``problems`` [(field_path, message)], ``format()``."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        lines = [f"{self.path}: {n} problem{'' if n == 1 else 's'}; nothing was started."]
        lines += [f"  {where}: {msg}" if where else f"  {msg}" for where, msg in self.problems]
        return "\n".join(lines)


def field_path(loc: Loc | str) -> str:
    """('methods', 2, 'params', 'n_masks') -> 'methods[2].params.n_masks'."""
    if isinstance(loc, str):
        return loc
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- where an error is: the model field behind a location -----------------------------------
class Located(typing.NamedTuple):
    """Where a location leads in the models: the field (or unknown key) and its type."""

    loc: Loc                        # the location without union tags and '[key]' markers
    owner: type | None              # the model whose field (or unknown key) it is
    name: Any                       # that field's name or the unknown key
    field: Any                      # its FieldInfo (None for an unknown key)
    annotation: Any                 # the type at the location, metadata stripped
    metadata: list                  # the metadata (bounds ...) collected on the way


def unwrap(tp: Any, metadata: list) -> Any:
    """``tp`` without its ``Annotated`` layers, whose metadata are added to ``metadata``."""
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata.extend(extra)
    return tp


def _fields_by_key(model: type[BaseModel]) -> dict[str, Any]:
    return {f.alias or n: f for n, f in model.model_fields.items()}


def _step(tp: Any, part: Any, metadata: list) -> tuple[Any, bool]:
    """The type one location part down from ``tp``, and whether ``part`` was used up by
    it (a union's tag is; an optional's part is not: it applies to the type inside)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arm in args:
            arm_meta: list = []
            unwrap(arm, arm_meta)
            if any(isinstance(m, Tag) and m.tag == part for m in arm_meta):
                return arm, True
        arms = [a for a in args if a is not type(None)]
        return (arms[0], False) if len(arms) == 1 else (Any, True)
    if origin in (list, tuple) and isinstance(part, int):
        return args[0], True
    if origin is dict:
        return args[1], True
    return Any, True


def locate(root: Any, loc: Loc) -> Located:
    """Follow ``loc`` from the type ``root`` (a model, or any annotation) to its field.

    Union tags (``evaluation.preset``'s 'custom') are dropped from the location; a mapping
    key's own error (pydantic's trailing '[key]') is located at that key."""
    tp, clean, owner, name, field, metadata = root, [], None, None, None, []
    parts = [p for p in loc if p != "[key]"]
    i = 0
    while i < len(parts):
        part = parts[i]
        tp = unwrap(tp, metadata)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            clean.append(part)
            owner, name, field, metadata = tp, part, _fields_by_key(tp).get(part), []
            if field is None:
                return Located(tuple(clean), owner, name, None, Any, [])
            tp = Annotated[(field.annotation, *field.metadata)] if field.metadata \
                else field.annotation
            i += 1
            continue
        before = tp
        tp, used = _step(tp, part, metadata)
        if used:
            i += 1
            if typing.get_origin(before) not in (Union, types.UnionType):
                clean.append(part)        # a list index or mapping key (not a union tag)
    return Located(tuple(clean), owner, name, field, unwrap(tp, metadata), metadata)


def literal_choices(tp: Any) -> tuple:
    """The values of a ``Literal`` type, also inside an optional; () for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next((typing.get_args(a) for a in typing.get_args(tp)
                     if typing.get_origin(a) is Literal), ())
    return ()


# -- what the error says ---------------------------------------------------------------------
def bounds_of(metadata: list) -> dict[str, float]:
    """{'ge': 1, ...}: the bounds among a field's metadata (``Field(ge=1)`` and the like)."""
    out = {}
    for m in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(at, key.capitalize())):
                out[key] = getattr(m, key)
    return out


def _default(place: Located) -> Any:
    owner, name = place.owner, place.name
    full = getattr(owner, "full", None)          # a partial section: the full one's default
    source = full.model_fields.get(name) if full is not None else place.field
    return None if source is None else source.get_default(call_default_factory=True)


def message(error: dict, place: Located) -> str:
    """Our words for one pydantic error at ``place``."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    owner, name = place.owner, place.name
    custom = (getattr(owner, "messages", {}) or {}).get((name, kind))
    if custom:
        return custom.format(found=words.describe(value), value=repr(value))
    if kind == "spec":
        return ctx["message"]
    if kind == "extra_forbidden":
        return (owner.unknown_key(name) if hasattr(owner, "unknown_key") else None) or \
            words.unknown_key(name, owner.keys() if hasattr(owner, "keys") else [])
    if kind == "missing":
        return "required"
    if error["loc"] and error["loc"][-1] == "[key]" and kind in _TYPE_KINDS:
        return f"keys must be strings, got {words.describe(value)}"
    if value is None and place.field is not None and place.loc[-1:] == (name,) \
            and kind in _TYPE_KINDS:        # null for a field itself (not a list item)
        return words.null_refused(_default(place))
    if kind == "literal_error":
        return words.not_one_of(value, literal_choices(place.annotation))
    if kind in _TYPE_KINDS:
        return words.expected(_TYPE_KINDS[kind], value)
    if kind in _RANGE:
        subject = getattr(owner, "subject", "") or name
        return words.out_of_range(value, subject, words.bounds_text(**bounds_of(place.metadata)))
    if kind == "too_short" and ctx.get("min_length") == 1:
        return f"expected a non-empty list, got {words.describe(value)}"
    if kind == "invalid_key":
        return f"keys must be strings, got {words.describe(value)}"
    return error["msg"]


def translate(error: dict, root: Any, prefix: Loc = ()) -> tuple[Loc, str]:
    """One pydantic error (``ValidationError.errors()`` item) as (location, message)."""
    place = locate(root, tuple(error["loc"]))
    loc = prefix + place.loc
    if error["type"] == "invalid_key" or error["loc"][-1:] == ("[key]",):
        loc = loc[:-1] + (str(loc[-1]),)     # a key, even a number: 'train.4', not 'train[4]'
    if error["type"] == "spec":
        loc += tuple((error.get("ctx") or {}).get("at", ()))
    return loc, message(error, place)


# -- the report of one file ------------------------------------------------------------------
_ADAPTERS: dict[int, tuple[Any, TypeAdapter]] = {}


def _adapter(tp: Any) -> TypeAdapter:
    if id(tp) not in _ADAPTERS:                  # keyed by identity: the types live on
        _ADAPTERS[id(tp)] = (tp, TypeAdapter(tp))
    return _ADAPTERS[id(tp)][1]


def _validate(tp: Any, value: Any) -> tuple[Any, list[dict]]:
    try:
        return _adapter(tp).validate_python(value), []
    except ValidationError as err:
        return INVALID, err.errors()


class Report:
    """Collects the problems of one spec file; knows which fields overrides set.

    ``origins`` maps a field path to the ``key=value`` override that set it: problems at or
    under it say so, and a relative path there is relative to the working directory instead
    of the spec file's folder (``spec_dir``)."""

    def __init__(self, spec_dir: Path):
        self.spec_dir = spec_dir
        self.origins: dict[str, str] = {}
        self.problems: list[tuple[Loc | str, str]] = []

    def origin(self, loc: Loc | str) -> str | None:
        where = field_path(loc)
        for path, text in self.origins.items():
            if where == path or where.startswith((path + ".", path + "[")):
                return text
        return None

    def add(self, loc: Loc | str, msg: str) -> None:
        text = self.origin(loc)
        self.problems.append((loc, msg + (f" (set by override '{text}')" if text else "")))

    def check(self, tp: Any, value: Any, prefix: Loc = (), root: Any = None,
              salvage: bool = False) -> Any:
        """``value`` validated as ``tp``, or INVALID, its problems reported at ``prefix`` +
        their location (located from ``root`` when given, e.g. the ``Spec`` model for one
        of its fields).

        With ``salvage``, a mapping whose keys had problems is validated again without
        them, so that the rules between its other keys are checked too (every problem at
        once); what that second pass returns is the value (the spec is refused anyway)."""
        value_out, errors = _validate(tp, value)
        if not errors:
            return value_out
        self._add_errors(errors, tp, prefix, root)
        bad = {e["loc"][0] for e in errors if e["loc"]}
        if not (salvage and isinstance(value, dict)) or any(not e["loc"] for e in errors):
            return INVALID
        value_out, errors = _validate(tp, {k: v for k, v in value.items() if k not in bad})
        self._add_errors([e for e in errors if e["type"] != "missing"], tp, prefix, root)
        return INVALID if errors else value_out

    def _add_errors(self, errors: list[dict], tp: Any, prefix: Loc, root: Any) -> None:
        for error in errors:
            if root is None:
                self.add(*translate(error, tp, prefix))
            else:
                self.add(*translate({**error, "loc": prefix + tuple(error["loc"])}, root))

    def path(self, loc: Loc, value: str) -> Path:
        """A path written in the spec, resolved (see the class docstring)."""
        base = Path.cwd() if self.origin(loc) else self.spec_dir
        return (base / Path(value).expanduser()).resolve()

    def existing(self, loc: Loc, value: str, what: str, folder: bool = False) -> str | None:
        """The resolved path of an existing file (folder), else None and a problem."""
        p = self.path(loc, value)
        if not (p.is_dir() if folder else p.is_file()):
            self.add(loc, f"{what} '{value}' does not exist"
                     + (f" (looked for {p})" if str(p) != value else ""))
            return None
        return str(p)

    def ordered(self, raw: Any) -> list[tuple[str, str]]:
        """The problems in file order: the YAML's own first, then by where the field is in
        the file (keys not in the file after those that are), override syntax last."""
        return [(field_path(loc), msg) for loc, msg in
                sorted(self.problems, key=lambda p: _position(raw, p[0]))]


def _position(raw: Any, loc: Loc | str) -> tuple:
    if isinstance(loc, str):
        return (-1,) if loc.startswith("line ") or not loc else (1,)
    key, node = [0], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            key.append(list(node).index(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            key.append(part)
            node = node[part]
        else:
            key.append(1 << 30)
            break
    return tuple(key)
