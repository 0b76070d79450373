"""Typed method parameters, and the words every problem with a value is reported in.

``Param`` declares one parameter of a method (type, default, help, bounds, choices);
``param_problem`` is the one check of a value against it, used by ``Explainer.__init__``
(``methods.create`` refuses a bad value) and by the harness's spec (``validate`` reports it at
``methods[i].params.<name>``) with the same words. The message functions below are that
vocabulary; ``harness.spec`` uses them for every other field too.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from backbones.registry import did_you_mean

SCI = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")   # '1e-4', '5E-1', '2.5e3'


# -- the vocabulary ------------------------------------------------------------------------
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
    if isinstance(value, (list, tuple)):
        return "a list" if value else "an empty list"
    kind = type(value).__name__
    return f"{value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def expected(kind: str, value: Any) -> str:
    """'expected <kind>, got <value>' for kind int | number | bool | str | list | mapping."""
    if kind == "int":
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f" Write {int(value)}."
        elif isinstance(value, str) and SCI.match(value.strip()):
            hint = " Write the integer out in digits."
        return f"expected an integer, got {describe(value)}.{hint}"
    if kind == "number":
        if isinstance(value, float) and not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        return f"expected a number (int or float), got {describe(value)}."
    words = {"bool": "true or false", "str": "a string", "list": "a list",
             "mapping": "a mapping"}
    return f"expected {words[kind]}, got {describe(value)}"


def bounds_text(ge: float | None = None, gt: float | None = None, le: float | None = None,
                lt: float | None = None) -> str:
    """'>= 1', '> 0', 'in (0, 1]', ... for the given bounds ('' when there are none)."""
    lo, hi = (ge if gt is None else gt), (le if lt is None else lt)
    if lo is not None and hi is not None:
        return f"in {'[' if gt is None else '('}{lo:g}, {hi:g}{']' if lt is None else ')'}"
    if lo is not None:
        return f"{'>=' if gt is None else '>'} {lo:g}"
    if hi is not None:
        return f"{'<=' if lt is None else '<'} {hi:g}"
    return ""


def within(value: float, ge=None, gt=None, le=None, lt=None) -> bool:
    """Whether ``value`` satisfies the bounds."""
    return not ((ge is not None and value < ge) or (gt is not None and value <= gt)
                or (le is not None and value > le) or (lt is not None and value >= lt))


def out_of_range(value: Any, name: str, bounds: str) -> str:
    return f"{value!r} is out of range: {name} must be {bounds}"


def not_one_of(value: Any, choices: Iterable[Any]) -> str:
    choices = [str(c) for c in choices]
    if not isinstance(value, str):
        return f"expected one of {', '.join(choices)}, got {describe(value)}"
    return f"'{value}' is not one of {', '.join(choices)}.{did_you_mean(value, choices)}"


def null_refused(default: Any) -> str:
    shown = f" ({default!r})" if default is not None else ""
    return f"null is not allowed; remove the key for the default{shown}"


def unknown_key(key: Any, accepted: list[str], hint: str | None = None) -> str:
    """An unknown mapping key, with the closest accepted key (or ``hint``) and the list."""
    if not isinstance(key, str):
        return f"keys must be strings, got {describe(key)}"
    suggestion = f" Did you mean '{hint}'?" if hint else did_you_mean(key, accepted)
    return f"unknown key '{key}'.{suggestion} Accepted here: {', '.join(accepted)}"


# -- parameters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A typed method parameter: its type(s), default, help text, and the values it accepts.

    ``default=None`` means "unset" (e.g. RISE's mask count depends on the backbone): None is
    then accepted; elsewhere it is refused. ``ge``/``gt``/``le``/``lt`` bound a number,
    ``choices`` lists the accepted values. ``param_problem`` checks a value against this
    declaration, for ``Explainer.__init__`` and for specs (``harness.spec.params``) alike.
    """

    type: type | tuple
    default: Any
    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()

    @property
    def types(self) -> tuple:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    @property
    def kind(self) -> str:
        """'number' (float accepted), 'int', 'bool' or 'str'."""
        types = self.types
        if float in types:
            return "number"
        return "int" if int in types else "bool" if bool in types else "str"

    @property
    def bounds(self) -> dict[str, float]:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le),
                                  ("lt", self.lt)) if v is not None}

    def accepts(self) -> str:
        """What the parameter accepts, e.g. 'int >= 1, or null' or 'mean | black'."""
        if self.choices:
            text = " | ".join(map(str, self.choices))
        else:
            text = {"number": "number", "int": "int", "bool": "true | false"}.get(
                self.kind, "string")
            if self.bounds:
                text += " " + bounds_text(**self.bounds)
        return text + (", or null" if self.default is None else "")


def _type_ok(value: Any, param: Param) -> bool:
    kind = param.kind
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "number":
        return isinstance(value, (int, float))
    return isinstance(value, {"int": int, "bool": bool}.get(kind, param.types))


def param_problem(name: str, param: Param, value: Any) -> str | None:
    """What is wrong with ``value`` for the parameter ``name`` (None: nothing).

    The one check of a parameter value: ``Explainer.__init__`` raises it (prefixed with the
    method and parameter) and a spec reports it at ``methods[i].params.<name>``.
    """
    if value is None:
        return None if param.default is None else null_refused(param.default)
    if param.choices and not isinstance(value, bool) and value in param.choices:
        return None
    if param.choices:
        return not_one_of(value, param.choices)
    if not _type_ok(value, param):
        return expected(param.kind, value)
    if isinstance(value, float) and not math.isfinite(value):
        return expected("number", value)
    if param.bounds and not within(value, **param.bounds):
        return out_of_range(value, name, bounds_text(**param.bounds))
    return None
