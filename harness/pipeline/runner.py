"""``python -m harness run SPEC``: a benchmark, as a sequence of stages over its plan.

    plan = plan(spec)                              what will be computed (pure)
    check_cluster_first(spec, plan)                what the cluster can never run: exit 2, before
                                                   anything is made (GPUs: CUDA on every node)
    inputs = prepare_data(plan); load_backbones()  data made and checked (bad input: exit 2)
    init_ray(...); cluster.check_nodes(...)        only if something is left to compute
    open_runs(...)                                 MLflow: a parent run, a child per cell
    train_and_evaluate(...)                        at once: the heads train (Ray Train, one fit
                                                   per head group, cached) while long-lived Ray
                                                   workers evaluate the cells ready: shards,
                                                   then each cell's analysis
    record_cell(...) for each cell; show(...)      numbers and files to MLflow, Table 1

Everything finished is kept under the cache (``storage.uri``) and reused: a rerun only
re-aggregates; a killed run resumes (heads from their last epoch checkpoint, shards from the
files that exist, MLflow runs found again by their tags). docs/architecture.md walks through
it with the files involved.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.data.cache import cache_dir, check_persistent, use_storage, write_text_atomic
from harness.data.storage import Storage
from harness.pipeline import cluster, ray_runtime, resources
from harness.pipeline.evaluation import CellWork, Evaluation, failed_work, shard_jobs
from harness.pipeline.heads import head_files, head_refs, missing_heads
from harness.pipeline.training import HeadTraining
from harness.pipeline.inputs import load_backbones, prepare_data
from harness.pipeline.plan import Plan, plan as make_plan
from harness.results.record import common_tags, open_runs, record_cell, show
from harness.results.tracking import Tracker, tracking_uri
from harness.terminal import make_console

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    """What ``run_benchmark`` returns: where the run is and what it measured."""

    parent_run_id: str
    tracking_uri: str
    metrics: dict[str, dict] = field(default_factory=dict)    # cell key -> metrics
    failed: dict[str, str] = field(default_factory=dict)      # cell key -> error


def prepare_locations(spec) -> tuple[str, Storage]:
    """Apply the spec's storage, refuse temporary locations under a Ray job: the MLflow URI
    and the results storage (``storage.uri``, else the cache folder)."""
    use_storage(spec.storage.uri, spec.storage.cache)
    uri = spec.tracking.uri or tracking_uri()
    check_persistent(uri)
    return uri, Storage(spec.storage.uri or cache_dir())


def init_ray(spec) -> None:
    """Start or join Ray for this spec; every worker gets the cache root, the MLflow and
    thread variables and, on a local Ray, this checkout on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("HARNESS_", "MLFLOW_", "RAY_TRAIN_", "OMP_"))}
    env["HARNESS_CACHE_DIR"] = str(cache_dir())
    if ray_runtime.cluster_address(spec.ray.address) is None:   # a job's workers have its files
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          os.environ.get("PYTHONPATH")]))
    ray_runtime.init_ray(spec.ray.address, spec.ray.num_cpus, env, spec.ray.runtime_env)


