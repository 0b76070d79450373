"""The plan of a benchmark: everything a run will compute, derived from the spec alone.

``plan(spec) -> Plan`` is a pure function: it reads the spec and the registries' metadata and
touches no Ray, MLflow, accelerator or data, so ``python -m harness validate`` runs it and
prints it (``describe``). The run's stages (``harness.pipeline.runner``) then execute it:

- ``Plan.cells``: every backbone x method with its resolved parameters, variant, the nominal
  forward passes per explanation (#FW, docs/protocol.md section 2) and, for a learned method,
  where its head comes from (a given checkpoint, or a ``HeadPlan`` to train);
- ``Plan.head_groups``: the heads trained together, one Ray Train fit per group (same
  backbone, images, batch size, workers and device: the clean forward runs once per batch
  for all of them);
- ``Plan.images``: which images each backbone is evaluated on (``ImageSet``, the arguments
  of ``harness.data.images.build_dataset``), ``Plan.evaluation``: the protocol and the
  sharding. The shards themselves (``harness.pipeline.shards.shard_jobs``) are laid out once
  the images are known (a ``skip``ped bad image changes their number) and their cache
  identities include what only the run resolves: the weights' and heads' content hashes
  and the evaluation list's hash.

``TrainConfig`` (``methods.lcam_train``) is built here once per head, from the spec's train
block merged global < backbone < method; ``harness tune`` builds its trials' configs with
the same ``train_config`` function.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backbones
import methods
from harness.metrics.protocol import PAPER, ProtocolPreset
from harness.metrics.statistics import StatisticsSettings
from methods.lcam_train import TrainConfig, recipe_text

DEFAULT_INPUT_SIZE = (224, 224)    # torchvision classifiers; registry entries may say otherwise


@dataclass(frozen=True)
class ImageSet:
    """Which images, and how prepared: the arguments of ``harness.data.images.build_dataset``."""

    kind: str
    split: str
    input_size: tuple[int, int]
    root: str | None = None
    list_file: str | None = None
    random_count: int | None = None
    limit: int | None = None
    seed: int = 0
    on_bad_image: str = "stop"
    train: bool = False
    resize: int | None = None          # the weights' own (torchvision families), else the rule
    interpolation: str = "bilinear"
    classes: str | None = None         # a class-list file (harness.data.folders)
    name: str | None = None            # the data set's name (tables, MLflow)

    def build(self):
        """The data set (reads the image list; evaluation sets under ``skip`` decode too)."""
        from harness.data.images import build_dataset
        return build_dataset(**dataclasses.asdict(self))

    def identity(self) -> dict:
        """What determines these images, for cache names: the fields, without the weights'
        preprocessing when it is the default (existing heads keep their names)."""
        out = dataclasses.asdict(self)
        for key, default in (("resize", None), ("interpolation", "bilinear"), ("classes", None),
                             ("name", None)):
            if out[key] == default:
                del out[key]
        return out

    def expected_count(self) -> int | None:
        """How many images the set will hold, when the spec alone tells (else None)."""
        if self.kind == "quickstart" and self.list_file is None:
            from harness.data.quickstart import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS
            n = len(CLASSES) * (TRAIN_PER_CLASS if self.split == "train" else VAL_PER_CLASS)
        elif self.list_file is not None:
            from harness.data.images import PAPER_LIST, read_list_file
            n = len(read_list_file(PAPER_LIST if self.list_file == "paper" else self.list_file))
        else:
            return self.random_count or self.limit
        for cap in (self.random_count, self.limit):
            n = min(n, cap) if cap is not None else n
        return n


@dataclass(frozen=True)
class HeadPlan:
    """One L-CAM head the harness trains: the method run it is for and its configuration."""

    method_id: str
    config: TrainConfig

    @property
    def mode(self) -> str:
        return self.config.mode


@dataclass(frozen=True)
class HeadGroup:
    """Heads of one backbone trained together in one Ray Train fit, on the same batches."""

    backbone: str
    weights: Any
    images: ImageSet
    batch_size: int
    workers: int
    use_gpu: bool
    num_threads: int
    heads: tuple[HeadPlan, ...]
    tf32: bool = False                  # TF32 on CUDA (off: float32)
    deterministic: bool = False         # deterministic algorithms (GPU: see heads.py)
    placement: str = "pack"             # Ray Train's placement of the workers: pack | spread
    cpus: float = 1.0                   # CPUs of each Train worker (train.cpus_per_worker)
    loader_workers: int = 0             # DataLoader processes per Train worker

    @property
    def epochs(self) -> int:
        return max(h.config.epochs for h in self.heads)


@dataclass(frozen=True)
class Cell:
    """One backbone x method of the benchmark: one MLflow run, one row of Table 1."""

    backbone: str
    weights: Any
    method: str
    method_id: str
    display_name: str
    variant: str
    params: dict
    row: int                        # 1-based position of the method in the spec (Table 1's row)
    family: str
    forward_passes: int             # nominal #FW per explanation
    checkpoint: str | None = None   # a given head checkpoint (learned methods)
    head: HeadPlan | None = None    # a head the run trains (learned methods without checkpoint)

    @property
    def key(self) -> str:
        return f"{self.backbone}/{self.method_id}"

    @property
    def run_name(self) -> str:
        """``<backbone> <NN> <method>``: sorted by name, backbone then Table 1's row order."""
        return f"{self.backbone} {self.row:02d} {self.display_name}"


