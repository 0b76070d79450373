"""Stage 3 of a run: the evaluation, laid out in shards and run on long-lived Ray workers.

``shard_jobs`` (pure) cuts every cell's images into shards of ``images_per_task`` and names
the cell's folder in the storage (``harness.data.storage``) by a hash of everything that
determines its rows: backbone and weights id, method, variant, parameters and version, kept
fractions, protocol preset, evaluation-list hash, seed, shard size, batch size, the head's
content hash, precision options and the rows format. Finished shard files are reused, so a
rerun, or a new spec that shares a cell, recomputes nothing.

``Evaluation`` sends every missing shard (``harness.pipeline.shards.run_shard``) to a pool of
evaluation workers (``harness.pipeline.workers``: Ray actors that keep their device, backbones
and explainers; a job's own error is retried ``sharding.max_retries`` times; a lost worker
is retired, its jobs sent again (``workers.LOST_WORKER_RETRIES``) and the pool regrown),
writes what each returns (rows, maps, summary) to the storage as it arrives, and, as soon as
all shards of a cell exist, runs that cell's analysis (``run_analysis``, on the same workers),
whose files are written beside the shards with an ``analysis.json`` saying it is done (reused
by later runs). Cells are added as they become ready, so the runner can start the cells that
need no trained head while the heads train (``harness.pipeline.runner``). A cell whose jobs
fail is reported as failed; the other cells go on. Nothing waits forever: when no job ends in
``sharding.stall_timeout_s`` the run stops and says what was pending.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import methods
from harness.data.cache import stable_hash
from harness.data.storage import Storage
from harness.pipeline import devices, resources
from harness.pipeline.inputs import Inputs
from harness.pipeline.plan import Cell, Plan
from harness.pipeline.shards import ROWS_VERSION, AnalysisJob, HeadRef, ShardJob
from harness.pipeline.workers import LOST_WORKER_RETRIES, WorkerPool, lost_worker

ANALYSIS_FILE = "analysis.json"     # a cell's analysis result; its presence means "done"
RESIZE_EVERY_S = 2.0                # how often the pool looks for room while nothing changes


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
            "pixels": inputs.prepared[cell.backbone].pixels,
            "per_task": ev.images_per_task, "batch": ev.batch_size, "head": head_hash,
            "method_version": methods.method_class(cell.method).version,
            "rows_version": ROWS_VERSION, "autocast": ev.autocast,
            "channels_last": ev.channels_last, **ev.metrics_identity(), **_device_identity(ev),
            **_library_identity(cell.method)}


def _library_identity(method: str) -> dict:
    """The library and version behind an adapted method (``pgc:LayerCAM``: grad-cam 1.5.7),
    whose numbers change with it; absent for the harness's own methods."""
    library = getattr(methods.method_class(method), "library", None)
    return {"library": library} if library else {}


def _device_identity(ev) -> dict:
    """The device type and arithmetic a cell's rows are computed with (CPU shards are never
    reused by a GPU run, nor float32 ones by a TF32 or autocast one). Absent for the CPU and
    float32 defaults, so that existing CPU caches keep their names."""
    device = "cuda" if ev.gpus_per_task > 0 else "cpu"
    out = {"device": device, "precision": devices.precision_name(ev.autocast, ev.tf32, device),
           "deterministic": ev.deterministic}
    return {} if out == {"device": "cpu", "precision": "float32", "deterministic": False} else out


def shard_jobs(plan: Plan, inputs: Inputs, heads: dict[str, HeadRef], storage: Storage,
               keys: list[str] | None = None) -> list[CellWork]:
    """Every cell's shards, or those of the cells ``keys`` (``heads``: cell key -> its head,
    for learned cells)."""
    ev, works = plan.evaluation, []
    for cell in plan.cells:
        if keys is not None and cell.key not in keys:
            continue
        head = heads.get(cell.key)
        head_hash = head.name.split("-", 1)[0] if head else None
        folder = storage.path("shards", cell.backbone, f"{cell.method_id}-"
                              f"{stable_hash(cell_identity(plan, inputs, cell, head_hash))}")
        n, per = inputs.images(cell.backbone), ev.images_per_task
        jobs = [ShardJob(cell=cell, images=plan.images[cell.backbone],
                         prepared=inputs.prepared_ref(cell.backbone),
                         weights_id=inputs.weights_id(cell.backbone), evaluation=ev, head=head,
                         seed=plan.seed, shard=i, indices=tuple(range(start, min(start + per, n))),
                         save_maps=ev.overlays if i == 0 else 0)
                for i, start in enumerate(range(0, n, per))]
        works.append(CellWork(cell, storage, folder, jobs))
    return works


def failed_work(plan: Plan, inputs: Inputs, storage: Storage, cell: Cell,
                error: str) -> CellWork:
    """The work of a cell that could not be evaluated (its head failed to train)."""
    del plan, inputs
    return CellWork(cell, storage, storage.path("shards", cell.backbone, cell.method_id), [],
                    error=error)


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