class _Bars:
    """``progress(label, done, total)`` on one rich progress bar per label."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def check_cluster_first(spec, plan: Plan) -> None:
    """What the cluster can never run is refused before the data are made or a backbone is
    trained (minutes on a cold cache): on a cluster (``ray.address``, ``RAY_ADDRESS``) or when
    GPUs are asked for, Ray is joined or started now and its nodes are checked
    (``resources.check``, ``cluster.check_gpus``); a local CPU run is checked against this
    machine without starting Ray (a rerun that only re-aggregates never starts it)."""
    wanted = resources.demands(plan)
    if ray_runtime.cluster_address(spec.ray.address) is None and not cluster.asks_for_gpus(plan):
        resources.check(wanted, [{"CPU": float(spec.ray.num_cpus or os.cpu_count() or 1),
                                  "GPU": 0.0}])
        return
    init_ray(spec)
    resources.check(wanted)
    if cluster.asks_for_gpus(plan):
        cluster.check_gpus()


def left_to_compute(plan: Plan, inputs, storage: Storage) -> bool:
    """Whether any head, shard or analysis of the plan is not in the storage yet (a rerun
    that only re-aggregates starts no Ray)."""
    files = head_files(plan, inputs, storage)
    if missing_heads(plan, files, storage):
        return True
    works = shard_jobs(plan, inputs, head_refs(plan, storage, files), storage)
    return not all(work.complete for work in works)


def _save_spec(spec, root: Path) -> Path:
    return write_text_atomic(root / "specs" / f"{spec.name}-{spec.fingerprint()}.yaml",
                             yaml.safe_dump(spec.to_dict(), sort_keys=False))


def run_benchmark(spec, console: Console | None = None) -> RunResult:
    """Run a validated spec (see the module docstring); raises if any cell failed."""
    console, clock = console or make_console(), Stopwatch()
    uri, storage = prepare_locations(spec)
    root, plan = cache_dir(), make_plan(spec)
    with clock("ray"):
        check_cluster_first(spec, plan)
    with _progress(console) as progress:
        with clock("data"):
            inputs = prepare_data(plan, _Bars(progress), root)
        with clock("backbones"):
            load_backbones(plan, inputs, _Bars(progress))
    if left_to_compute(plan, inputs, storage):
        with clock("ray"):
            init_ray(spec)
            cluster.check_nodes(cluster.data_roots(plan), storage, trains=missing_heads(
                plan, head_files(plan, inputs, storage), storage),
                store_roots_of=cluster.store_roots(plan))
    tracker = Tracker(plan.experiment, uri)
    spec_file = _save_spec(spec, root)
    tags = common_tags(plan, spec.tracking.tags)
    parent_id = tracker.parent_run(spec.name, spec.fingerprint(), tags)
    result, run_ids, completed, works = RunResult(parent_id, tracker.uri), {}, False, []
    try:
        with _progress(console) as progress:
            bars = _Bars(progress)
            with clock("tracking"):
                run_ids = open_runs(plan, inputs, tracker, parent_id, tags)
            works = train_and_evaluate(plan, inputs, storage, tracker.uri, run_ids, bars, clock)
        with clock("tracking"):
            for work in works:
                tracker.log(run_ids[work.cell.key], tags={"shard_dir": work.folder})
                result.metrics[work.cell.key] = record_cell(plan, inputs, work, tracker,
                                                            run_ids[work.cell.key], spec_file)
                if work.error:
                    result.failed[work.cell.key] = work.error
            tracker.artifact(parent_id, spec_file)
        completed = True
    finally:
        _close_runs(tracker, parent_id, run_ids, ok=completed and not result.failed)
    inside = _task_seconds(works if completed else [])
    _log_time(clock, inside, tracker, parent_id)    # before the report: its page shows them
    with clock("tracking"):
        show(plan, inputs, result.metrics, tracker, parent_id, root / "reports" / parent_id,
             console)
    _log_time(clock, inside, tracker, parent_id)    # the tracking span now with the report
    _print_time(clock, inside, console)
    _raise_failures(plan, result, console)
    return result


def train_and_evaluate(plan: Plan, inputs, storage: Storage, tracking_uri: str,
                       run_ids: dict[str, str], progress, clock: "Stopwatch") -> list:
    """The heads train (``HeadTraining``, in background threads) while the evaluation
    (``Evaluation``) runs every cell that needs no trained head; a learned cell joins as soon
    as its fit ends, and the evaluation's workers grow into what each ended fit held. The
    cells' works in plan order; a cell whose head failed to train has its ``error`` set."""
    training = HeadTraining(plan, inputs, storage, tracking_uri, run_ids, progress)
    ready = [c.key for c in plan.cells if not training.waits_for(c.key)]
    works: dict[str, CellWork] = {}
    with Evaluation(plan, progress) as evaluation:

        def add(keys: list[str]) -> None:
            if not keys:
                return
            heads = head_refs(plan, storage, {k: training.files[k] for k in keys
                                              if k in training.files})
            for work in shard_jobs(plan, inputs, heads, storage, keys):
                works[work.cell.key] = work
                evaluation.add(work)

        clock.begin("evaluation")
        add(ready)
        if training.fits:
            clock.begin("heads")
        training.start()
        stall = plan.evaluation.stall_timeout_s
        while training.running or evaluation.busy:
            evaluation.resize(training.demands())
            evaluation.step(0.5 if training.running else stall)
            add(training.poll())
            if training.fits and not training.running:
                clock.end("heads")
        clock.end("evaluation")
    for key, error in training.failed.items():
        cell = next(c for c in plan.cells if c.key == key)
        works[key] = failed_work(plan, inputs, storage, cell, error)
    return [works[c.key] for c in plan.cells]


