"""The sections of a spec, each declared once as a pydantic model: train, data, evaluation,
statistics, sharding, tracking, storage and ray.

Every field carries its type (``harness.spec.values``), default, range (``ge``/``gt``/``le``/
``lt``), choices (``Literal``) and help (``description``); the defaults a spec resolves to,
the checks and the reference text (``harness.spec.reference``) are all read from here. A
rule that involves only one section is a validator on it; rules that need the file system,
the registries or several sections are in ``harness.spec.rules``.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator,
                      Field, PlainSerializer, Tag, WrapValidator, create_model, field_validator,
                      model_validator)

from harness.spec.values import Bool, Float, Int, Str, describe, problem

SAFE_TAG = re.compile(r"^[A-Za-z0-9_.\-/ ]+$")         # MLflow tag keys


class Section(BaseModel):
    """Base of every spec model: unknown keys refused, values never coerced between types.

    ``messages`` words problems specific to one field: {(field, pydantic error type):
    template}, the template formatted with ``found`` (the value, described) and ``value``
    (its repr). ``unknown_key`` words an unknown key (default: the generic message)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    messages: ClassVar[dict[tuple[str, str], str]] = {}

    @classmethod
    def keys(cls) -> list[str]:
        """The keys a spec may write in this section (aliases where a field has one)."""
        return [f.alias or n for n, f in cls.model_fields.items() if not f.exclude]

    @classmethod
    def unknown_key(cls, key: Any) -> str | None:
        """A message for an unknown ``key``, or None for the generic one."""
        return None


def as_plain(convert=None) -> tuple:
    """``Annotated`` metadata for a model-typed field that validates a mapping as the model
    (null: {}) but stores ``convert(validated)``, by default the plain dict of the keys it
    set (e.g. the partial ``train`` overrides of a method)."""
    convert = convert or (lambda m: m.model_dump(exclude_unset=True))
    return (WrapValidator(lambda value, handler: convert(handler(value))),
            BeforeValidator(lambda v: {} if v is None else v), PlainSerializer(lambda v: v))


# -- train -----------------------------------------------------------------------------------
SEARCHABLE = {"sweep": True}      # json_schema_extra of a field a sweep may search


class TrainSection(Section):
    """L-CAM head training (Ray Train); defaults are the paper's VGG-16 recipe
    (docs/protocol.md). A field marked ``SEARCHABLE`` may be a ``sweep.space`` key."""

    epochs: Int = Field(7, ge=1, description="passes over the training images",
                        json_schema_extra=SEARCHABLE)
    batch_size: Int = Field(64, ge=1, description="images per optimiser step (all workers)")
    lr: Float = Field(1e-4, gt=0, json_schema_extra=SEARCHABLE, description=(
        "SGD learning rate; write 1.0e-4 (YAML reads 1e-4 as a string; accepted)"))
    lr_decay: Float = Field(0.75, gt=0, le=1, description="lr factor per epoch",
                            json_schema_extra=SEARCHABLE)
    lr_decay_epochs: Int | None = Field(None, ge=1, description=(
        "decay the lr for this many epochs, then hold it (null: every epoch)"))
    lambda1: Float = Field(0.01, ge=0, description="weight of the TV term",
                           json_schema_extra=SEARCHABLE)
    lambda2: Float = Field(2.0, ge=0, description="weight of the area term",
                           json_schema_extra=SEARCHABLE)
    lambda3: Float = Field(1.5, ge=0, description="weight of the cross-entropy term",
                           json_schema_extra=SEARCHABLE)
    lambda4: Float = Field(0.3, gt=0, description="power of the area term",
                           json_schema_extra=SEARCHABLE)
    variant: Literal["paper", "reference"] = Field(
        "paper", description="the loss as in the paper, or as in the authors' code")
    labels: Literal["model", "ground_truth"] = Field(
        "model", description="train on the backbone's top-1, or on the true labels")
    workers: Int = Field(1, ge=1, description="Ray Train workers (DDP)")
    placement: Literal["pack", "spread"] = Field("pack", description=(
        "pack: workers on as few nodes as fit; spread: on different nodes where possible"))
    use_gpu: Bool = Field(False, description="one GPU per worker")
    cpus_per_worker: Float = Field(1.0, gt=0, description=(
        "CPUs per Ray Train worker (its torch threads and loader workers share them)"))
    loader_workers: Int | None = Field(None, ge=0, description=(
        "DataLoader processes decoding images per Train worker (null: 0 on CPU, "
        "cpus_per_worker - 1 and at least 2 on GPU)"))
    tf32: Bool = Field(False, description="TF32 matmuls/convolutions on GPU (off: float32)")
    deterministic: Bool = Field(False, description=(
        "deterministic algorithms: a resumed fit equals an unbroken one on GPU (slower)"))

    def loader_processes(self) -> int:
        """``loader_workers``, or its default for this device (see the field)."""
        if self.loader_workers is not None:
            return self.loader_workers
        return max(2, int(self.cpus_per_worker) - 1) if self.use_gpu else 0

    @property
    def lambdas(self) -> tuple[float, float, float, float]:
        return (self.lambda1, self.lambda2, self.lambda3, self.lambda4)

    @property
    def ce_only(self) -> bool:
        """The paper's starred ablation: no TV and no area term."""
        return self.lambda1 == 0 and self.lambda2 == 0

    def merged(self, overrides: dict[str, Any] | None) -> "TrainSection":
        """A copy with ``overrides`` (already checked keys of this section) applied."""
        return self.model_copy(update=overrides or {})


