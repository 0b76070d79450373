"""The whole spec: its backbone and method entries and the top-level ``Spec`` model.

``load_spec`` returns a ``Spec`` whose every default is filled in and every path is absolute
(the entries' names, weights, variants, parameters and ids are resolved by
``harness.spec.entries`` through the registries). The sections themselves are declared in
``harness.spec.sections``.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from harness.spec.sections import (DataSection, EvaluationSection, RaySection, Section,
                                   ShardingSection, StatisticsSection, StorageSection,
                                   TrackingSection, TrainSection, TrainOverridesField)
from harness.spec.sweep import SweepSection
from harness.spec.values import Int, Str, describe, problem, unknown_key

SCHEMA_VERSION = 1
BUILTIN_LISTS = ("Evaluation_2000",)       # 'builtin:<name>' list files (harness.data resolves)
SAFE_ID = re.compile(r"^[A-Za-z0-9_.\-/]+$")           # MLflow-safe run keys
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")          # spec names (also used in paths)
# The keys people write for a top-level section, and the section they mean.
ALIASES = {"metrics": "evaluation", "dataset": "data", "eval": "evaluation",
           "mlflow": "tracking", "model": "backbones", "models": "backbones",
           "backbone": "backbones", "method": "methods", "version": "schema",
           "shards": "sharding", "training": "train", "stats": "statistics"}
# Keys added after the fingerprints were pinned (tests/spec/test_spec_schema.py): left out of
# the fingerprint while they hold their default, so that existing specs keep theirs.
# section -> its later keys (None: the whole section is later).
LATER_KEYS = {"evaluation": ("metrics", "causal_steps", "causal_canvas", "causal_batch_size",
                             "tf32", "deterministic"),
              "train": ("tf32", "deterministic", "lr_decay_epochs", "placement",
                        "cpus_per_worker", "loader_workers"),
              "sharding": ("stall_timeout_s",),
              "data": ("classes", "name"),
              "statistics": None}


def _safe(pattern: re.Pattern, what: str):
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise problem(f"expected {what}, got {describe(value)}")
        return value
    return check


def _schema_version(value: Any) -> int:
    if value != SCHEMA_VERSION or isinstance(value, bool):
        raise problem(f"unsupported schema version {value!r}; this harness reads schema "
                      f"{SCHEMA_VERSION}")
    return value


SafeName = Annotated[Any, AfterValidator(_safe(SAFE_NAME, "a name of letters, digits, '_', "
                                                          "'-', '.'"))]
SafeId = Annotated[Any, AfterValidator(_safe(SAFE_ID, "an MLflow-safe id (letters, digits, "
                                                      "'_ - . /')"))]


class Entry(Section):
    """A list entry named by a registry key: a bare name or a mapping with 'name'."""

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, dict):
            raise problem(f"expected a mapping with at least 'name', got {describe(value)}")
        return value


class BackboneEntry(Entry):
    """One backbone: registry ``name``, resolved ``weights`` (a weights name, an absolute
    state_dict path, or None = random init), ``train`` overrides and an optional
    ``methods`` restriction (method ids)."""

    messages: ClassVar = {
        ("name", "missing"): "required: a backbone name",
        ("methods", "too_short"): "expected a non-empty list of method ids, got {found} "
                                  "(remove the key to run every method)",
        ("methods", "list_type"): "expected a non-empty list of method ids, got {found} "
                                  "(remove the key to run every method)"}

    name: Str = Field(description="registry key (python -m harness ls)",
                      examples=["tiny_vgg"])
    weights: Str | None = Field(None, examples=["embedded"], description=(
        "default: the backbone's own; a weights name, a state_dict path, or null (random)"))
    train: TrainOverridesField = Field(default_factory=dict, description=(
        "overrides of the train section for this backbone"))
    methods: list[Str] | None = Field(None, min_length=1, description=(
        "restrict this backbone to these method ids"))


class MethodEntry(Entry):
    """One method run: registry ``name``, unique ``id`` (the MLflow run key), resolved
    ``display_name`` and ``variant``, ``params`` (declared defaults filled in),
    ``checkpoint`` (absolute path or None) and ``train`` overrides (learned methods only).
    The default display name is the method's, plus '*' for a learned method whose merged
    train section has lambda1 == lambda2 == 0 (the paper's CE-only rows)."""

    messages: ClassVar = {("name", "missing"): "required: a method name"}

    name: Str = Field(description="registry key (python -m harness ls)",
                      examples=["scorecam"])
    id: SafeId | None = Field(None, description="unique run key (default: name), e.g. "
                                                "lcam_fm_ce")
    display_name: Str | None = Field(None, description=(
        "name in tables (default: the method's; '*' marks CE-only L-CAM)"))
    variant: Str | None = Field(None, description="default: the method's first (paper)")
    params: Annotated[dict[Any, Any], BeforeValidator(lambda v: {} if v is None else v)] = \
        Field(default_factory=dict, examples=[{"batch_size": 64}],
              description="the method's parameters (listed below)")
    checkpoint: Str | None = Field(None, description=(
        "learned methods: a trained head instead of training"))
    train: TrainOverridesField = Field(default_factory=dict, description=(
        "learned methods: train overrides (lambda1: 0, lambda2: 0 = CE only)"))

    @property
    def family(self) -> str:
        import methods
        return methods.method_class(self.name).family

    @property
    def learned(self) -> bool:
        return self.family == "learned"


class Spec(Section):
    """A validated benchmark spec with every default resolved (``load_spec`` returns it)."""

    messages: ClassVar = {
        ("schema", "missing"): f"required: add 'schema: {SCHEMA_VERSION}' as the first line",
        ("backbones", "missing"): "required: a non-empty list of backbones",
        ("methods", "missing"): "required: a non-empty list of methods",
        ("sweep", "missing"): "required in a sweep spec: add a 'sweep:' section with a search "
                              "'space' (see jobs/sweeps/lcam_quickstart.yaml)"}

    schema_version: Annotated[Int, AfterValidator(_schema_version)] = Field(
        alias="schema", examples=[SCHEMA_VERSION], description="the spec format version")
    name: SafeName | None = Field(None, description="default: the file name")
    seed: Int = Field(0, description="seeds every random draw (data, masks, training)")
    backbones: list[BackboneEntry] = Field(min_length=1, description=(
        "the classifiers to explain, by registry key"))
    data: DataSection = Field(default_factory=DataSection)
    methods: list[MethodEntry] = Field(min_length=1, description=(
        "the methods to run, in table order"))
    train: TrainSection = Field(default_factory=TrainSection, description=(
        "L-CAM heads (Ray Train)"))
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    statistics: StatisticsSection = Field(default_factory=StatisticsSection)
    sharding: ShardingSection = Field(default_factory=ShardingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    ray: RaySection = Field(default_factory=RaySection)
    sweep: SweepSection | None = Field(None, description=(
        "sweep specs only (python -m harness tune)"))
    path: str | None = Field(None, exclude=True, description="the spec file, as given")

    @classmethod
    def unknown_key(cls, key: Any) -> str | None:
        if key == "sweep":
            return "'sweep' belongs in a sweep spec: run it with 'python -m harness tune SPEC'"
        if key in ALIASES:
            return unknown_key(key, cls.keys(), hint=ALIASES[key])
        return None

    @classmethod
    def keys(cls) -> list[str]:
        return [k for k in super().keys() if k != "sweep"]

    @property
    def schema(self) -> int:            # ``schema`` itself is a (deprecated) BaseModel name
        return self.schema_version

    def train_for(self, backbone: BackboneEntry, method: MethodEntry) -> TrainSection:
        """The train section for one pair: global, then backbone, then method overrides."""
        return self.train.merged(backbone.train).merged(method.train)

    def pairs(self) -> list[tuple[BackboneEntry, MethodEntry]]:
        """Every (backbone, method) run, honouring each backbone's ``methods`` restriction."""
        return [(b, m) for b in self.backbones for m in self.methods
                if b.methods is None or m.id in b.methods]

    def method(self, method_id: str) -> MethodEntry:
        return next(m for m in self.methods if m.id == method_id)

    def backbone(self, name: str) -> BackboneEntry:
        return next(b for b in self.backbones if b.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-dumpable data (loads back to an equal spec)."""
        out = self.model_dump(mode="python", by_alias=True)
        if out["sweep"] is None:
            del out["sweep"]
        return out

    def fingerprint(self) -> str:
        """A stable hash of the resolved spec, excluding ``tracking``, ``storage`` and ``ray``
        (where the results are recorded, kept and computed, not what they are)."""
        data = self.to_dict()
        for key in ("tracking", "storage", "ray"):
            data.pop(key)
        _drop_later_defaults(data)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _drop_later_defaults(data: dict[str, Any]) -> None:
    """Remove from the resolved ``data`` the ``LATER_KEYS`` that hold their default."""
    defaults = {"evaluation": EvaluationSection().model_dump(mode="python"),
                "train": TrainSection().model_dump(mode="python"),
                "sharding": ShardingSection().model_dump(mode="python"),
                "data": DataSection().model_dump(mode="python"),
                "statistics": StatisticsSection().model_dump(mode="python")}
    for section, keys in LATER_KEYS.items():
        if keys is None:
            if data.get(section) == defaults[section]:
                data.pop(section, None)
            continue
        for key in keys:
            if data.get(section, {}).get(key, object()) == defaults[section][key]:
                del data[section][key]
