"""The scalar types of spec values, and the words every problem with a value is reported in.

Field types (``Annotated`` aliases the section models are declared with):

- ``Int``: an integer; never a boolean, never a float (``32.0`` is refused: write ``32``);
- ``Float``: a finite number; integers are accepted (and stored as floats), and so are
  scientific-notation *strings* such as ``'1e-4'``, because PyYAML (YAML 1.1) reads ``1e-4``
  as a string (``1.0e-4`` is what YAML itself understands as a float);
- ``Bool``: ``true`` or ``false`` only; ``Str``: a string only;
- choices are ``Literal[...]`` fields; ranges are ``Field(ge=, gt=, le=, lt=)``.

The words value problems are reported in are ``methods.params``' (re-exported here): the
spec's problem list (``harness.spec.problems``) and method parameters
(``methods.params.param_problem``, so ``methods.create`` words a bad value exactly as
``validate`` does) both use them.
"""
from __future__ import annotations

from typing import Annotated, Any, Iterable

from pydantic import AllowInfNan, BeforeValidator, Strict
from pydantic_core import PydanticCustomError

from backbones.registry import did_you_mean  # noqa: F401  (re-exported)
from methods.params import (SCI, bounds_text, describe, expected, not_one_of,  # noqa: F401
                            null_refused, out_of_range, unknown_key, within)


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
