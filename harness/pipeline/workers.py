"""Long-lived evaluation workers: one Ray actor per GPU share (or CPU slot), fed shard after shard.

A Ray task per shard would start over for every shard where it matters most: on a GPU a
fresh process per task (what a GPU task needs to drop its CUDA context) pays the imports, the
CUDA context, the backbone's weights (VGG-16: 528 MB; 40 shards a cell) and the first
pyarrow write each time, for a shard that computes for a fraction of a second. So the
evaluation runs on a pool of actors (``ShardWorker``), each holding its resources
(``sharding.cpus_per_task`` CPUs, ``sharding.gpus_per_task`` of a GPU: fractions share one)
for the whole evaluation. A worker's process keeps what it loaded (``harness.pipeline.shards``
caches the backbones, the prepared images and the explainers, heads included), so each is
loaded once per worker, not once per shard.

``WorkerPool`` is the driver's side: it starts the actors (as many as the cluster can hold
next to what head training reserves: ``resources.slots``, and grows when a fit ends), keeps
at most ``DEPTH`` jobs queued on each (the next one is waiting when the current one ends) and
sends each job to the least busy worker. A job's own exception (the listed ``RETRIED`` ones)
is retried by Ray on the same worker (``max_task_retries`` = ``sharding.max_retries``). A
worker that is lost (killed, out of memory, its node gone) is not restarted by Ray
(``max_restarts=0``): Ray would restart it wherever it could, and where the cluster has no
room left (its node gone, the others full) the restart, and every job queued on it, would
wait forever. Instead its jobs fail at once (``lost_worker``: Ray's actor errors, never the
job's own exception) and come back to the driver, which retires that worker (``retire``) and
queues the jobs again, up to ``LOST_WORKER_RETRIES`` times per job
(``harness.pipeline.evaluation``); the pool then grows again to what the live nodes hold.
``ShardWorker`` is a plain class: the GPU check and the benchmarks run it
in-process, without Ray.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

#: jobs queued on one worker at most: the one it computes and the next one, so that it never
#: waits for the driver between two shards
DEPTH = 2
#: exceptions after which a job is retried (a worker's death always is)
RETRIED = (OSError, RuntimeError)
#: times a job is sent again after its worker was lost, beyond Ray's own retries
LOST_WORKER_RETRIES = 5


def lost_worker(err: BaseException) -> bool:
    """Whether ``err`` (from ``ray.get``) says the worker was lost, not that the job failed."""
    from ray.exceptions import RayActorError
    return isinstance(err, RayActorError)


class ShardWorker:
    """An evaluation worker: runs shard and analysis jobs one after another in one process
    (``harness.pipeline.shards.run_shard``/``run_analysis``), which keeps what they load."""

    def __init__(self):
        self.started, self.jobs = time.time(), 0

    def run_shard(self, job) -> dict:
        from harness.pipeline.shards import run_shard
        self.jobs += 1
        out = run_shard(job)
        out["summary"]["worker_jobs"] = self.jobs
        return out

    def run_analysis(self, job) -> dict:
        from harness.pipeline.shards import run_analysis
        self.jobs += 1
        return run_analysis(job)

    def describe(self) -> dict[str, Any]:
        """Where the worker runs and what Ray gave it (GPU ids on a GPU share)."""
        info = {"pid": os.getpid(), "node": socket.gethostname(), "jobs": self.jobs,
                "gpu_ids": []}
        try:
            import ray
            if ray.is_initialized():
                info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
                info["node_id"] = ray.get_runtime_context().get_node_id()
        except Exception:                                 # outside Ray
            pass
        return info


def actor_options(ev) -> dict[str, Any]:
    """Ray options of the evaluation's workers (``ev``: the plan's ``EvaluationPlan``)."""
    return dict(num_cpus=ev.cpus_per_task, num_gpus=ev.gpus_per_task, max_restarts=0,
                max_task_retries=ev.max_retries)


def call_options(ev) -> dict[str, Any]:
    """Ray options of each job sent to a worker."""
    return dict(max_task_retries=ev.max_retries, retry_exceptions=list(RETRIED))


class WorkerPool:
    """The driver's pool of ``ShardWorker`` actors (see the module docstring). Workers live
    in slots; a lost one's slot is retired (never reused), so ``len`` counts the live ones."""

    def __init__(self, ev, depth: int = DEPTH):
        import ray
        self.ev, self.depth = ev, depth
        self.actor = ray.remote(ShardWorker).options(**actor_options(ev))
        self.workers: list[Any] = []
        self.busy: list[int] = []              # jobs queued on each worker
        self.live: list[bool] = []             # False: retired (lost)
        self.owner: dict[Any, int] = {}        # object ref -> slot

    def __len__(self) -> int:
        return sum(self.live)

    def grow(self, size: int) -> int:
        """Start workers until ``size`` are live (never fewer than now); the number started."""
        added = 0
        while len(self) < size:
            self.workers.append(self.actor.remote())
            self.busy.append(0)
            self.live.append(True)
            added += 1
        return added

    @property
    def free(self) -> int:
        """Jobs the pool takes now without queueing more than ``depth`` on a worker."""
        return sum(self.depth - b for b, live in zip(self.busy, self.live) if live)

    def submit(self, method: str, job) -> Any | None:
        """Send ``job`` to ``method`` of the least busy live worker: its object ref, or None
        when every worker has ``depth`` jobs queued."""
        slots = [i for i, live in enumerate(self.live) if live]
        if not slots:
            return None
        i = min(slots, key=self.busy.__getitem__)
        if self.busy[i] >= self.depth:
            return None
        ref = getattr(self.workers[i], method).options(**call_options(self.ev)).remote(job)
        self.busy[i] += 1
        self.owner[ref] = i
        return ref

    def release(self, ref) -> None:
        """``ref``'s job has ended (with a result or an error)."""
        i = self.owner.pop(ref, None)
        if i is not None:
            self.busy[i] -= 1

    def retire(self, ref) -> bool:
        """The worker that ran ``ref`` was lost: kill what is left of it and take it out of
        the pool (once: the other jobs queued on it fail too, and find it retired). Call
        before ``release``; True if a worker was retired."""
        import ray
        i = self.owner.get(ref)
        if i is None or not self.live[i]:
            return False
        self.live[i] = False
        try:
            ray.kill(self.workers[i], no_restart=True)
        except Exception:                      # already gone
            pass
        return True

    def describe(self) -> list[dict[str, Any]]:
        import ray
        return ray.get([w.describe.remote() for w, live in zip(self.workers, self.live)
                        if live])

    def shutdown(self) -> None:
        """Stop every worker (their resources go back to the cluster)."""
        import ray
        for worker, live in zip(self.workers, self.live):
            if live:
                ray.kill(worker, no_restart=True)
        self.workers, self.busy, self.live, self.owner = [], [], [], {}
