"""The scalar types of spec values, and the words every problem with a value is reported in.

Field types (``Annotated`` aliases the section models are declared with):

- ``Int``: an integer; never a boolean, never a float (``32.0`` is refused: write ``32``);
- ``Float``: a finite number; integers are accepted (and stored as floats), and so are
  scientific-notation *strings* such as ``'1e-4'``, because PyYAML (YAML 1.1) reads ``1e-4``
  as a string (``1.0e-4`` is what YAML itself understands as a float);
- ``Bool``: ``true`` or ``false`` only; ``Str``: a string only;
- choices are ``Literal[...]`` fields; ranges are ``Field(ge=, gt=, le=, lt=)``.

The message functions below are the one vocabulary of value problems: the spec's problem
list (``harness.spec.problems``) and method parameters (``methods.base.param_problem``, so
``methods.create`` words a bad value exactly as ``validate`` does) both use them.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Iterable

from pydantic import AllowInfNan, BeforeValidator, Strict
from pydantic_core import PydanticCustomError

from harness.registry import did_you_mean  # re-exported: the one place it is imported from

SCI = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")   # '1e-4', '5E-1', '2.5e3'


def sci_to_float(value: Any) -> Any:
    """'1e-4' (a string, as PyYAML reads it) -> 1e-4; any other value unchanged."""
    if isinstance(value, str) and SCI.match(value.strip()):
        return float(value)
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(sci_to_float), Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def problem(message: str, at: Iterable[str | int] = ()) -> PydanticCustomError:
    """A problem raised by our own validators: ``message`` verbatim, reported at the
    validated field's path plus ``at`` (e.g. the field a cross-field rule is about)."""
    return PydanticCustomError("spec", "{message}", {"message": message, "at": list(at)})


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
