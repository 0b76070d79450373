"""Stage 3 of a run: the evaluation, laid out in shards and run as Ray tasks.

``shard_jobs`` (pure) cuts every cell's images into shards of ``images_per_task`` and names
the cell's folder in the storage (``harness.data.storage``) by a hash of everything that
determines its rows: backbone and weights id, method, variant, parameters and version, kept
fractions, protocol preset, evaluation-list hash, seed, shard size, batch size, the head's
content hash, precision options and the rows format. Finished shard files are reused, so a
rerun, or a new spec that shares a cell, recomputes nothing.

``evaluate`` submits every missing shard (``harness.pipeline.shards.run_shard``, retried by
Ray ``max_retries`` times on a lost worker, a lost node or an error), writes what each returns
(rows, maps, summary) to the storage as it arrives, and, as soon as all shards of a cell
exist, runs that cell's analysis task (``run_analysis``), whose files are written beside the
shards with an ``analysis.json`` saying it is done (reused by later runs). A cell whose
shards fail is reported as failed; the other cells go on. No task waits forever: when none
finishes in ``sharding.stall_timeout_s`` the run stops and says what was pending.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import methods
from harness.data.cache import stable_hash
from harness.data.storage import Storage
from harness.pipeline import devices
from harness.pipeline.inputs import Inputs
from harness.pipeline.plan import Cell, Plan
from harness.pipeline.shards import (ROWS_VERSION, AnalysisJob, HeadRef, ShardJob,
                                     run_analysis, run_shard)

ANALYSIS_FILE = "analysis.json"     # a cell's analysis result; its presence means "done"


@dataclass
class CellWork:
    """One cell's evaluation: its folder in the storage, its shards and, once run, its
    outcome (``error``, ``analysis``, the shards' ``summaries``)."""

    cell: Cell
    storage: Storage
    folder: str
    jobs: list[ShardJob]
    error: str | None = None
    analysis: dict = field(default_factory=dict)
    summaries: list[dict] = field(default_factory=list)

    def shard_path(self, job: ShardJob, suffix: str = ".parquet") -> str:
        return f"{self.folder}/shard-{job.shard:05d}{suffix}"

    @property
    def shard_paths(self) -> list[str]:
        return [self.shard_path(j) for j in self.jobs]

    def artifact_path(self, name: str) -> str:
        return f"{self.folder}/artifacts/{name}"

    def finished_analysis(self) -> dict | None:
        """The analysis result of a previous run of this cell (same folder, same inputs)."""
        path = self.artifact_path(ANALYSIS_FILE)
        return json.loads(self.storage.read_bytes(path)) if self.storage.exists(path) else None

    def shard_summaries(self) -> list[dict]:
        """Every shard's summary (this run's, or the stored ones of reused shards)."""
        if len(self.summaries) == len(self.jobs):
            return self.summaries
        paths = [self.shard_path(j, ".json") for j in self.jobs]
        return [json.loads(self.storage.read_bytes(p)) for p in paths if self.storage.exists(p)]

    def task_seconds(self) -> dict[str, float]:
        """Seconds spent inside this cell's tasks, per stage (load, explain, score, write,
        analysis)."""
        out: dict[str, float] = {}
        for s in self.shard_summaries():
            for stage, sec in s.get("seconds", {}).items():
                out[stage] = out.get(stage, 0.0) + sec
        out["analysis"] = self.analysis.get("seconds", 0.0)
        return out

    def nodes(self) -> list[str]:
        """The Ray node ids that ran this cell's shards."""
        return sorted({s["node_id"] for s in self.shard_summaries() if s.get("node_id")})

    @property
    def complete(self) -> bool:
        """Every shard file and the analysis result exist (nothing left to compute)."""
        return (all(self.storage.exists(p) for p in self.shard_paths)
                and self.storage.exists(self.artifact_path(ANALYSIS_FILE)))


def cell_identity(plan: Plan, inputs: Inputs, cell: Cell, head_hash: str | None) -> dict:
    ev = plan.evaluation
    return {"backbone": cell.backbone, "weights": inputs.weights_id(cell.backbone),
            "method": cell.method, "variant": cell.variant, "params": cell.params,
            "fractions": ev.fractions, "preset": ev.preset.as_dict(),
            "list": inputs.datasets[cell.backbone].list_hash, "seed": plan.seed,
            "per_task": ev.images_per_task, "batch": ev.batch_size, "head": head_hash,
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


def shard_jobs(plan: Plan, inputs: Inputs, heads: dict[str, HeadRef],
               storage: Storage) -> list[CellWork]:
    """Every cell's shards (``heads``: cell key -> its head, for learned cells)."""
    ev, works = plan.evaluation, []
    for cell in plan.cells:
        head = heads.get(cell.key)
        head_hash = head.name.split("-", 1)[0] if head else None
        folder = storage.path("shards", cell.backbone, f"{cell.method_id}-"
                              f"{stable_hash(cell_identity(plan, inputs, cell, head_hash))}")
        n, per = inputs.images(cell.backbone), ev.images_per_task
        jobs = [ShardJob(cell=cell, images=plan.images[cell.backbone],
                         list_hash=inputs.datasets[cell.backbone].list_hash,
                         weights_id=inputs.weights_id(cell.backbone), evaluation=ev, head=head,
                         seed=plan.seed, shard=i, indices=tuple(range(start, min(start + per, n))),
                         save_maps=ev.overlays if i == 0 else 0)
                for i, start in enumerate(range(0, n, per))]
        works.append(CellWork(cell, storage, folder, jobs))
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


def save_shard(work: CellWork, job: ShardJob, result: dict) -> None:
    """Write what a shard task returned: maps, summary, then the rows (the rows file is the
    shard's "done" mark, so it is written last)."""
    st = work.storage
    if result["maps"]:
        st.write_bytes(f"{work.folder}/maps-{job.shard:05d}.pt", result["maps"])
    st.write_bytes(work.shard_path(job, ".json"), json.dumps(result["summary"]).encode())
    st.write_table(work.shard_path(job), result["rows"])
    work.summaries.append(result["summary"])


def save_analysis(work: CellWork, result: dict) -> None:
    """Write the analysis task's files beside the shards, then ``analysis.json``."""
    for name, data in result["files"].items():
        work.storage.write_bytes(work.artifact_path(name), data)
    work.analysis = {"metrics": result["metrics"], "files": sorted(result["files"]),
                     "seconds": result["seconds"]}
    work.storage.write_bytes(work.artifact_path(ANALYSIS_FILE),
                             json.dumps(work.analysis, indent=1).encode())


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
        todo = [j for j in work.jobs if not work.storage.exists(work.shard_path(j))]
        self.left[key], self.done[key] = len(todo), len(work.jobs) - len(todo)
        self.progress(f"evaluate {key}", self.done[key], len(work.jobs) + 1)
        for job in todo:
            self.pending[self.shard_task.remote(job)] = (work, job)
        if not todo:
            work.analysis = work.finished_analysis() or {}
            if work.analysis:
                self.progress(f"evaluate {key}", len(work.jobs) + 1, len(work.jobs) + 1)
            else:
                self.analyse(work)

    def analyse(self, work: CellWork) -> None:
        first = work.jobs[0]
        maps_path = f"{work.folder}/maps-00000.pt"
        job = AnalysisJob(cell=work.cell, images=first.images, list_hash=first.list_hash,
                          weights_id=first.weights_id, evaluation=self.plan.evaluation,
                          head=first.head, seed=self.plan.seed,
                          rows=work.storage.read_table(work.shard_paths),
                          maps=work.storage.read_bytes(maps_path)
                          if work.storage.exists(maps_path) else None)
        self.pending[self.analysis_task.remote(job)] = (work, None)

    def finish_one(self) -> None:
        """Wait for the next task to end (``StalledError`` if none does in time), save it."""
        import ray
        ev = self.plan.evaluation
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=ev.stall_timeout_s)
        if not ready:
            raise StalledError(_stalled(self.pending, ev))
        work, job = self.pending.pop(ready[0])
        key = work.cell.key
        try:
            result = ray.get(ready[0])
        except Exception as err:                 # failed after its retries
            work.error = work.error or _error(err)
            self.left[key] -= job is not None
            return
        self.done[key] += 1
        self.progress(f"evaluate {key}", self.done[key], len(work.jobs) + 1)
        if job is None:
            save_analysis(work, result)
            return
        save_shard(work, job, result)
        self.left[key] -= 1
        if self.left[key] == 0 and work.error is None:
            self.analyse(work)


def evaluate(plan: Plan, works: list[CellWork],
             progress: Callable[[str, int, int | None], None]) -> None:
    """Run the missing shards, then each cell's analysis; fills ``work.error``/``.analysis``
    (a cell already complete in the storage is only read back)."""
    if all(w.complete for w in works):
        for work in works:
            work.analysis = work.finished_analysis()
            progress(f"evaluate {work.cell.key}", len(work.jobs) + 1, len(work.jobs) + 1)
        return
    dispatch = _Dispatch(plan, progress)
    for work in works:
        dispatch.start(work)
    while dispatch.pending:
        dispatch.finish_one()
