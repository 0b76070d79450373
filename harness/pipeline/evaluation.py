"""Stage 3 of a run: the evaluation, laid out in shards and run as Ray tasks.

``shard_jobs`` (pure) cuts every cell's images into shards of ``images_per_task`` and names
the cell's folder in the cache by a hash of everything that determines its rows: backbone and
weights id, method, variant, parameters and version, kept fractions, protocol preset,
evaluation-list hash, seed, shard size, batch size, the head checkpoint's content hash,
precision options and the rows format. Finished shard files are reused, so a rerun, or a
new spec that shares a cell, recomputes nothing.

``evaluate`` submits every missing shard (``harness.pipeline.shards.run_shard``, retried by
Ray ``max_retries`` times on a lost worker or an error) and, as soon as all shards of a cell
exist, that cell's analysis task (``run_analysis``; its result is kept beside the shards and
reused). A cell whose shards fail is reported as failed; the other cells go on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import methods
from harness.data.cache import file_hash, stable_hash
from harness.pipeline import devices
from harness.pipeline.inputs import Inputs
from harness.pipeline.plan import Cell, Plan
from harness.pipeline.shards import (ROWS_VERSION, AnalysisJob, ShardJob, finished_analysis,
                                     run_analysis, run_shard)


@dataclass
class CellWork:
    """One cell's evaluation: its folder, its shards and, once run, its outcome."""

    cell: Cell
    checkpoint: str | None
    shard_dir: Path
    jobs: list[ShardJob]
    error: str | None = None
    analysis: dict = field(default_factory=dict)      # run_analysis's result
    summaries: list[dict] = field(default_factory=list)   # run_shard's, one per shard

    @property
    def shard_paths(self) -> list[Path]:
        return [Path(j.out_path) for j in self.jobs]

    def task_seconds(self) -> dict[str, float]:
        """Seconds spent inside this cell's tasks, per stage (load, explain, score, write,
        analysis), from the shards' summaries (kept beside them: also for reused shards)."""
        out: dict[str, float] = {}
        summaries = self.summaries or [json.loads(p.with_suffix(".json").read_text())
                                       for p in self.shard_paths
                                       if p.with_suffix(".json").is_file()]
        for s in summaries:
            for stage, sec in s.get("seconds", {}).items():
                out[stage] = out.get(stage, 0.0) + sec
        out["analysis"] = self.analysis.get("seconds", 0.0)
        return out

    @property
    def complete(self) -> bool:
        """Every shard file and the analysis result exist (nothing left to compute)."""
        return (all(p.exists() for p in self.shard_paths)
                and finished_analysis(self.shard_dir / "artifacts") is not None)


def cell_identity(plan: Plan, inputs: Inputs, cell: Cell, checkpoint: str | None) -> dict:
    ev = plan.evaluation
    return {"backbone": cell.backbone, "weights": inputs.weights_id(cell.backbone),
            "method": cell.method, "variant": cell.variant, "params": cell.params,
            "fractions": ev.fractions, "preset": ev.preset.as_dict(),
            "list": inputs.datasets[cell.backbone].list_hash, "seed": plan.seed,
            "per_task": ev.images_per_task, "batch": ev.batch_size,
            "head": file_hash(checkpoint) if checkpoint else None,
            "method_version": methods.method_class(cell.method).version,
            "rows_version": ROWS_VERSION, "autocast": ev.autocast,
            "channels_last": ev.channels_last, **ev.causal_identity(), **_device_identity(ev)}


def _device_identity(ev) -> dict:
    """The device type and arithmetic a cell's rows are computed with (CPU shards are never
    reused by a GPU run, nor float32 ones by a TF32 or autocast one). Absent for the CPU and
    float32 defaults, so that existing CPU caches keep their names."""
    device = "cuda" if ev.gpus_per_task > 0 else "cpu"
    out = {"device": device, "precision": devices.precision_name(ev.autocast, ev.tf32, device),
           "deterministic": ev.deterministic}
    return {} if out == {"device": "cpu", "precision": "float32", "deterministic": False} else out


def shard_jobs(plan: Plan, inputs: Inputs, heads: dict[str, Path],
               root: Path) -> list[CellWork]:
    """Every cell's shards (``heads``: cell key -> its head checkpoint, for learned cells)."""
    ev, works = plan.evaluation, []
    for cell in plan.cells:
        checkpoint = str(heads[cell.key]) if cell.key in heads else None
        folder = root / "shards" / cell.backbone / (
            f"{cell.method_id}-{stable_hash(cell_identity(plan, inputs, cell, checkpoint))}")
        n, per = inputs.images(cell.backbone), ev.images_per_task
        jobs = [ShardJob(cell=cell, images=plan.images[cell.backbone], evaluation=ev,
                         checkpoint=checkpoint, seed=plan.seed, shard=i,
                         indices=tuple(range(start, min(start + per, n))),
                         out_path=str(folder / f"shard-{i:05d}.parquet"),
                         prepared=str(inputs.prepared[cell.backbone].path),
                         save_maps=ev.overlays if i == 0 else 0)
                for i, start in enumerate(range(0, n, per))]
        works.append(CellWork(cell, checkpoint, folder, jobs))
    return works