def partial_of(model: type[Section], name: str) -> type[Section]:
    """``model`` with every field optional and unset by default (types and ranges kept)."""
    fields = {n: (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation,
                  Field(None, description=f.description)) for n, f in model.model_fields.items()}
    partial = create_model(name, __base__=Section, **fields)
    partial.full = model            # for the default named in "null is not allowed" messages
    return partial


TrainOverrides = partial_of(TrainSection, "TrainOverrides")
TrainOverridesField = Annotated[TrainOverrides, *as_plain()]


# -- data ------------------------------------------------------------------------------------
class DataSection(Section):
    """Where images come from and which are evaluated."""

    kind: Literal["quickstart", "folder", "imagenet"] = Field(
        "quickstart", description=(
            "quickstart: generated on first use (offline); folder: any image-classification "
            "folder (docs/datasets.md); imagenet: a folder with ILSVRC's classes"))
    root: Str | None = Field(None, description=(
        "folder, imagenet: the folder with train/ and val/ (or a flat val/ and a list file)"))
    classes: Str | None = Field(None, description=(
        "a class-list file (one name a line, label order); default: root/classes.txt, else "
        "the sorted class folders"))
    name: Str | None = Field(None, description=(
        "the data set's name in tables and MLflow (default: the kind; folder: the folder's "
        "name)"))
    list_file: Str | None = Field(None, description=(
        "an evaluation list (Evaluation_2000.txt format) or builtin:Evaluation_2000"))
    random_count: Int | None = Field(None, ge=1, description=(
        "a seeded random draw of N evaluation images"))
    limit: Int | None = Field(None, ge=1, description=(
        "N evaluation images spread over the classes (the first of each, then the second, ...)"))
    train_limit: Int | None = Field(None, ge=1, description=(
        "N training images of the L-CAM heads, spread over the classes the same way"))
    on_bad_image: Literal["stop", "skip"] = Field(
        "stop", description="an unreadable image stops the run, or is skipped and counted")

    @model_validator(mode="after")
    def _one_selection(self) -> "DataSection":
        if self.list_file is not None and self.random_count is not None:
            raise problem("conflicts with data.list_file: the list names the images; remove "
                          "one of them", at=["random_count"])
        return self


# -- evaluation ------------------------------------------------------------------------------
class PresetSection(Section):
    """A custom AD/IC protocol (``harness.metrics.protocol.ProtocolPreset``); defaults = the paper."""

    soft: Bool = Field(True, description="soft (saliency-weighted) masking")
    fill: Literal["black", "mean"] = Field("black", description="removed pixels' colour")
    score: Literal["prob", "logit"] = Field("prob", description="the class score compared")


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        hint = f" To keep the top {value:g}%, write {value / 100:g}." if 1 < value <= 100 else ""
        raise problem(f"{value:g} is not a fraction in (0, 1].{hint}")
    return value


def _preset_value(value: Any, handler) -> str | dict:
    out = handler(value)
    if isinstance(out, PresetSection):
        out = out.model_dump()
        return "paper" if out == PresetSection().model_dump() else out
    return out


Fraction = Annotated[Float, AfterValidator(_fraction)]
Preset = Annotated[
    Union[Annotated[Literal["paper"], Tag("paper")], Annotated[PresetSection, Tag("custom")]],
    Discriminator(lambda v: "custom" if isinstance(v, (dict, PresetSection)) else "paper"),
    WrapValidator(_preset_value), PlainSerializer(lambda v: v)]


