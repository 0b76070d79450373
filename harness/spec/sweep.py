"""The ``sweep`` section of a sweep spec (a benchmark spec plus a search space; ``harness tune``).

```yaml
sweep:
  backbone: tiny_vgg            # default: the spec's first backbone
  method: lcam_img              # a learned method id of the spec (default: the first learned)
  space:                        # keys: the searchable train fields (lambda1..4, lr, lr_decay, epochs)
    lambda1: {loguniform: [0.001, 0.1]}
    lr: {choice: [0.01, 0.05]}
    epochs: {grid: [2, 3]}      # integers: choice or grid only
  num_samples: 4                # samples of the random part (grid values multiply it)
  metric: val_loss              # val_loss | val_ce | AD_<k> | IC_<k> (k = 100, 50, 15 ...)
  mode: min                     # default: max for IC_*, min otherwise
  scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: none}
  validation_images: 100        # held out of the training split (disjoint from evaluation)
  cpus_per_trial: 1
  gpus_per_trial: 0
```

The search space is derived from ``TrainSection``: a field marked searchable is a key, and
each value of its distribution has that field's type and range (``lr: {choice: [0]}`` is
refused because lr must be > 0). Integer fields take ``choice`` or ``grid`` only.

**The metric must not be one the searched weights can lower by themselves.** ``val_loss`` is
l1 TV + l2 AV + l3 CE (AV = mean(S^l4)): a trial lowers it by shrinking lambda1-3 (or by
raising lambda4, S < 1), whatever its maps look like; ``val_ce`` is lowest when lambda1 and
lambda2 are 0 (a mask of ones leaves the network's own prediction) or lambda3 is large. A
sweep that optimises one of them while searching such a weight (``LOSS_WEIGHTS``) is refused:
optimise a measure of the explanations on the held-out images instead (``AD_<k>``,
``IC_<k>``: the benchmark's own Average Drop and Increase in Confidence at k% kept).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, create_model, model_serializer, model_validator

from harness.spec.sections import Section, TrainSection, as_plain
from harness.spec.values import Float, Int, Str, did_you_mean, problem

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "grid")
METRIC = re.compile(r"^(val_loss|val_ce|(AD|IC)_\d+(\.\d+)?)$")
#: the training-loss metrics, and the space keys that lower them by themselves (see above)
LOSS_WEIGHTS = {"val_loss": ("lambda1", "lambda2", "lambda3", "lambda4"),
                "val_ce": ("lambda1", "lambda2", "lambda3")}


class Distribution(Section):
    """One search distribution of a ``space`` key: exactly one of ``choice``, ``grid``
    (values to try) or ``uniform``, ``loguniform`` ([low, high]). Subclasses are generated
    per searchable train field (``subject``), with that field's value type."""

    subject: ClassVar[str] = ""

    @classmethod
    def unknown_key(cls, key: Any) -> str | None:
        if key in DISTRIBUTIONS:
            return f"{cls.subject} takes choice or grid (integers)"
        return (f"unknown distribution '{key}'.{did_you_mean(str(key), cls.keys())} Use one "
                f"of: {', '.join(cls.keys())}")

    @model_validator(mode="after")
    def _one_range(self) -> "Distribution":
        given = [k for k in self.keys() if getattr(self, k) is not None]
        if len(given) != 1:
            raise problem(f"expected exactly one of {', '.join(self.keys())}, got "
                          f"{', '.join(given) or 'none'}")
        kind, values = given[0], getattr(self, given[0])
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or values[0] >= values[1]:
                raise problem("expected [low, high] with low < high", at=[kind])
            if kind == "loguniform" and values[0] <= 0:
                raise problem("loguniform needs low > 0", at=[kind])
        return self

    def as_dict(self) -> dict[str, list]:
        return {k: getattr(self, k) for k in self.keys() if getattr(self, k) is not None}


def _distribution(name: str, field) -> type[Distribution]:
    value = Annotated[(field.annotation, *field.metadata)]
    values = (list[value] | None, Field(None, min_length=1))
    kinds = ("choice", "grid") if field.annotation is int else DISTRIBUTIONS
    model = create_model(f"{name.capitalize()}Distribution", __base__=Distribution,
                         **{k: values for k in kinds})
    model.subject = name
    return model


def searchable() -> dict[str, Any]:
    """The train fields a sweep may search: {name: FieldInfo}."""
    return {n: f for n, f in TrainSection.model_fields.items()
            if (f.json_schema_extra or {}).get("sweep")}


class Space(Section):
    """Base of the generated ``SearchSpace``: at least one key."""

    @model_validator(mode="after")
    def _not_empty(self) -> "Space":
        if not self.model_fields_set:
            raise problem("expected a non-empty mapping of parameters to distributions, "
                          "e.g. {lr: {loguniform: [1.0e-3, 1.0e-1]}}")
        return self


SearchSpace = create_model("SearchSpace", __base__=Space, **{
    n: (_distribution(n, f) | None, Field(None, description=f.description))
    for n, f in searchable().items()})
SearchSpace.messages = {(n, "model_type"): "expected a mapping such as {{loguniform: [low, "
                        "high]}} or {{choice: [...]}}, got {found}" for n in searchable()}


def _space_dict(space: Space) -> dict[str, dict[str, list]]:
    """{key: {distribution: values}} of the keys given, in the train section's order."""
    return {k: getattr(space, k).as_dict() for k in type(space).model_fields
            if getattr(space, k) is not None}