class Evaluation:
    """The evaluation in flight: cells added as they become ready (a learned cell once its
    head exists), their jobs queued and sent to the worker pool (``harness.pipeline.workers``)
    as workers have room, each result saved as it arrives, a cell's analysis after its last
    shard. ``step`` advances it; ``resize`` sizes the pool to what the cluster can hold next
    to the head fits still running. Use as a context manager: the workers stop at the end."""

    def __init__(self, plan: Plan, progress, pool_factory=None):
        self.plan, self.progress = plan, progress
        self.queue: deque = deque()              # (work, shard job, or None: its analysis)
        self.pending: dict = {}                  # object ref -> (work, job or None)
        self.left: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.lost: dict[tuple, int] = {}         # (cell, shard) -> times its worker was lost
        self._pool_factory = pool_factory
        self.pool = None
        self.last_end = time.monotonic()
        self._sized: tuple[list, float] = ([None], 0.0)      # (reserved, when) of the last resize

    def __enter__(self) -> "Evaluation":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.pending)

    def _show(self, work: CellWork) -> None:
        key = work.cell.key
        self.progress(f"evaluate {key}", self.done[key], len(work.jobs) + 1)

    def add(self, work: CellWork) -> None:
        """Queue what ``work`` still needs: its missing shards, else its analysis (a cell
        complete in the storage is only read back)."""
        key = work.cell.key
        todo = [j for j in work.jobs if not work.storage.exists(work.shard_path(j))]
        self.left[key], self.done[key] = len(todo), len(work.jobs) - len(todo)
        if not todo:
            work.analysis = work.finished_analysis() or {}
            if work.analysis:
                self.done[key] = len(work.jobs) + 1
            else:
                self.queue.appendleft((work, None))
        self._show(work)
        self.queue.extend((work, job) for job in todo)

    def resize(self, reserved: list[resources.Demand] = ()) -> None:
        """Start workers up to what the cluster holds beside ``reserved`` (running head
        fits), at most one per job waiting; never stops one."""
        if not self.queue:
            return
        if self.pool is None:
            self.pool = (self._pool_factory or WorkerPool)(self.plan.evaluation)
        reserved = list(reserved)
        now = time.monotonic()
        if reserved == self._sized[0] and now - self._sized[1] < RESIZE_EVERY_S:
            return                       # the cluster is looked at again every few seconds
        self._sized = (reserved, now)
        ev = self.plan.evaluation
        unit = resources.Demand("an evaluation worker", "sharding", ev.cpus_per_task,
                                ev.gpus_per_task)
        room = resources.slots(unit, resources.live_nodes(), reserved)
        self.pool.grow(min(room, len(self.queue) + len(self.pending)))

    def _feed(self) -> None:
        while self.queue and self.pool is not None and self.pool.free:
            work, job = self.queue[0]
            ref = self.pool.submit("run_shard" if job is not None else "run_analysis",
                                   job if job is not None else self._analysis_job(work))
            if ref is None:
                return
            self.queue.popleft()
            self.pending[ref] = (work, job)

    def _analysis_job(self, work: CellWork) -> AnalysisJob:
        first = work.jobs[0]
        maps_path = f"{work.folder}/maps-00000.pt"
        return AnalysisJob(cell=work.cell, images=first.images, prepared=first.prepared,
                           weights_id=first.weights_id, evaluation=self.plan.evaluation,
                           head=first.head, seed=self.plan.seed,
                           rows=work.storage.read_table(work.shard_paths),
                           maps=work.storage.read_bytes(maps_path)
                           if work.storage.exists(maps_path) else None)

    def step(self, timeout: float) -> None:
        """Send what the workers have room for, then save the next result to arrive within
        ``timeout`` seconds; ``StalledError`` when nothing ended in
        ``sharding.stall_timeout_s`` while jobs were pending."""
        import ray
        self._feed()
        if not self.pending:
            self.last_end = time.monotonic()
            if timeout > 0:
                time.sleep(min(timeout, 0.5))
            return
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not ready:
            if time.monotonic() - self.last_end > self.plan.evaluation.stall_timeout_s:
                raise StalledError(_stalled(self.pending, self.plan.evaluation))
            return
        self.last_end = time.monotonic()
        self._finish(ready[0], *self.pending.pop(ready[0]))

    def _finish(self, ref, work: CellWork, job) -> None:
        import ray
        key = work.cell.key
        try:
            result = ray.get(ref)
        except Exception as err:                 # failed after Ray's retries
            which = (key, None if job is None else job.shard)
            lost = self.lost.get(which, 0)
            if lost_worker(err) and lost < LOST_WORKER_RETRIES:
                self.pool.retire(ref)            # its worker was lost: again, elsewhere
                self.pool.release(ref)
                self._sized = ([None], 0.0)      # the pool regrows to the live nodes' room
                self.lost[which] = lost + 1
                self.queue.appendleft((work, job))
                return
            self.pool.release(ref)
            work.error = work.error or _error(err)
            self.left[key] -= job is not None
            return
        self.pool.release(ref)
        self.done[key] += 1
        self._show(work)
        if job is None:
            save_analysis(work, result)
            return
        save_shard(work, job, result)
        self.left[key] -= 1
        if self.left[key] == 0 and work.error is None:
            self.queue.appendleft((work, None))  # the cell's analysis before other shards

    def run(self) -> None:
        """Step until every queued job has ended (no head fit running)."""
        while self.busy:
            self.resize()
            self.step(self.plan.evaluation.stall_timeout_s)


def evaluate(plan: Plan, works: list[CellWork],
             progress: Callable[[str, int, int | None], None]) -> None:
    """Run the missing shards, then each cell's analysis; fills ``work.error``/``.analysis``
    (a cell already complete in the storage is only read back, and starts no worker)."""
    with Evaluation(plan, progress) as evaluation:
        for work in works:
            evaluation.add(work)
        evaluation.run()