class EvaluationSection(Section):
    """AD/IC evaluation: kept fractions, batch size, protocol preset, overlays, precision."""

    messages: ClassVar = {
        ("preset", "literal_error"): "expected 'paper' or a mapping {{soft: true|false, fill: "
                                     "black|mean, score: prob|logit}}, got {found}",
        ("keep_fractions", "too_short"): "expected a non-empty list of fractions in (0, 1], "
                                         "got {found}",
        ("keep_fractions", "list_type"): "expected a non-empty list of fractions in (0, 1], "
                                         "got {found}"}

    keep_fractions: list[Fraction] = Field(
        default_factory=lambda: [1.0, 0.5, 0.15], min_length=1,
        description="fractions of the saliency kept (AD/IC at each)")
    batch_size: Int = Field(16, ge=1, description="images per explanation batch")
    preset: Preset = Field("paper", description=(
        "the protocol: paper, or {soft: true|false, fill: black|mean, score: prob|logit}"))
    overlays: Int = Field(8, ge=0, description="saliency overlays logged per run")
    autocast: Bool = Field(False, description=(
        "explain in bf16 (CPU) / fp16 (GPU); AD/IC still scored in float32"))
    channels_last: Bool = Field(False, description=(
        "backbone and images in channels_last memory format"))
    # Entries: a metric's name (harness.metrics.registry: deletion, insertion, road, plugins)
    # or {name: ..., <its settings>} (harness.spec.rules.check_metrics). The description is
    # README.md's generated spec reference line: change both together.
    metrics: list[Union[Str, dict[Str, Any]]] = Field(
        default_factory=lambda: ["ad_ic"], min_length=1, description=(
            "ad_ic (always) and the causal metrics deletion, insertion (T + 1 forwards each)"))
    causal_steps: Int = Field(224, ge=1, description=(
        "steps T of the deletion/insertion curves (224: RISE's 224 pixels a step at 224x224)"))
    causal_canvas: Literal["rise", "blur", "black", "mean"] = Field("rise", description=(
        "rise: deletion to the mean colour, insertion from a blur; or one canvas for both"))
    causal_batch_size: Int = Field(64, ge=1, description=(
        "perturbed images per forward of deletion/insertion"))
    tf32: Bool = Field(False, description="TF32 on GPU (off: float32; IC is a strict count)")
    deterministic: Bool = Field(False, description="deterministic algorithms (GPU: slower)")

    @field_validator("keep_fractions", "metrics")
    @classmethod
    def _distinct(cls, values: list) -> list:
        names = [v.get("name") if isinstance(v, dict) else v for v in values]
        for i, value in enumerate(names):
            if value in names[:i]:
                shown = f"{value:g}" if isinstance(value, float) else repr(value)
                raise problem(f"{shown} is listed twice", at=[i])
        return values

    @field_validator("metrics")
    @classmethod
    def _ad_ic_listed(cls, metrics: list) -> list:
        names = [m.get("name") if isinstance(m, dict) else m for m in metrics]
        if "ad_ic" not in names:
            raise problem("ad_ic is always computed (Table 1 is built on it): list it, e.g. "
                          f"[ad_ic, {', '.join(map(str, names))}]")
        return metrics

    def metric_names(self) -> list[str]:
        """The names of the listed metrics, in order."""
        return [m["name"] if isinstance(m, dict) else m for m in self.metrics]

    def metric_settings(self) -> tuple[tuple[str, dict], ...]:
        """(name, settings) of the entries written as a mapping with settings."""
        return tuple((m["name"], {k: v for k, v in m.items() if k != "name"})
                     for m in self.metrics if isinstance(m, dict))

    def protocol_preset(self):
        """The ``harness.metrics.protocol.ProtocolPreset`` this section names."""
        from harness.metrics.protocol import PAPER, ProtocolPreset
        return PAPER if self.preset == "paper" else ProtocolPreset(name="custom", **self.preset)


# -- statistics ------------------------------------------------------------------------------
class StatisticsSection(Section):
    """Error bars and significance (harness.metrics.statistics, docs/protocol.md section 9)."""

    resamples: Int = Field(10_000, ge=100, description=(
        "bootstrap resamples of the images (and sign flips of the paired tests)"))
    confidence: Float = Field(0.95, gt=0, lt=1, description="level of the intervals")
    method: Literal["bca", "percentile"] = Field("bca", description=(
        "bootstrap interval: bias-corrected and accelerated, or plain percentile"))
    seed: Int | None = Field(None, ge=0, description="default: the spec's seed")
    alpha: Float = Field(0.05, gt=0, lt=1, description=(
        "level of the paired tests (Holm-corrected); 'best' only below it"))
    half_width: Float = Field(1.0, gt=0, description=(
        "target +- half-width (AD/IC points) of the images-needed statement"))


