"""``python -m harness bench --dispatch``: what a shard costs beyond its own computation, for
each way of running shards on Ray, side by side in one run.

The same ``--dispatch-shards`` shards (``--dispatch-images`` generated 64 x 64 images each,
``tiny_vgg`` random init, Grad-CAM, the real ``harness.pipeline.shards.run_shard``), one
after another on one CPU, run three ways:

* **task, fresh process**: a Ray task per shard in a new worker process (``max_calls=1``),
  which is what a GPU task needs to drop its CUDA context: every shard pays the imports, the
  model and the first Parquet write (the harness's GPU path before the long-lived workers);
* **task, reused process**: a Ray task per shard in Ray's reused worker process (its CPU
  path before): the explainer is still made again for every shard;
* **long-lived worker**: ``harness.pipeline.workers.ShardWorker``, one actor fed shard
  after shard (what the harness does now, on CPU and GPU).

For each: the first shard's time (the worker's start included), the wall time per shard as
the driver sees it over all shards, the steady time per shard (the median gap between
consecutive completions after the first), the time inside the shard (``run_shard``'s own
stage seconds), wall minus inside (the per-shard start cost), and the wall and steady times
as multiples of the long-lived worker's.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _jobs(work: Path, shards: int, per: int) -> list:
    from harness.bench.pipeline import _jpegs
    from harness.data.prepared import prepare, ref_of
    from harness.metrics.protocol import PAPER, PAPER_FRACTIONS
    from harness.pipeline.plan import Cell, EvaluationPlan, ImageSet
    from harness.pipeline.shards import ShardJob
    import backbones
    root = _jpegs(work / "images", shards * per, (64, 64))
    images = ImageSet("folder", "val", (64, 64), root=str(root))
    prepared = prepare(images, images.build(), work / "cache")
    bb = backbones.load("tiny_vgg", weights=None)
    cell = Cell(backbone="tiny_vgg", weights=None, method="gradcam", method_id="gradcam",
                display_name="Grad-CAM", variant="paper", params={}, row=1,
                family="gradient", forward_passes=1)
    ev = EvaluationPlan(fractions=tuple(PAPER_FRACTIONS), preset=PAPER, batch_size=per,
                        overlays=0, autocast=False, channels_last=False,
                        images_per_task=per, cpus_per_task=1, gpus_per_task=0, max_retries=0)
    ref = ref_of(prepared, ship=False)
    return [ShardJob(cell=cell, images=images, prepared=ref, weights_id=bb.weights_id,
                     evaluation=ev, head=None, seed=0, shard=i,
                     indices=tuple(range(i * per, (i + 1) * per))) for i in range(shards)]


def _inside(result: dict) -> float:
    return sum(result["summary"]["seconds"].values())


def _one_by_one(task, jobs) -> tuple[float, list[float], list[float]]:
    """(wall seconds, seconds inside each shard, completion times from the start)."""
    import ray
    start, inside, done = time.perf_counter(), [], []
    for job in jobs:
        inside.append(_inside(ray.get(task.remote(job))))
        done.append(time.perf_counter() - start)
    return time.perf_counter() - start, inside, done


def _pool(ev, jobs) -> tuple[float, list[float], list[float]]:
    import ray

    from harness.pipeline.workers import WorkerPool
    pool = WorkerPool(ev)
    pool.grow(1)
    try:
        start, pending, inside, done, queue = time.perf_counter(), [], [], [], list(jobs)
        while queue or pending:
            while queue and pool.free:
                pending.append(pool.submit("run_shard", queue.pop(0)))
            ready, _ = ray.wait(pending, num_returns=1)
            pending.remove(ready[0])
            pool.release(ready[0])
            inside.append(_inside(ray.get(ready[0])))
            done.append(time.perf_counter() - start)
        return time.perf_counter() - start, inside, done
    finally:
        pool.shutdown()


def run(args) -> dict[str, Any]:
    """The three ways on the same shards (see the module docstring)."""
    import ray

    from harness.pipeline import ray_runtime
    from harness.pipeline.runner import REPO_ROOT
    from harness.pipeline.shards import run_shard
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        work = Path(tmp)
        jobs = _jobs(work, args.dispatch_shards, args.dispatch_images)
        ray_runtime.init_ray(None, 1, {"HARNESS_CACHE_DIR": str(work / "cache"),
                                       "PYTHONPATH": str(REPO_ROOT)})
        try:
            fresh = ray.remote(num_cpus=1, max_calls=1)(run_shard)   # only here: not an option
            reused = ray.remote(num_cpus=1)(run_shard)
            ways = {"task, fresh process": _one_by_one(fresh, jobs),
                    "task, reused process": _one_by_one(reused, jobs),
                    "long-lived worker": _pool(jobs[0].evaluation, jobs)}
        finally:
            ray.shutdown()
    n = len(jobs)
    base = ways["long-lived worker"][0] / n
    out = {}
    steady_base = _steady(ways["long-lived worker"][2])
    for name, (wall, inside, done) in ways.items():
        out[name] = {"wall_s_per_shard": wall / n, "first_shard_s": done[0],
                     "steady_s_per_shard": _steady(done),
                     "x_long_lived_steady": _steady(done) / steady_base,
                     "inside_s_per_shard": statistics.mean(inside),
                     "start_cost_s_per_shard": wall / n - statistics.mean(inside),
                     "x_long_lived": (wall / n) / base}
    return {"shards": n, "images_per_shard": args.dispatch_images, "ways": out}


def _steady(done: list[float]) -> float:
    """The median time between one shard's completion and the next's (after the first: the
    cost of a shard once everything has started)."""
    gaps = [b - a for a, b in zip(done, done[1:])]
    return statistics.median(gaps) if gaps else done[0]


def table(results: dict[str, Any]):
    from rich.table import Table
    t = Table(title=f"{results['shards']} shards of {results['images_per_shard']} images, "
                    "one after another on one CPU (tiny_vgg, Grad-CAM)", title_justify="left")
    for col in ("way", "first shard", "wall per shard", "steady per shard", "inside the shard",
                "start cost per shard", "x long-lived (all)", "x long-lived (steady)"):
        t.add_column(col, justify="left" if col == "way" else "right")
    for name, r in results["ways"].items():
        t.add_row(name, f"{r['first_shard_s'] * 1e3:.0f} ms",
                  f"{r['wall_s_per_shard'] * 1e3:.0f} ms",
                  f"{r['steady_s_per_shard'] * 1e3:.0f} ms",
                  f"{r['inside_s_per_shard'] * 1e3:.0f} ms",
                  f"{r['start_cost_s_per_shard'] * 1e3:.0f} ms", f"{r['x_long_lived']:.2f}x",
                  f"{r['x_long_lived_steady']:.2f}x")
    return t
