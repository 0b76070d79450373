"""The metric contract: what a measure of saliency maps declares, and the batch it scores.

A metric is a subclass of ``Metric`` registered in ``harness.metrics.registry`` (built in,
or a plugin: an entry point of the group ``lcam_bench.metrics``, docs/plugins.md "Adding a
metric"). It declares, on the class:

- ``name`` (the registry key a spec writes in ``evaluation.metrics``), ``display_name``,
  ``paper``, ``version`` (bump it whenever its numbers can change: it is part of the shard
  identity of the rows it writes);
- ``Settings``: a pydantic model (a ``MetricSettings``) of its typed settings with their
  defaults and ranges; a spec writes them in the metric's entry (``{name: road,
  percentages: [0.1, 0.5]}``) and ``validate`` refuses a bad one at its field (exit 2);
- ``stage``: ``image`` (per-image columns written into the shard rows by ``score``) or
  ``cell`` (computed once per cell by the analysis job: the sanity check);
- ``always``: computed whatever the spec lists (AD/IC, localisation, sanity);
- ``reported``: every number it reports (``Reported``: the MLflow key, its direction
  ``lower`` or ``higher`` is better, its table header, the per-image column it is the mean
  of), from which the table's marks, the paired tests and the reports read the direction;
- ``columns()`` (the per-image columns ``score`` writes, settings included) and
  ``forward_passes(size)`` (the backbone forwards it costs per image, apart from the
  explanation's #FW; written per image as ``<name>_forward_passes`` by the metrics that
  cost forwards, and reported as ``FW_<name>``);
- ``identity()``: its part of the shard identity (its version and settings by default).

An instance holds its validated ``settings``; ``score(batch)`` returns the declared columns
for the images of a ``Batch``, ``aggregate(table)`` the run's numbers from the rows and
``terms(table)`` the per-image terms whose means they are (intervals, paired tests).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

DIRECTIONS = ("lower", "higher")
STAGES = ("image", "cell")
SAFE = re.compile(r"^[A-Za-z0-9_]+$")


class MetricSettings(BaseModel):
    """Base of a metric's settings: unknown keys refused (the accepted ones listed), values
    never coerced (but a list, as YAML writes one, is a tuple field's value), defaults
    validated too, frozen. ``problem`` words a refusal of a
    validator as the spec's problem list shows it."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True,
                              validate_default=True)    # a default out of its range: refused

    @classmethod
    def keys(cls) -> list[str]:
        """The keys a spec may write in the metric's entry (besides ``name``)."""
        return [f.alias or n for n, f in cls.model_fields.items() if not f.exclude]

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data):
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data

    @staticmethod
    def problem(message: str, at=()) -> PydanticCustomError:
        """A refusal reported verbatim at the field (plus ``at``, e.g. a list index)."""
        return PydanticCustomError("spec", "{message}", {"message": message, "at": list(at)})


@dataclass(frozen=True)
class Reported:
    """One number a metric reports. ``key``: the MLflow metric name, where ``{k}`` stands
    for a kept-fraction key (``AD_{k}``: ``AD_100``, ``AD_15``); ``direction``: ``lower`` or
    ``higher`` is better; ``header``: its table header (``{k}`` as in ``key``); ``column``:
    the per-image column it is the mean of (None: not a mean over images); ``table``: a
    Table 1 column when present; ``digits``: decimals shown; ``k_pattern``: what ``{k}``
    matches; ``label``: its word in the reports' prose ("AD, deletion: lower is better")."""

    key: str
    direction: str
    header: str
    column: str | None = None
    table: bool = True
    digits: int = 2
    k_pattern: str = r"[0-9.]+"          # what ``{k}`` stands for (a regular expression)
    label: str = ""                      # its word in prose ("AD", "deletion"); default: key

    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.key).replace(
            re.escape("{k}"), f"(?P<k>{self.k_pattern})") + "$")

    def match(self, key: str) -> re.Match | None:
        return self.pattern().match(key)

    def header_of(self, key: str) -> str:
        found = self.match(key)
        return self.header.format(k=found.group("k")) if found and "{k}" in self.header \
            else self.header


@dataclass
class Batch:
    """What a metric scores: a batch of images (B, 3, H, W) in [0, 1] on the backbone's
    device, their maps (B, H, W), the explained classes (B,), the backbone, and what the
    harness has at hand: ``logits`` (the clean pass), ``scores`` (AD/IC's
    ``BatchScores``, once the evaluator ran), ``dataset`` (the prepared images: paths and
    annotations) and ``indices`` (the images' positions in it; seeds per image)."""

    backbone: Any
    images: Any
    saliency: Any
    targets: Any
    logits: Any = None
    scores: Any = None
    dataset: Any = None
    indices: tuple[int, ...] | None = None

    def positions(self) -> list[int]:
        """Each image's position in the data set (its position in the batch without one)."""
        return list(self.indices) if self.indices is not None else list(range(len(self.images)))


