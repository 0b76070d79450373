"""A job whose evaluation worker was lost (its node gone, the process killed) comes back to the
driver at once (Ray does not restart the worker: ``max_restarts=0``), which retires that
worker once and sends the job again, up to ``LOST_WORKER_RETRIES`` times, and lets the pool
regrow to the live nodes; a job's own exception is never sent again by the driver (Ray's
``max_task_retries`` covers it). The two-node test loses a real node mid-evaluation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.pipeline import ray_runtime

ray_runtime.prepare_environment(None)      # before ray is imported (loopback-only Ray)
import ray  # noqa: E402
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError  # noqa: E402

from harness.pipeline import evaluation as ev_mod  # noqa: E402
from harness.pipeline.evaluation import Evaluation  # noqa: E402
from harness.pipeline.workers import LOST_WORKER_RETRIES, WorkerPool, actor_options  # noqa: E402


class Pool:
    """The driver's view of a pool: which refs were released, which workers replaced."""

    def __init__(self):
        self.released, self.replaced = [], []

    def retire(self, ref):
        self.replaced.append(ref)
        return True

    def release(self, ref):
        self.released.append(ref)


def _evaluation(monkeypatch, outcomes: dict):
    def get(ref):
        out = outcomes[ref]
        if isinstance(out, BaseException):
            raise out
        return out
    monkeypatch.setattr(ray, "get", get)
    saved = []
    monkeypatch.setattr(ev_mod, "save_shard", lambda work, job, result: saved.append(job.shard))
    evaluation = Evaluation(SimpleNamespace(evaluation=None), progress=lambda *a: None)
    evaluation.pool = Pool()
    work = SimpleNamespace(cell=SimpleNamespace(key="cell"), error=None, jobs=[1, 2])
    evaluation.left["cell"], evaluation.done["cell"] = 2, 0
    return evaluation, work, saved


@pytest.mark.parametrize("lost", [ActorUnavailableError("RPC error: Socket closed", None),
                                  ActorDiedError()])
def test_a_job_whose_worker_was_lost_goes_again_to_a_fresh_worker(monkeypatch, lost):
    job = SimpleNamespace(shard=0)
    evaluation, work, saved = _evaluation(monkeypatch, {"r1": lost, "r2": {"rows": 1}})
    evaluation._finish("r1", work, job)
    assert evaluation.pool.replaced == ["r1"] and evaluation.pool.released == ["r1"]
    assert list(evaluation.queue) == [(work, job)] and work.error is None
    assert evaluation.left["cell"] == 2                 # not counted as ended
    assert evaluation._sized == ([None], 0.0)           # the pool is sized again next step
    evaluation.queue.clear()
    evaluation._finish("r2", work, job)
    assert saved == [0] and evaluation.left["cell"] == 1 and work.error is None


def test_a_worker_lost_every_time_ends_the_job_with_its_error(monkeypatch):
    job = SimpleNamespace(shard=1)
    lost = ActorUnavailableError("RPC error: failed to connect to all addresses", None)
    evaluation, work, _ = _evaluation(monkeypatch, {"r": lost})
    for _ in range(LOST_WORKER_RETRIES):
        evaluation._finish("r", work, job)
        assert work.error is None and evaluation.queue
        evaluation.queue.clear()
    evaluation._finish("r", work, job)
    assert "ActorUnavailableError" in work.error and not evaluation.queue
    assert evaluation.left["cell"] == 1 and len(evaluation.pool.replaced) == LOST_WORKER_RETRIES


def test_a_job_s_own_exception_is_not_sent_again(monkeypatch):
    job = SimpleNamespace(shard=0)
    failed = RayTaskError("run_shard", "Traceback ...", ValueError("bad map"))
    evaluation, work, _ = _evaluation(monkeypatch, {"r": failed})
    evaluation._finish("r", work, job)
    assert not evaluation.queue and evaluation.pool.replaced == []
    assert evaluation.pool.released == ["r"] and work.error and evaluation.left["cell"] == 1


def test_a_lost_worker_is_retired_once_and_the_pool_regrows_beside_it(monkeypatch):
    """The pool's side: the second job queued on the lost worker finds it retired already;
    no job goes to a retired worker; ``grow`` counts the live ones. Ray never restarts a
    worker (a restart where there is no room would hold its jobs forever)."""
    killed, started = [], []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: killed.append(actor))
    assert actor_options(SimpleNamespace(cpus_per_task=1, gpus_per_task=0,
                                         max_retries=2))["max_restarts"] == 0
    pool = WorkerPool.__new__(WorkerPool)
    pool.ev, pool.depth = SimpleNamespace(max_retries=1), 2
    calls = []

    class Worker:
        def __init__(self, name):
            self.name = name
            self.run_shard = SimpleNamespace(options=lambda **kw: SimpleNamespace(
                remote=lambda job: calls.append((self.name, job)) or f"{self.name}:{job}"))

    pool.actor = SimpleNamespace(remote=lambda: started.append(1) or Worker(f"w{len(started)}"))
    pool.workers, pool.busy, pool.live, pool.owner = [], [], [], {}
    assert pool.grow(2) == 2 and len(pool) == 2 and pool.free == 4
    a, b = pool.submit("run_shard", "a"), pool.submit("run_shard", "b")
    c = pool.submit("run_shard", "c")
    assert [w for w, _ in calls] == ["w1", "w2", "w1"]
    assert pool.retire(a) is True and len(pool) == 1 and [w.name for w in killed] == ["w1"]
    pool.release(a)
    assert pool.retire(c) is False and len(killed) == 1           # already retired
    pool.release(c)
    assert pool.free == 1                                          # w2's second place only
    pool.submit("run_shard", "d")
    assert calls[-1][0] == "w2"                                    # never the retired one
    assert pool.grow(2) == 1 and len(pool) == 2 and started == [1, 1, 1]