# -- resources and records -------------------------------------------------------------------
class ShardingSection(Section):
    """How the evaluation is split into Ray tasks."""

    images_per_task: Int = Field(50, ge=1, description="evaluation images per Ray task")
    cpus_per_task: Float = Field(1.0, gt=0, description="CPUs per task")
    gpus_per_task: Float = Field(0.0, ge=0, description="GPUs per task (fractions share one)")
    max_retries: Int = Field(3, ge=0, description=(
        "retries of a shard that failed (a lost worker's shards are sent again apart)"))
    stall_timeout_s: Float = Field(21600.0, gt=0, description=(
        "the run fails if no task finishes in this many seconds (a lost node, say)"))


def _tag_key(key: str) -> str:
    if not SAFE_TAG.match(key):
        raise problem("tag keys may use only letters, digits, '_ - . / ' and spaces")
    return key


def _tag_value(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(f"tag values are strings, got {describe(value)}; quote it: '{value}'")
    return value


class TrackingSection(Section):
    """MLflow: the experiment, the store and extra tags of every run."""

    experiment: Str | None = Field(None, description="default: the spec name")
    uri: Str | None = Field(None, description=(
        "MLflow store; default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db"))
    tags: Annotated[dict[Annotated[Str, AfterValidator(_tag_key)],
                         Annotated[Any, AfterValidator(_tag_value)]],
                    BeforeValidator(lambda v: {} if v is None else v)] = Field(
        default_factory=dict, description="extra tags of every run (strings)")


class StorageSection(Section):
    """Where the results go: shards, heads, Ray Train and Tune checkpoints
    (``harness.data.storage``)."""

    uri: Str | None = Field(None, description=(
        "a folder, or a URI pyarrow reads (s3://bucket/prefix, gs://...); default: the cache "
        "folder"))
    cache: Str | None = Field(None, description=(
        "node-local folder for generated inputs (the same path on every node); default: "
        "HARNESS_CACHE_DIR, else a local storage.uri, else ./.harness-cache"))


#: Ray's runtime_env fields (ray.runtime_env.RuntimeEnv), the keys ray.runtime_env accepts.
RUNTIME_ENV_KEYS = ("conda", "config", "container", "env_vars", "excludes", "image_uri",
                    "java_jars", "pip", "py_executable", "py_modules", "uv",
                    "worker_process_setup_hook", "working_dir")


def _runtime_env(value: Any) -> dict:
    """Ray's runtime_env for every worker (e.g. the plugins to install: pip, py_modules)."""
    from harness.spec.values import unknown_key
    for key, item in value.items():
        if key not in RUNTIME_ENV_KEYS:
            raise problem(unknown_key(key, list(RUNTIME_ENV_KEYS)), at=[key])
        lists = key in ("py_modules", "excludes", "java_jars") or (key == "pip" and
                                                                 not isinstance(item, dict))
        if lists and not (isinstance(item, list) and all(isinstance(v, str) for v in item)):
            raise problem(f"expected a list of strings, got {describe(item)}", at=[key])
        if key == "env_vars" and not (isinstance(item, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in item.items())):
            raise problem("expected a mapping of names to strings (quote numbers)", at=[key])
    return value


class RaySection(Section):
    """Where Ray runs: a local Ray (address null) or a cluster."""

    address: Str | None = Field(None, description=(
        "null: local Ray, or the cluster inside a Ray job"))
    num_cpus: Int | None = Field(None, ge=1, description="CPUs of the local Ray")
    runtime_env: Annotated[dict[Str, Any], BeforeValidator(lambda v: {} if v is None else v),
                           AfterValidator(_runtime_env)] = Field(
        default_factory=dict, description=(
            "Ray's runtime_env for every worker, e.g. plugins: {pip: [...]}, {py_modules: "
            "[...]}"))

    @model_validator(mode="after")
    def _local_only(self) -> "RaySection":
        if self.address is not None and self.num_cpus is not None:
            raise problem("conflicts with ray.address: num_cpus sizes a local Ray only (a "
                          "cluster has its own resources); remove one", at=["num_cpus"])
        return self
