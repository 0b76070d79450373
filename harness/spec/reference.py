"""The spec reference, generated from the models: every section, key, default, range and
help text as annotated YAML (README's "Spec reference" is this text; a test keeps them
equal), and the method parameter table of ``python -m harness ls``.

Each line is ``key: <default or example>`` with a comment: 'required' where the key is,
the accepted values (choices, range) and the field's description.
"""
from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel

from harness.spec.params import declared
from harness.spec.problems import bounds_of, literal_choices, unwrap
from harness.spec.schema import MethodEntry, Spec
from harness.spec.sweep import Distribution, searchable
from harness.spec.values import bounds_text

COMMENT_AT = 31            # the column comments start at


def spec_reference() -> str:
    """The annotated YAML reference of a spec (see the module docstring)."""
    lines: list[str] = []
    _model_lines(Spec, 0, lines)
    return "\n".join(lines) + "\n"


def method_params_rows(names: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(method name, its variants, its parameters with defaults and accepted values) for
    every built-in method (or ``names``, plugins too), e.g. ('rise', 'paper, reference',
    'n_masks=null (int >= 1, or null), ...')."""
    import methods
    rows = []
    for name in methods.names() if names is None else names:
        cls = methods.method_class(name)
        params = ", ".join(f"{k}={_yaml(p.default)} ({p.accepts()})"
                           for k, p in declared(cls).items())
        rows.append((name, ", ".join(cls.variants), params or "-"))
    return rows


# -- lines -----------------------------------------------------------------------------------
def _line(lines: list[str], text: str, comment: str) -> None:
    if comment:
        text = f"{text:<{COMMENT_AT - 1}} # {comment}" if len(text) < COMMENT_AT - 1 \
            else f"{text}  # {comment}"
    lines.append(text)


def _model_lines(model: type[BaseModel], indent: int, lines: list[str],
                 first_prefix: str | None = None) -> None:
    """One line per field of ``model`` (nested models and entry lists below their key);
    ``first_prefix`` ('- ') starts a list entry."""
    for i, (name, field) in enumerate(model.model_fields.items()):
        if field.exclude:
            continue
        key = field.alias or name
        pad = " " * indent if first_prefix is None or i else " " * (indent - 2) + first_prefix
        tp = unwrap(field.annotation, [])
        nested, item = _nested(tp)
        comment = _comment(field, tp, nested)
        if nested is not None:
            _line(lines, f"{pad}{key}:", comment)
            _model_lines(nested, indent + 2, lines)
        elif item is not None:
            _line(lines, f"{pad}{key}:", comment)
            _model_lines(item, indent + 4, lines, first_prefix="- ")
            if issubclass(item, MethodEntry):
                _methods_lines(indent + 4, lines)
        else:
            _line(lines, f"{pad}{key}: {_yaml(_shown(field))}", comment)


def _nested(tp: Any) -> tuple[type | None, type | None]:
    """(the model of a nested section, the model of a list's entries) of a field type;
    partial train overrides and search distributions are shown on one line."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list and _is_model(args[0]):
        return None, args[0]
    model = tp if _is_model(tp) else args[0] if len(args) == 1 and _is_model(args[0]) else None
    if model is None or model.__name__ == "TrainOverrides" or issubclass(model, Distribution):
        return None, None
    return model, None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _shown(field) -> Any:
    if field.examples:
        return field.examples[0]
    if field.is_required():
        return None
    return field.get_default(call_default_factory=True)


def _comment(field, tp: Any, nested: type | None) -> str:
    """'required', the accepted values, the description; a section's first doc line."""
    parts = ["required"] if field.is_required() else []
    choices, bounds = literal_choices(tp), bounds_of(field.metadata)
    dist = next((a for a in typing.get_args(tp) if _is_model(a)
                 and issubclass(a, Distribution)), None)
    if dist is not None:              # a search-space key: its distributions, its range
        choices, bounds = (" | ".join(dist.keys()),), bounds_of(searchable()[dist.subject].metadata)
    if choices:
        parts.append(" | ".join(map(str, choices)))
    if bounds:
        parts.append(bounds_text(**bounds))
    doc = field.description
    if doc is None and nested is not None and nested.__doc__:
        doc = nested.__doc__.strip().split("\n\n")[0].split(". ")[0].replace("\n", " ")
        doc = (doc[0].lower() if doc[1:2].islower() else doc[0]) + doc[1:].rstrip(".")
    if dist is not None:
        doc = None                    # the train field's own line describes it
    return "; ".join(parts + ([doc] if doc else []))


def _methods_lines(indent: int, lines: list[str]) -> None:
    """The variants and parameters of every registered method, as comments."""
    import methods
    pad = " " * indent
    lines.append(f"{pad}# variants (the first is the default) and params of each method:")
    for name in methods.names():
        cls = methods.method_class(name)
        params = declared(cls)
        lines.append(f"{pad}#   {name}: {' | '.join(cls.variants)}"
                     + ("" if params else "; no params"))
        for key, p in params.items():
            _line(lines, f"{pad}#     {key}: {_yaml(p.default)}", f"{p.accepts()}; {p.help}")


# -- YAML values -----------------------------------------------------------------------------
def _yaml(value: Any) -> str:
    """A value as YAML flow text (floats such that YAML reads them back as floats)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value and not 1e-3 <= abs(value) < 1e6:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)