class Metric:
    """Base of every metric (see the module docstring)."""

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    version: ClassVar[int] = 1
    Settings: ClassVar[type[MetricSettings]] = MetricSettings
    stage: ClassVar[str] = "image"
    always: ClassVar[bool] = False
    reported: ClassVar[tuple[Reported, ...]] = ()
    #: columns that may hold NaN, and why (the conformance kit accepts NaN only there)
    nan_columns: ClassVar[dict[str, str]] = {}

    def __init__(self, settings: MetricSettings | dict | None = None):
        if isinstance(settings, self.Settings):
            self.settings = settings
        else:
            self.settings = self.Settings.model_validate(dict(settings or {}))

    # -- declarations ---------------------------------------------------------------------
    def columns(self) -> tuple[str, ...]:
        """The per-image columns ``score`` writes (empty for a ``cell`` metric)."""
        return ()

    def forward_passes(self, size: tuple[int, int] | None = None) -> int:
        """Backbone forwards per image this metric costs (apart from the explanation)."""
        return 0

    @property
    def forward_column(self) -> str | None:
        """The per-image column of its forwards (``<name>_forward_passes``), when it costs
        forwards and writes one."""
        col = f"{self.name}_forward_passes"
        return col if col in self.columns() else None

    def identity(self) -> dict:
        """Its part of the shard identity of the rows it writes: version and settings."""
        return {"version": self.version, **self.settings.model_dump(mode="json")}

    # -- computing ------------------------------------------------------------------------
    def score(self, batch: Batch) -> dict[str, list[float]]:
        """The declared ``columns`` for the images of ``batch`` (one value each)."""
        raise NotImplementedError(f"{type(self).__name__}.score")

    def aggregate(self, table) -> dict[str, float]:
        """The run's numbers from the per-image rows (pyarrow table): the mean of each
        reported column present, and ``FW_<name>`` (its forwards per image)."""
        out = {}
        names = set(table.column_names)
        for rep in self.reported:
            if rep.column and "{k}" not in rep.key and rep.column in names:
                out[rep.key] = float(np.mean(table.column(rep.column).to_numpy()))
        fw = self.forward_column
        if fw and fw in names:
            out[f"FW_{self.name}"] = float(np.mean(table.column(fw).to_numpy()))
        return out

    def terms(self, table) -> dict[str, np.ndarray]:
        """Reported key -> its per-image terms (float64, NaN where undefined)."""
        out = {}
        names = set(table.column_names)
        for rep in self.reported:
            if rep.column and "{k}" not in rep.key and rep.column in names:
                values = table.column(rep.column).to_pylist()
                out[rep.key] = np.array([math.nan if v is None else v for v in values],
                                        dtype=np.float64)
        return out


def declaration_problems(cls: Any) -> list[str]:
    """Everything wrong with the declarations of the metric class ``cls`` ([] = usable)."""
    if not isinstance(cls, type) or not issubclass(cls, Metric) or cls is Metric:
        return [f"{cls!r} is not a subclass of harness.metrics.base.Metric"]
    problems = []
    if not isinstance(cls.name, str) or not SAFE.match(cls.name):
        problems.append(f"name: {cls.name!r} must be set to a key of letters, digits and '_'")
    for attr in ("display_name", "paper"):
        if not isinstance(getattr(cls, attr), str) or not getattr(cls, attr).strip():
            problems.append(f"{attr}: must be a non-empty string")
    if isinstance(cls.version, bool) or not isinstance(cls.version, int) or cls.version < 1:
        problems.append(f"version: {cls.version!r} must be an int >= 1")
    if cls.stage not in STAGES:
        problems.append(f"stage: {cls.stage!r} is not one of {', '.join(STAGES)}")
    if not (isinstance(cls.Settings, type) and issubclass(cls.Settings, MetricSettings)):
        problems.append("Settings: must be a subclass of harness.metrics.base.MetricSettings")
        return problems
    if not cls.reported or not all(isinstance(r, Reported) for r in cls.reported):
        problems.append("reported: must be a non-empty tuple of Reported")
        return problems
    for r in cls.reported:
        if r.direction not in DIRECTIONS:
            problems.append(f"reported {r.key}: direction {r.direction!r} is not one of "
                            f"{', '.join(DIRECTIONS)}")
        if not r.header.strip():
            problems.append(f"reported {r.key}: no table header")
    try:
        metric = cls()
    except Exception as err:                 # the defaults must be valid settings
        return problems + [f"Settings: its defaults are refused: {type(err).__name__}: {err}"]
    cols = metric.columns()
    if cls.stage == "image":
        if not cols or len(set(cols)) != len(cols):
            problems.append(f"columns(): {cols!r} must be distinct per-image column names")
        for r in cls.reported:
            if r.column and "{k}" not in r.key and r.column not in cols:
                problems.append(f"reported {r.key}: its column {r.column!r} is not among "
                                f"columns() {cols!r}")
    n = metric.forward_passes((16, 16))
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        problems.append(f"forward_passes: returned {n!r}, expected an int >= 0")
    return problems


__all__ = ["Batch", "DIRECTIONS", "Metric", "MetricSettings", "Reported",
           "declaration_problems"]