class StalledError(RuntimeError):
    """No evaluation task finished within ``sharding.stall_timeout_s``."""


def _stalled(pending: dict, ev) -> str:
    import ray
    cells = sorted({work.cell.key for work, _ in pending.values()})
    return (f"no evaluation task finished in {ev.stall_timeout_s:g} s (sharding.stall_timeout_s);"
            f" {len(pending)} still pending ({', '.join(cells[:5])}{', ...' if len(cells) > 5 else ''})"
            f"; the cluster has {ray.cluster_resources()} of which available now "
            f"{ray.available_resources()}. A lost node, or a shard that legitimately takes "
            "longer (raise the timeout)")


def _error(err: Exception) -> str:
    err = getattr(err, "cause", None) or err      # unwrap RayTaskError
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"


def task_options(ev) -> dict:
    """Ray options of the evaluation's tasks (shards and analysis)."""
    options = dict(num_cpus=ev.cpus_per_task, num_gpus=ev.gpus_per_task,
                   max_retries=ev.max_retries, retry_exceptions=[OSError, RuntimeError])
    if ev.gpus_per_task > 0:
        # A fresh worker process per GPU task: a reused one would keep the CUDA context and
        # the cached model of the first GPU it was given (Ray's default for GPU functions,
        # which ``.options(num_gpus=...)`` alone does not apply).
        options["max_calls"] = 1
    return options


class _Dispatch:
    """The evaluation's Ray tasks in flight: shards first, a cell's analysis after them."""

    def __init__(self, plan: Plan, progress):
        import ray
        self.plan, self.progress, self.pending = plan, progress, {}
        options = task_options(plan.evaluation)
        self.shard_task = ray.remote(run_shard).options(**options)
        self.analysis_task = ray.remote(run_analysis).options(**options)
        self.left: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def start(self, work: CellWork) -> None:
        key = work.cell.key
        todo = [j for j in work.jobs if not Path(j.out_path).exists()]
        self.left[key], self.done[key] = len(todo), len(work.jobs) - len(todo)
        self.progress(f"evaluate {key}", self.done[key], len(work.jobs) + 1)
        for job in todo:
            self.pending[self.shard_task.remote(job)] = (work, "shard")
        if not todo:
            work.analysis = finished_analysis(work.shard_dir / "artifacts") or {}
            if work.analysis:
                self.progress(f"evaluate {key}", len(work.jobs) + 1, len(work.jobs) + 1)
            else:
                self.analyse(work)

    def analyse(self, work: CellWork) -> None:
        job = AnalysisJob(cell=work.cell, images=self.plan.images[work.cell.backbone],
                          evaluation=self.plan.evaluation, checkpoint=work.checkpoint,
                          seed=self.plan.seed, shard_paths=tuple(map(str, work.shard_paths)),
                          out_dir=str(work.shard_dir / "artifacts"),
                          prepared=work.jobs[0].prepared)
        self.pending[self.analysis_task.remote(job)] = (work, "analysis")

    def finish_one(self) -> None:
        """Wait for the next task to end (``StalledError`` if none does in time)."""
        import ray
        ev = self.plan.evaluation
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=ev.stall_timeout_s)
        if not ready:
            raise StalledError(_stalled(self.pending, ev))
        work, kind = self.pending.pop(ready[0])
        key = work.cell.key
        try:
            result = ray.get(ready[0])
        except Exception as err:                 # failed after its retries
            work.error = work.error or _error(err)
            self.left[key] -= kind == "shard"
            return
        self.done[key] += 1
        self.progress(f"evaluate {key}", self.done[key], len(work.jobs) + 1)
        if kind == "analysis":
            work.analysis = result
            return
        work.summaries.append(result)
        self.left[key] -= 1
        if self.left[key] == 0 and work.error is None:
            self.analyse(work)


def evaluate(plan: Plan, works: list[CellWork],
             progress: Callable[[str, int, int | None], None]) -> None:
    """Run the missing shards, then each cell's analysis; fills ``work.error``/``.analysis``
    (a cell already complete in the cache is only read back)."""
    if all(w.complete for w in works):
        for work in works:
            work.analysis = finished_analysis(work.shard_dir / "artifacts")
            progress(f"evaluate {work.cell.key}", len(work.jobs) + 1, len(work.jobs) + 1)
        return
    dispatch = _Dispatch(plan, progress)
    for work in works:
        dispatch.start(work)
    while dispatch.pending:
        dispatch.finish_one()
