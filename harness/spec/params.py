"""Method parameters in a spec: one pydantic model per method class, built from its ``Param``
declarations (``methods.params.Param``) and cached.

Each field's value is checked by ``methods.params.param_problem``, the same function
``Explainer.__init__`` uses, so ``validate`` and ``methods.create`` word a bad value the same
way; the spec additionally converts scientific-notation strings ('1e-4', as YAML 1.1 reads
``1e-4``) for number parameters. Unknown parameters are refused with the closest name.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, ClassVar, Optional, Union

from pydantic import BeforeValidator, Field, create_model

from harness.spec.sections import Section
from harness.spec.values import did_you_mean, problem, sci_to_float


class MethodParams(Section):
    """Base of the generated parameter models; ``method`` is the method's registry key."""

    method: ClassVar[str] = ""

    @classmethod
    def unknown_key(cls, key: Any) -> str:
        accepted = cls.keys()
        return (f"unknown parameter '{key}' of {cls.method}.{did_you_mean(str(key), accepted)}"
                f" Accepted: {', '.join(accepted)}")


def declared(cls) -> dict[str, Any]:
    """The parameters a spec may set for method class ``cls`` (a learned method's
    ``checkpoint`` is a method-level key of the spec, not a parameter)."""
    return {k: p for k, p in cls.params.items()
            if not (cls.family == "learned" and k == "checkpoint")}


def _checked(name: str, param) -> Any:
    from methods.params import param_problem

    def check(value: Any) -> Any:
        if param.kind == "number":
            value = sci_to_float(value)
        message = param_problem(name, param, value)
        if message:
            raise problem(message)
        return value
    python_type = Union[param.types] if len(param.types) > 1 else param.types[0]
    if param.default is None:
        python_type = Optional[python_type]
    return Annotated[python_type, BeforeValidator(check)]


@lru_cache(maxsize=None)
def params_model(cls) -> type[MethodParams]:
    """The parameter model of the method class ``cls`` (fields: declared defaults)."""
    fields = {k: (_checked(k, p), Field(p.default, description=p.help))
              for k, p in declared(cls).items()}
    model = create_model(f"{cls.__name__}Params", __base__=MethodParams, **fields)
    model.method = cls.name
    return model