@dataclass(frozen=True)
class EvaluationPlan:
    """How maps are scored and how the evaluation is sharded over Ray tasks; ``metrics``
    (the names the spec lists: ``ad_ic`` and the others of ``harness.metrics.registry``),
    ``metric_settings`` ((name, settings) of the entries written with settings) and
    ``statistics`` (the intervals and tests of ``harness.metrics.statistics``)."""

    fractions: tuple[float, ...]
    preset: ProtocolPreset
    batch_size: int
    overlays: int
    autocast: bool
    channels_last: bool
    images_per_task: int
    cpus_per_task: float
    gpus_per_task: float
    max_retries: int
    metrics: tuple[str, ...] = ("ad_ic",)
    metric_settings: tuple[tuple[str, dict], ...] = ()
    causal_steps: int = 224
    causal_canvas: str = "rise"
    causal_batch_size: int = 64
    statistics: StatisticsSettings = StatisticsSettings()
    tf32: bool = False                  # TF32 matmuls/convolutions on CUDA (off: float32)
    deterministic: bool = False         # torch's deterministic algorithms (GPU: slower)
    stall_timeout_s: float = 21600.0    # no shard finished in this long: the run fails

    @property
    def num_threads(self) -> int:
        return max(1, int(self.cpus_per_task))

    @property
    def causal(self) -> tuple[str, ...]:
        """The metrics listed besides ``ad_ic`` (deletion, insertion, road, ...), in the
        spec's order."""
        return tuple(m for m in self.metrics if m != "ad_ic")

    def measures(self) -> list:
        """The per-image metrics of the shards, with their settings, in column order
        (``harness.metrics.registry.planned``)."""
        from harness.metrics.registry import planned
        return planned(self)

    def metrics_identity(self) -> dict:
        """What the listed metrics add to a cell's shard identity (their settings): nothing
        when only ``ad_ic`` is (``harness.metrics.registry.identity``)."""
        from harness.metrics.registry import identity
        return identity(self)


@dataclass(frozen=True)
class Plan:
    """Everything a run computes (see the module docstring)."""

    name: str
    seed: int
    experiment: str
    cells: tuple[Cell, ...]
    head_groups: tuple[HeadGroup, ...]
    images: dict[str, ImageSet]              # backbone name -> its evaluation images
    weights: dict[str, Any]                  # backbone name -> weights (name, path or None)
    evaluation: EvaluationPlan

    def cells_of(self, backbone: str) -> list[Cell]:
        return [c for c in self.cells if c.backbone == backbone]

    @property
    def backbones(self) -> list[str]:
        return list(self.images)


def input_size(backbone: str) -> tuple[int, int]:
    return tuple(backbones.REGISTRY.get(backbone).meta.get("input_size", DEFAULT_INPUT_SIZE))


def image_set(spec, backbone: str, train: bool) -> ImageSet:
    """The images of ``backbone``: its evaluation set, or the training split for its heads."""
    d = spec.data
    list_file = d.list_file
    if isinstance(list_file, str) and list_file.startswith("builtin:"):
        list_file = "paper"                       # the shipped Evaluation_2000.txt
    pre = backbones.preprocessing(backbone, spec.backbone(backbone).weights)
    own = d.kind != "quickstart"      # the quickstart's images keep their rule (no crop)
    return ImageSet(kind=d.kind, split="train" if train else "val",
                    input_size=pre.crop, root=d.root,
                    list_file=None if train else list_file,
                    random_count=None if train else d.random_count,
                    limit=d.train_limit if train else d.limit, seed=spec.seed,
                    on_bad_image=d.on_bad_image, train=train,
                    resize=pre.resize if own else None,
                    interpolation=pre.interpolation if own else "bilinear",
                    classes=d.classes, name=d.name)


def train_config(spec, backbone, method, **changes) -> TrainConfig:
    """The head training of ``method`` on ``backbone``: global < backbone < method keys."""
    t = spec.train_for(backbone, method)
    cfg = TrainConfig(mode=methods.method_class(method.name).mode, epochs=t.epochs, lr=t.lr,
                      lr_decay=t.lr_decay, lambdas=t.lambdas, variant=t.variant,
                      labels=t.labels, seed=spec.seed, lr_decay_epochs=t.lr_decay_epochs)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def nominal_forward_passes(method: str, params: dict, backbone: str) -> int:
    """#FW per explanation from the method's parameters and the backbone's metadata."""
    meta = {"name": backbone, **backbones.REGISTRY.get(backbone).meta}
    return int(methods.method_class(method).planned_forward_passes(params, meta))


