"""The resolved benchmark spec: ``SpecError`` and the ``*Spec`` dataclasses.

What ``harness.spec.load_spec`` returns: every default filled in, every path absolute. Each
dataclass field's default is the spec file's default for that key. Nothing here reads or
checks a file (that is ``harness.spec``); import these names from ``harness.spec``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from harness.errors import UserError

SCHEMA_VERSION = 1


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


# -- the resolved spec ---------------------------------------------------------------------
@dataclass
class TrainSpec:
    """L-CAM head training (protocol.md section 3); defaults are the paper's VGG-16 recipe."""

    epochs: int = 7
    batch_size: int = 64
    lr: float = 1e-4
    lr_decay: float = 0.75
    lambda1: float = 0.01
    lambda2: float = 2.0
    lambda3: float = 1.5
    lambda4: float = 0.3
    variant: str = "paper"
    labels: str = "model"
    workers: int = 1
    use_gpu: bool = False

    @property
    def lambdas(self) -> tuple[float, float, float, float]:
        return (self.lambda1, self.lambda2, self.lambda3, self.lambda4)

    @property
    def ce_only(self) -> bool:
        """The paper's starred ablation: no TV and no area term."""
        return self.lambda1 == 0 and self.lambda2 == 0

    def merged(self, overrides: dict[str, Any] | None) -> "TrainSpec":
        return dataclasses.replace(self, **(overrides or {}))


@dataclass
class BackboneSpec:
    """One backbone: registry ``name``, resolved ``weights`` (name, absolute path or None),
    ``train`` overrides (partial TrainSpec keys) and an optional ``methods`` id restriction."""

    name: str
    weights: str | None
    train: dict[str, Any] = field(default_factory=dict)
    methods: list[str] | None = None


@dataclass
class MethodSpec:
    """One method run: registry ``name``, unique ``id`` (the MLflow run key), resolved
    ``display_name`` and ``variant``, ``params`` (defaults filled from the method class),
    ``checkpoint`` (absolute path or None) and ``train`` overrides (learned methods only).
    The default display name is the method's, plus '*' for a learned method whose global +
    method train block has lambda1 == lambda2 == 0 (the paper's CE-only rows)."""

    name: str
    id: str
    display_name: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        import methods
        return methods.method_class(self.name).family

    @property
    def learned(self) -> bool:
        return self.family == "learned"


@dataclass
class DataSpec:
    """Where images come from and which are evaluated."""

    kind: str = "quickstart"
    root: str | None = None
    list_file: str | None = None
    random_count: int | None = None
    limit: int | None = None
    train_limit: int | None = None
    on_bad_image: str = "stop"


@dataclass
class EvalSpec:
    """AD/IC evaluation: kept fractions, batch size, protocol preset, overlay count.

    ``preset`` is ``'paper'`` or a mapping {soft, fill, score} (``protocol_preset()`` gives
    the ``harness.protocol.ProtocolPreset``)."""

    keep_fractions: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.15])
    batch_size: int = 16
    preset: str | dict = "paper"
    overlays: int = 8
    autocast: bool = False         # explanations under autocast (bf16 on CPU, fp16 on GPU)
    channels_last: bool = False    # backbone and images in channels_last memory format

    def protocol_preset(self):
        from harness.protocol import PAPER, ProtocolPreset
        return PAPER if self.preset == "paper" else ProtocolPreset(name="custom", **self.preset)


@dataclass
class ShardSpec:
    """How evaluation is split into Ray tasks."""

    images_per_task: int = 50
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3


@dataclass
class TrackingSpec:
    """MLflow: experiment name (default: the spec name), store ``uri`` (default:
    ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``) and extra tags."""

    experiment: str | None = None
    uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class StorageSpec:
    """Where generated data, weights, heads, shards and Ray results go: ``uri`` a folder
    (default: ``HARNESS_CACHE_DIR``, else ``./.harness-cache``)."""

    uri: str | None = None


@dataclass
class RaySpec:
    """``address`` None = local Ray (or the cluster when run inside a Ray job)."""

    address: str | None = None
    num_cpus: int | None = None


@dataclass
class Spec:
    """A validated benchmark spec with every default resolved."""

    schema: int
    name: str
    seed: int
    backbones: list[BackboneSpec]
    data: DataSpec
    methods: list[MethodSpec]
    train: TrainSpec
    evaluation: EvalSpec
    sharding: ShardSpec
    tracking: TrackingSpec
    ray: RaySpec
    storage: StorageSpec = field(default_factory=StorageSpec)
    path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)   # extra sections (e.g. ``sweep``)

    def train_for(self, backbone: BackboneSpec, method: MethodSpec) -> TrainSpec:
        """The train block for one pair: global, then backbone, then method overrides."""
        return self.train.merged(backbone.train).merged(method.train)

    def pairs(self) -> list[tuple[BackboneSpec, MethodSpec]]:
        """Every (backbone, method) run, honouring each backbone's ``methods`` restriction."""
        return [(b, m) for b in self.backbones for m in self.methods
                if b.methods is None or m.id in b.methods]

    def method(self, method_id: str) -> MethodSpec:
        return next(m for m in self.methods if m.id == method_id)

    def backbone(self, name: str) -> BackboneSpec:
        return next(b for b in self.backbones if b.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-dumpable data (loads back to an equal spec)."""
        out = dataclasses.asdict(self)
        out.pop("path")
        extras = out.pop("extras")
        for key, value in extras.items():
            out[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def fingerprint(self) -> str:
        """A stable hash of the resolved spec, excluding ``tracking``, ``storage`` and ``ray``
        (where the results are recorded, kept and computed, not what they are)."""
        data = self.to_dict()
        for key in ("tracking", "storage", "ray"):
            data.pop(key)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
