"""``python -m harness run SPEC``: the benchmark, end to end, on Ray and MLflow.

Steps, all resumable (everything finished is kept under the cache and reused):
1. data: the embedded quickstart set is generated on first use; ImageNet is read in place;
2. backbones: loaded in the driver once (the embedded ones train on first use);
3. L-CAM heads: for each backbone, every learned method without a ``checkpoint`` is trained
   by one Ray Train fit per head group (``harness.training``); heads are cached by a hash of
   everything that determines them;
4. evaluation: each backbone x method is split into shards of ``images_per_task`` images,
   one Ray task each (``harness.evaluation.run_shard``), rows written to Parquet atomically;
5. MLflow: a parent run per spec, a child per backbone x method with params, tags, metrics
   and artifacts (``harness.tracking``); 6. a rich table laid out like the paper's Table 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import backbones
import methods
from methods.lcam_train import TrainConfig

from . import analysis, evaluation, localisation, table
from .evaluation import ShardJob
from . import ray_runtime
from .errors import UserError
from .paths import cache_dir, check_persistent, use_storage
from .ray_runtime import cluster_address
from .protocol import PAPER, ProtocolPreset, fraction_key
from .terminal import make_console
from .tracking import Tracker, git_commit, package_versions, tracking_uri
from .training import TRAIN_VERSION, fit_heads, train_config_dict, write_heads

REPO_ROOT = Path(__file__).resolve().parent.parent


def stable_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Cell:
    """One backbone x method of the benchmark and everything resolved for it."""

    backbone: Any            # BackboneSpec
    method: Any              # MethodSpec
    run_id: str = ""
    checkpoint: Path | None = None
    train_cfg: TrainConfig | None = None
    shard_dir: Path | None = None
    jobs: list[ShardJob] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    analysis_paths: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.backbone.name}/{self.method.id}"

    @property
    def learned(self) -> bool:
        return methods.method_class(self.method.name).family == "learned"


def preset_of(spec) -> ProtocolPreset:
    p = spec.evaluation.preset
    return PAPER if p in (None, "paper") else ProtocolPreset(name="custom", **dict(p))


DEFAULT_INPUT_SIZE = (224, 224)     # torchvision classifiers; entries may say otherwise


class InputRefused(UserError):
    """Bad input found before the run started anything (the CLI exits with code 2)."""


def data_kwargs(spec, split: str, input_size, train: bool) -> dict:
    d = spec.data
    list_file = d.list_file
    if isinstance(list_file, str) and list_file.startswith("builtin:"):
        list_file = "paper"          # the shipped Evaluation_2000.txt
    return {"kind": d.kind, "split": split, "input_size": tuple(input_size),
            "root": d.root, "list_file": None if train else list_file,
            "random_count": None if train else d.random_count,
            "limit": d.train_limit if train else d.limit, "seed": spec.seed,
            "on_bad_image": d.on_bad_image, "train": train}


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of this run needs: the cache root (made absolute), the
    MLflow variables, thread settings and, on a local Ray, this checkout on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("HARNESS_", "MLFLOW_", "RAY_TRAIN_", "OMP_"))}
    env["HARNESS_CACHE_DIR"] = str(cache_dir())
    return env


def init_ray(spec) -> None:
    """Start or join Ray for this spec (``harness.ray_runtime``) with ``worker_env``."""
    env = worker_env()
    if cluster_address(spec.ray.address) is None:     # a job's workers have its working_dir
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          os.environ.get("PYTHONPATH")]))
    ray_runtime.init_ray(spec.ray.address, spec.ray.num_cpus, env)


def prepare_locations(spec) -> str:
    """Apply the spec's storage, refuse temporary locations under a Ray job; the MLflow URI."""
    use_storage(spec.storage.uri)
    uri = spec.tracking.uri or tracking_uri()
    check_persistent(uri)
    return uri