def _metric(value: str) -> str:
    """A metric name the trials report: AD/IC percents are written as the trials name them
    (``harness.metrics.protocol.fraction_key``: AD_15, IC_2.5), else Tune never finds them."""
    if not METRIC.match(value):
        raise problem(f"{value!r} is not val_loss, val_ce, AD_<percent> or IC_<percent> "
                      "(e.g. AD_15)")
    if value.startswith(("AD_", "IC_")):
        from harness.metrics.protocol import fraction_key
        kind, percent = value.split("_", 1)
        canonical = f"{kind}_{fraction_key(float(percent) / 100)}"
        if not 0 < float(percent) <= 100:
            raise problem(f"{value!r}: the percent kept must be in (0, 100]")
        if canonical != value:
            raise problem(f"{value!r} is not the name the trials report: write {canonical}")
    return value


class SchedulerSection(Section):
    """The trial scheduler: ASHA (stops bad trials early) or none (FIFO)."""

    name: Literal["asha", "none"] = Field("asha", description="none: FIFO, no early stop")
    grace_period: Int = Field(1, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: Int = Field(2, ge=2, description="ASHA keeps 1 / reduction_factor")

    @model_serializer(mode="wrap")
    def _as_written(self, handler) -> dict:
        """The name and the keys the spec wrote (keeps the resolved spec's fingerprint)."""
        out = handler(self)
        return {k: v for k, v in out.items() if k == "name" or k in self.model_fields_set}


class SweepSection(Section):
    """A validated ``sweep`` section (see the module docstring)."""

    messages: ClassVar = {("space", "missing"): "required: a search space, e.g. {{lr: "
                                                "{{loguniform: [1.0e-3, 1.0e-1]}}}}"}

    backbone: Str | None = Field(None, description="default: the spec's first backbone")
    method: Str | None = Field(None, description=(
        "a learned method id of the spec (default: the first learned)"))
    space: Annotated[SearchSpace, *as_plain(_space_dict)] = Field(
        description="searchable train fields -> {choice|grid|uniform|loguniform: [...]}")
    num_samples: Int = Field(4, ge=1, description="samples of the random part")
    metric: Annotated[Str, AfterValidator(_metric)] = Field(
        "val_loss", description=("AD_<percent> | IC_<percent>, e.g. AD_15 | val_loss | val_ce "
                                 "(not while searching their weights)"))
    mode: Literal["min", "max"] | None = Field(None, description=(
        "default: max for IC_*, min otherwise"))
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    validation_images: Int = Field(100, ge=1, description=(
        "held out of the training split (disjoint from evaluation)"))
    cpus_per_trial: Float = Field(1.0, gt=0, description="CPUs per trial")
    gpus_per_trial: Float = Field(0.0, ge=0, description="GPUs per trial")

    @model_validator(mode="after")
    def _metric_not_weighted_by_the_search(self) -> "SweepSection":
        searched = [k for k in LOSS_WEIGHTS.get(self.metric, ()) if k in self.space]
        if searched:
            what = ("the training loss, lambda1 TV + lambda2 AV + lambda3 CE with AV = "
                    "mean(S^lambda4)" if self.metric == "val_loss" else
                    "the cross-entropy of the masked input, lowest without TV and area terms")
            raise problem(
                f"{self.metric} is {what}: searching {', '.join(searched)} would lower it by "
                "changing the weights, not by better maps. Optimise a measure of the "
                "explanations on the held-out images instead (metric: AD_<percent> or "
                f"IC_<percent>, e.g. AD_15), or do not search {', '.join(searched)}",
                at=["metric"])
        return self

    def fraction(self) -> float | None:
        """The kept fraction of an AD/IC metric (e.g. AD_15 -> 0.15), else None."""
        if self.metric.startswith(("AD_", "IC_")):
            return float(self.metric.split("_", 1)[1]) / 100
        return None

    def resolved(self, backbones: list[str], learned: list[str], report) -> "SweepSection":
        """The section with its defaults that depend on the spec filled in (see
        ``check_references``)."""
        backbone, method = check_references(self.backbone, self.method, backbones, learned,
                                            report)
        mode = self.mode or ("max" if self.metric.startswith("IC_") else "min")
        return self.model_copy(update={"backbone": backbone, "method": method, "mode": mode})


def check_references(backbone: str | None, method: str | None, backbones: list[str],
                     learned: list[str], report) -> tuple[str | None, str | None]:
    """The sweep's backbone and method (default: the spec's first backbone, its first
    learned method id); one the spec lacks goes to ``report.add(loc, message)``."""
    backbone = backbone if backbone is not None else next(iter(backbones), None)
    method = method if method is not None else next(iter(learned), None)
    if method is None:
        report.add(("sweep", "method"), "the spec has no learned method (lcam_fm, "
                   "lcam_img) to tune")
    elif method not in learned:
        report.add(("sweep", "method"), f"'{method}' is not a learned method id of this "
                   f"spec; choose one of: {', '.join(learned) or '(none)'}")
    if backbone not in backbones:
        report.add(("sweep", "backbone"), f"'{backbone}' is not a backbone of this spec; "
                   f"choose one of: {', '.join(backbones) or '(none)'}")
    return backbone, method