class Stopwatch(dict):
    """Wall-clock seconds per stage of the driver: ``with clock("heads"): ...`` adds up, and
    ``spans`` keeps when each stage first began and last ended (seconds since the clock
    started), where stages overlap (the heads train while the evaluation runs)."""

    def __init__(self):
        super().__init__()
        self.zero = time.perf_counter()
        self.spans: dict[str, list[float]] = {}
        self._open: dict[str, float] = {}

    def begin(self, stage: str) -> None:
        now = time.perf_counter()
        self._open.setdefault(stage, now)
        self.spans.setdefault(stage, [now - self.zero, now - self.zero])

    def end(self, stage: str) -> None:
        start = self._open.pop(stage, None)
        if start is None:
            return
        now = time.perf_counter()
        self[stage] = self.get(stage, 0.0) + now - start
        self.spans[stage][1] = now - self.zero

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self.begin(stage)
        try:
            yield
        finally:
            self.end(stage)


def _task_seconds(works) -> dict[str, float]:
    """The seconds inside the Ray tasks per stage, summed over tasks (on N workers they
    overlap)."""
    inside: dict[str, float] = {}
    for work in works:
        for stage, sec in work.task_seconds().items():
            inside[stage] = inside.get(stage, 0.0) + sec
    return inside


def _log_time(clock: Stopwatch, inside: dict[str, float], tracker: Tracker,
              parent_id: str) -> None:
    """Where the run's time went, to the parent run: the driver's stages
    (``seconds_<stage>``), the seconds inside the tasks (``task_seconds_<stage>``) and when
    the overlapping stages began and ended (``began_``/``ended_<stage>``)."""
    overlapping = [k for k in ("heads", "evaluation") if k in clock.spans]
    tracker.log(parent_id, metrics={**{f"seconds_{k}": v for k, v in clock.items()},
                                    **{f"task_seconds_{k}": v for k, v in inside.items()},
                                    **{f"{edge}_{k}": clock.spans[k][i] for k in overlapping
                                       for i, edge in enumerate(("began", "ended"))}})


def _print_time(clock: Stopwatch, inside: dict[str, float], console) -> None:
    """The same, one line under the table."""
    overlapping = [k for k in ("heads", "evaluation") if k in clock.spans]
    console.print("time: " + ", ".join(
        f"{k} {v:.1f} s" + (f" (at {clock.spans[k][0]:.0f}-{clock.spans[k][1]:.0f} s)"
                            if k in overlapping else "") for k, v in clock.items())
                  + (" (inside the tasks: " + ", ".join(f"{k} {v:.1f} s"
                                                        for k, v in inside.items()) + ")"
                     if inside else ""))


def _close_runs(tracker: Tracker, parent_id: str, run_ids: dict[str, str], ok: bool) -> None:
    """Never leave a run RUNNING (a rerun resumes the ones that did not finish)."""
    if not ok:
        for run_id in run_ids.values():
            if tracker.client.get_run(run_id).info.status == "RUNNING":
                tracker.finish(run_id, ok=False)
    tracker.finish(parent_id, ok=ok)


def _raise_failures(plan: Plan, result: RunResult, console: Console) -> None:
    for key, error in result.failed.items():
        console.print(f"[red]failed[/red] {key}: {error}")
    if result.failed:
        first = next(iter(result.failed))
        raise RuntimeError(f"{len(result.failed)} method run(s) failed: "
                           + ", ".join(result.failed)
                           + f" (first, {first}: {result.failed[first]})")