class BenchmarkRun:
    """The state of one ``run``; see the module docstring for the steps."""

    def __init__(self, spec, console: Console | None = None):
        self.spec = spec
        self.console = console or make_console()
        self.cache = Path()             # set by run(), once the spec's storage is applied
        self.fractions = tuple(spec.evaluation.keep_fractions)
        self.preset = preset_of(spec)
        self.cells = [Cell(b, m) for b, m in spec.pairs()]
        self.loaded: dict[str, Any] = {}
        self.eval_sets: dict[str, Any] = {}

    # -- 1: data (before anything is started or recorded) ----------------------------------
    def check_data(self, progress: Progress) -> None:
        """Generate the quickstart data if needed and build every evaluation set, decoding each
        image once: a bad image under ``on_bad_image: stop`` (or nothing left under ``skip``)
        raises ``InputRefused`` before any MLflow run, Ray or training has started."""
        from .data import DataError, build_dataset
        try:
            if self.spec.data.kind == "quickstart":
                from .quickstart import ensure_quickstart
                task = progress.add_task("quickstart data", total=None)

                def tick(done, total):
                    progress.update(task, completed=done, total=total)
                ensure_quickstart(progress=tick)
                progress.update(task, completed=1, total=1)
            for b in self.spec.backbones:
                size = backbones.REGISTRY.get(b.name).meta.get("input_size", DEFAULT_INPUT_SIZE)
                kw = data_kwargs(self.spec, "val", size, train=False)
                ds = build_dataset(**kw)
                if ds.on_bad_image == "stop":           # "skip" has decoded them already
                    task = progress.add_task(f"check {len(ds)} images for {b.name}", total=None)
                    ds.verify()
                    progress.update(task, completed=1, total=1)
                if not len(ds):
                    raise DataError(f"no images left to evaluate for {b.name}: all {ds.skipped} "
                                    f"selected were skipped (first: {ds.bad[0][1]})" if ds.bad
                                    else f"no images to evaluate for {b.name}")
                self.eval_sets[b.name] = (kw, ds, ds.list_hash)
        except DataError as err:
            raise InputRefused(f"{err}\nnothing was started: fix the data or set "
                               "data.on_bad_image: skip") from None

    # -- 2: backbones ---------------------------------------------------------------------
    def prepare(self, progress: Progress) -> None:
        for b in self.spec.backbones:
            task = progress.add_task(f"backbone {b.name}", total=None)
            self.loaded[b.name] = backbones.load(b.name, weights=b.weights)
            progress.update(task, completed=1, total=1)
            size = tuple(self.loaded[b.name].input_size)
            if tuple(self.eval_sets[b.name][0]["input_size"]) != size:
                raise RuntimeError(f"backbone {b.name}: its registry entry says input size "
                                   f"{self.eval_sets[b.name][0]['input_size']}, the model {size}")

    # -- 3: heads -------------------------------------------------------------------------
    def plan_heads(self) -> dict[tuple, list[Cell]]:
        groups: dict[tuple, list[Cell]] = {}
        for cell in self.cells:
            if not cell.learned:
                continue
            if cell.method.checkpoint:
                cell.checkpoint = Path(cell.method.checkpoint)
                continue
            t = self.spec.train_for(cell.backbone, cell.method)
            mode = methods.method_class(cell.method.name).mode
            cell.train_cfg = TrainConfig(mode=mode, epochs=t.epochs, lr=t.lr, lr_decay=t.lr_decay,
                                         lambdas=(t.lambda1, t.lambda2, t.lambda3, t.lambda4),
                                         variant=t.variant, labels=t.labels, seed=self.spec.seed)
            bb = self.loaded[cell.backbone.name]
            data = data_kwargs(self.spec, "train", bb.input_size, train=True)
            group = (cell.backbone.name, t.batch_size, t.workers, bool(t.use_gpu),
                     json.dumps(data, sort_keys=True, default=str))
            identity = {"backbone": bb.name, "weights": bb.weights_id, "group": group,
                        "cfg": train_config_dict(cell.train_cfg), "train_version": TRAIN_VERSION}
            cell.checkpoint = self.cache / "heads" / bb.name / f"{mode}-{stable_hash(identity)}.pt"
            if not cell.checkpoint.exists():
                groups.setdefault(group, []).append(cell)
        return groups

    def train_heads(self, groups, tracker: Tracker, progress: Progress) -> None:
        for group, cells in groups.items():
            name, batch_size, workers, use_gpu, data_json = group
            bb = self.loaded[name]
            epochs = max(c.train_cfg.epochs for c in cells)
            fit_name = f"heads-{name}-{stable_hash([c.checkpoint.name for c in cells], 10)}"
            progress_file = self.cache / "ray_results" / f"{fit_name}.progress.json"
            progress_file.parent.mkdir(parents=True, exist_ok=True)
            task = progress.add_task(f"train heads {name} ({len(cells)})", total=epochs)
            kwargs = dict(name=fit_name, backbone=name, weights=cells[0].backbone.weights,
                          heads=[{"id": c.method.id, "cfg": train_config_dict(c.train_cfg)}
                                 for c in cells],
                          data=json.loads(data_json), epochs=epochs, batch_size=batch_size,
                          seed=self.spec.seed, workers=workers, use_gpu=use_gpu,
                          storage_path=self.cache / "ray_results", tracking_uri=tracker.uri,
                          run_ids={c.method.id: c.run_id for c in cells},
                          num_threads=max(1, int(self.spec.sharding.cpus_per_task)),
                          progress_file=progress_file)
            kwargs["data"]["input_size"] = tuple(kwargs["data"]["input_size"])
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(fit_heads, **kwargs)
                while not future.done():
                    time.sleep(0.5)
                    if progress_file.exists():
                        try:
                            done = json.loads(progress_file.read_text())["epoch"]
                            progress.update(task, completed=done)
                        except (ValueError, KeyError):
                            pass
                states = future.result()
            progress.update(task, completed=epochs)
            write_heads(states, bb, {c.method.id: c.train_cfg for c in cells},
                        {c.method.id: c.checkpoint for c in cells}, {"fit": fit_name})

    # -- 4: evaluation --------------------------------------------------------------------
    def plan_shards(self) -> None:
        s = self.spec
        for cell in self.cells:
            bb = self.loaded[cell.backbone.name]
            kw, ds, lhash = self.eval_sets[cell.backbone.name]
            m = cell.method
            identity = {"backbone": bb.name, "weights": bb.weights_id, "method": m.name,
                        "variant": m.variant, "params": m.params, "fractions": self.fractions,
                        "preset": self.preset.as_dict(), "list": lhash, "seed": s.seed,
                        "per_task": s.sharding.images_per_task, "batch": s.evaluation.batch_size,
                        "head": file_hash(cell.checkpoint) if cell.checkpoint else None,
                        "method_version": methods.method_class(m.name).version,
                        "rows_version": evaluation.ROWS_VERSION,
                        "autocast": s.evaluation.autocast,
                        "channels_last": s.evaluation.channels_last}
            cell.shard_dir = self.cache / "shards" / bb.name / f"{m.id}-{stable_hash(identity)}"
            n, per = len(ds), s.sharding.images_per_task
            for i, start in enumerate(range(0, n, per)):
                cell.jobs.append(ShardJob(
                    shard=i, indices=tuple(range(start, min(start + per, n))),
                    out_path=str(cell.shard_dir / f"shard-{i:05d}.parquet"),
                    backbone=bb.name, weights=cell.backbone.weights, method=m.name,
                    variant=m.variant, params=tuple(sorted((m.params or {}).items())),
                    checkpoint=str(cell.checkpoint) if cell.checkpoint else None,
                    data=tuple(sorted(kw.items())), fractions=self.fractions,
                    preset=tuple(sorted(asdict(self.preset).items())),
                    batch_size=s.evaluation.batch_size, seed=s.seed,
                    num_threads=max(1, int(s.sharding.cpus_per_task)),
                    use_gpu=s.sharding.gpus_per_task > 0, save_maps=s.evaluation.overlays
                    if i == 0 else 0, autocast=s.evaluation.autocast,
                    channels_last=s.evaluation.channels_last))

    def evaluate(self, progress: Progress) -> None:
        import ray
        sh = self.spec.sharding
        remote = ray.remote(evaluation.run_shard).options(
            num_cpus=sh.cpus_per_task, num_gpus=sh.gpus_per_task, max_retries=sh.max_retries,
            retry_exceptions=[OSError, RuntimeError])
        pending, bars = {}, {}
        for cell in self.cells:
            todo = [j for j in cell.jobs if not Path(j.out_path).exists()]
            bars[cell.key] = progress.add_task(f"evaluate {cell.key}", total=len(cell.jobs),
                                               completed=len(cell.jobs) - len(todo))
            for job in todo:
                ref = remote.remote(job)
                pending[ref] = cell
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cell = pending.pop(ref)
                try:
                    ray.get(ref)
                    progress.advance(bars[cell.key])
                except Exception as err:  # the shard failed after its retries
                    err = getattr(err, "cause", None) or err      # unwrap RayTaskError
                    cell.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"

    # -- 5: MLflow ------------------------------------------------------------------------
    def record(self, tracker: Tracker, parent_id: str) -> None:
        for cell in self.cells:
            if cell.error:
                tracker.log(cell.run_id, tags={"error": cell.error})
                tracker.finish(cell.run_id, ok=False)
                continue
            paths = [Path(j.out_path) for j in cell.jobs]
            rows = evaluation.read_rows(paths)
            bb = self.loaded[cell.backbone.name]
            explainer = methods.create(cell.method.name, bb, variant=cell.method.variant,
                                       **(cell.method.params or {}),
                                       **({"checkpoint": str(cell.checkpoint)}
                                          if cell.checkpoint else {}))
            cell.metrics = evaluation.aggregate(rows, self.fractions, explainer.forward_passes,
                                                len(self.eval_sets[bb.name][1]))
            cell.metrics.update(localisation.energy_metrics(rows))
            cell.metrics["skipped_images"] = float(self.eval_sets[bb.name][1].skipped)
            if self.spec.evaluation.overlays:
                found = analysis.analyse(bb, explainer, self.eval_sets[bb.name][1],
                                         cell.shard_dir / "artifacts" / "analysis",
                                         per_image=rows, seed=self.spec.seed,
                                         sanity_images=1 if explainer.family == "perturbation"
                                         else None)
                cell.metrics.update(found["metrics"])
                cell.analysis_paths = list(found["paths"])
            info = explainer.describe()
            tags = {k: v for k, v in info.items() if k == "rise_mask_hash"}
            tracker.log(cell.run_id, metrics=cell.metrics, tags=tags,
                        params={k: v for k, v in info.items() if k != "rise_mask_hash"})
            art = cell.shard_dir / "artifacts"
            art.mkdir(parents=True, exist_ok=True)
            per_image = art / "per_image.parquet"
            evaluation.write_table_atomic(rows, per_image)
            tracker.artifact(cell.run_id, per_image)
            maps = cell.shard_dir / "maps-00000.pt"
            if maps.exists():
                from .overlays import save_overlay_grid
                saved = torch.load(maps, weights_only=True)
                png = save_overlay_grid(art / "overlays.png", saved["images"], saved["maps"],
                                        saved["ids"])
                tracker.artifact(cell.run_id, png)
            if cell.checkpoint and cell.checkpoint.exists():
                tracker.artifact(cell.run_id, cell.checkpoint, "head")
            for path in cell.analysis_paths:
                tracker.artifact(cell.run_id, path, "analysis")
            tracker.artifact(cell.run_id, self.spec_file)
            tracker.finish(cell.run_id)

    # -- the whole run ----------------------------------------------------------------------
    def run(self) -> dict:
        s = self.spec
        uri = prepare_locations(s)
        self.cache = cache_dir()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=False)
        with progress:
            self.check_data(progress)
        for task in progress.task_ids:      # shown once: the bars below start afresh
            progress.remove_task(task)
        tracker = Tracker(s.tracking.experiment or s.name, uri)
        self.spec_file = self.cache / "specs" / f"{s.name}-{s.fingerprint()}.yaml"
        self.spec_file.parent.mkdir(parents=True, exist_ok=True)
        self.spec_file.write_text(yaml.safe_dump(s.to_dict(), sort_keys=False))
        common = {"git_commit": git_commit(), "protocol_preset": self.preset.name,
                  **package_versions(), **{str(k): str(v) for k, v in s.tracking.tags.items()}}
        parent_id = tracker.parent_run(s.name, s.fingerprint(), common)
        ok = False
        try:
            with progress:
                self.prepare(progress)
                for cell in self.cells:
                    bb = self.loaded[cell.backbone.name]
                    m = cell.method
                    # "<backbone> <NN> <method>": sorted by name, the spec's (= Table 1's) rows
                    name = f"{bb.name} {s.methods.index(m) + 1:02d} {m.display_name}"
                    cell.run_id = tracker.child_run(parent_id, cell.key, name, {
                        **common, "backbone": bb.name, "method": m.name, "method_id": m.id,
                        "display_name": m.display_name, "variant": str(m.variant),
                        "weights_id": bb.weights_id, "feature_layer": bb.feature_layer,
                        "eval_list_hash": self.eval_sets[bb.name][2]})
                    tracker.log(cell.run_id, params={"backbone": bb.name, "weights": bb.weights_id,
                                                     "seed": s.seed, "fractions": list(self.fractions),
                                                     "preset": json.dumps(self.preset.as_dict())})
                groups = self.plan_heads()
                init_ray(s)
                self.train_heads(groups, tracker, progress)
                self.plan_shards()
                for cell in self.cells:     # where the per-image rows of this run live
                    tracker.log(cell.run_id, tags={"shard_dir": str(cell.shard_dir)})
                self.evaluate(progress)
            self.record(tracker, parent_id)
            tracker.artifact(parent_id, self.spec_file)
            ok = not any(c.error for c in self.cells)
        finally:
            if not ok:   # never leave a run RUNNING; a rerun resumes these runs
                for cell in self.cells:
                    if cell.run_id and tracker.client.get_run(cell.run_id).info.status == "RUNNING":
                        tracker.finish(cell.run_id, ok=False)
            tracker.finish(parent_id, ok=ok)
        self.print_tables(tracker, parent_id)
        failed = [c for c in self.cells if c.error]
        for c in failed:
            self.console.print(f"[red]failed[/red] {c.key}: {c.error}")
        return {"parent_run_id": parent_id, "tracking_uri": tracker.uri,
                "metrics": {c.key: c.metrics for c in self.cells},
                "failed": [c.key for c in failed]}

    def print_tables(self, tracker: Tracker, parent_id: str) -> None:
        """The run's Table 1 per backbone in the terminal; the same tables (Markdown, CSV) and
        the AD/IC-vs-#FW plots as artifacts of the parent run (``harness.report``)."""
        cols = table.metric_columns([fraction_key(f) for f in self.fractions])
        for b in self.spec.backbones:
            rows = [{"method": c.method.display_name, **c.metrics} for c in self.cells
                    if c.backbone is b and c.metrics]
            if not rows:
                continue
            title = f"{b.name} ({self.loaded[b.name].weights_id}), {rows[0].get('images', 0):.0f} images"
            self.console.print(table.rich_table(title, rows, cols))
            bad = self.eval_sets[b.name][1].bad
            if bad:    # data.on_bad_image: skip
                note = (f"{len(bad)} image{'s' if len(bad) > 1 else ''} skipped "
                        "(data.on_bad_image: skip): " + "; ".join(r for _, r in bad[:5])
                        + ("; ..." if len(bad) > 5 else ""))
                self.console.print(note, markup=False, highlight=False, soft_wrap=True)
        if any(c.metrics for c in self.cells):
            from . import report
            data = report.collect(tracker.client, tracker.client.get_run(parent_id))
            for path in report.write_report(data, self.cache / "reports" / parent_id):
                tracker.artifact(parent_id, path, "report")
            tracker.publish_view(cols)
        self.console.print(f"MLflow: {tracker.uri} (experiment "
                           f"'{self.spec.tracking.experiment or self.spec.name}', run {parent_id})")
        self.console.print(f"MLflow UI: {tracker.ui_link()}")


def run_benchmark(spec, console: Console | None = None) -> dict:
    """Run a validated spec; returns the parent run id, metrics per cell and failures."""
    run = BenchmarkRun(spec, console)
    result = run.run()
    if result["failed"]:
        first = next(c for c in run.cells if c.error)
        raise RuntimeError(f"{len(result['failed'])} method run(s) failed: "
                           + ", ".join(result["failed"]) + f" (first, {first.key}: {first.error})")
    return result