def _cell(spec, b, m) -> Cell:
    cls = methods.method_class(m.name)
    head = None
    if cls.family == "learned" and m.checkpoint is None:
        head = HeadPlan(m.id, train_config(spec, b, m))
    return Cell(backbone=b.name, weights=b.weights, method=m.name, method_id=m.id,
                display_name=m.display_name, variant=m.variant, params=dict(m.params or {}),
                row=spec.methods.index(m) + 1, family=cls.family,
                forward_passes=nominal_forward_passes(m.name, m.params or {}, b.name),
                checkpoint=m.checkpoint, head=head)


def _head_groups(spec, cells: list[Cell]) -> tuple[HeadGroup, ...]:
    groups: dict[tuple, list[HeadPlan]] = {}
    for cell in cells:
        if cell.head is None:
            continue
        t = spec.train_for(spec.backbone(cell.backbone), spec.method(cell.method_id))
        key = (cell.backbone, t.batch_size, t.workers, bool(t.use_gpu), t.tf32,
               t.deterministic, t.placement, t.cpus_per_worker, t.loader_processes())
        groups.setdefault(key, []).append(cell.head)
    weights = {b.name: b.weights for b in spec.backbones}
    return tuple(HeadGroup(backbone=name, weights=weights[name],
                           images=image_set(spec, name, train=True), batch_size=batch,
                           workers=workers, use_gpu=gpu,
                           num_threads=max(1, int(cpus) - loaders) if loaders else max(1, int(cpus)),
                           heads=tuple(heads), tf32=tf32, deterministic=deterministic,
                           placement=placement, cpus=cpus, loader_workers=loaders)
                 for (name, batch, workers, gpu, tf32, deterministic, placement, cpus,
                      loaders), heads in groups.items())


def statistics_settings(spec) -> StatisticsSettings:
    """The spec's ``statistics`` section; its seed defaults to the spec's."""
    st = spec.statistics
    return StatisticsSettings(resamples=st.resamples, confidence=st.confidence,
                              method=st.method, alpha=st.alpha, half_width=st.half_width,
                              seed=spec.seed if st.seed is None else st.seed)


def plan(spec) -> Plan:
    """The plan of a validated spec (pure: see the module docstring)."""
    cells = [_cell(spec, b, m) for b, m in spec.pairs()]
    ev, sh = spec.evaluation, spec.sharding
    evaluation = EvaluationPlan(
        fractions=tuple(ev.keep_fractions),
        preset=PAPER if ev.preset in (None, "paper") else ProtocolPreset(name="custom",
                                                                          **dict(ev.preset)),
        batch_size=ev.batch_size, overlays=ev.overlays, autocast=ev.autocast,
        channels_last=ev.channels_last, images_per_task=sh.images_per_task,
        cpus_per_task=sh.cpus_per_task, gpus_per_task=sh.gpus_per_task,
        max_retries=sh.max_retries, metrics=tuple(ev.metric_names()),
        metric_settings=ev.metric_settings(), causal_steps=ev.causal_steps,
        causal_canvas=ev.causal_canvas, causal_batch_size=ev.causal_batch_size,
        statistics=statistics_settings(spec), tf32=ev.tf32, deterministic=ev.deterministic,
        stall_timeout_s=sh.stall_timeout_s)
    return Plan(name=spec.name, seed=spec.seed, experiment=spec.tracking.experiment or spec.name,
                cells=tuple(cells), head_groups=_head_groups(spec, cells),
                images={b.name: image_set(spec, b.name, train=False) for b in spec.backbones},
                weights={b.name: b.weights for b in spec.backbones}, evaluation=evaluation)


def describe(p: Plan) -> list[str]:
    """The plan as text lines (``python -m harness validate`` prints them)."""
    ev, lines = p.evaluation, []
    for name, images in p.images.items():
        n = images.expected_count()
        shards = -(-n // ev.images_per_task) if n else None
        label = images.name or (Path(images.root).name if images.kind == "folder" and images.root
                                else images.kind)
        lines.append(f"{name}: {n if n is not None else 'all'} images ({label} "
                     f"{images.split}), {shards if shards else '?'} shard(s) of "
                     f"{ev.images_per_task} per method")
        for c in p.cells_of(name):
            params = ", ".join(f"{k}={v}" for k, v in c.params.items()) or "-"
            head = (f"head: {c.checkpoint}" if c.checkpoint else
                    f"head: trained ({recipe_text(c.head.config)})" if c.head else "")
            lines.append(f"  {c.row:2d} {c.display_name:<11} {c.method_id:<14} {c.variant:<15} "
                         f"#FW/img {c.forward_passes:<5} {params} {head}".rstrip())
    for g in p.head_groups:
        lines.append(f"heads {g.backbone}: {len(g.heads)} trained together, {g.epochs} epoch(s), "
                     f"batch {g.batch_size}, {g.workers} worker(s){' on GPU' if g.use_gpu else ''}"
                     f" of {g.cpus:g} CPU and {g.loader_workers} loader process(es) each"
                     f"{f' ({g.placement})' if g.workers > 1 else ''}"
                     f", images: {g.images.expected_count() or 'all'} ({g.images.split})")
    return lines
