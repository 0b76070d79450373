"""Test-only fault injection: inert unless one of the variables below is set.

The reliability tests (``tests/e2e/test_reliability.py``, ``tests/e2e/test_two_nodes.py``)
kill what a real cluster loses, from inside the harness's own processes, at a chosen point:

- ``HARNESS_TEST_KILL_SHARD=<method_id>:<shard>``: the worker process running that shard
  (``shard_fault``; Ray retries the task, ``sharding.max_retries``);
- ``HARNESS_TEST_FAIL_SHARD=<method_id>:<shard>``: that shard raises (a method's own error,
  every time: not retried by the driver, only by Ray's ``sharding.max_retries``);
- ``HARNESS_TEST_KILL_TRAIN=<epoch>:<batch>``: the rank-0 Ray Train worker at that batch of
  that epoch (``train_fault``; ``FailureConfig`` restarts the group from the last checkpoint);
- ``HARNESS_TEST_KILL_NODE=train:<epoch>:<batch>,shard``: the whole Ray node (its raylet) of
  a training worker or of the first shard that runs off the head node (``kill_this_node``).

The kills fire once: a marker file created atomically (``O_CREAT | O_EXCL``, ``first_time``) in
the node's cache (``test-faults/``), or for node kills in ``HARNESS_TEST_FAULT_MARKERS`` (a
folder every node sees), lets the retry, and any later run, proceed normally.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from harness.data.cache import cache_dir


def first_time(marker: Path) -> bool:
    """Create ``marker`` atomically: True for the one caller that created it."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def kill_this_node(what: str) -> None:
    """Lose this Ray node, as a machine that goes away, unless it is the head node: SIGKILL
    its raylet (the parent of every worker), whose workers then die with it. Once per
    ``what`` when ``HARNESS_TEST_FAULT_MARKERS`` is set (the marker ``node-killed-<what>``)."""
    import ray
    me = ray.get_runtime_context().get_node_id()
    if any(n["NodeID"] == me and "node:__internal_head__" in n.get("Resources", {})
           for n in ray.nodes()):
        return
    markers = os.environ.get("HARNESS_TEST_FAULT_MARKERS")
    if markers and not first_time(Path(markers) / f"node-killed-{what}"):
        return
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def shard_fault(method_id: str, cell_key: str, shard: int) -> None:
    """Called as a shard task starts: the shard and node kills above."""
    if "shard" in os.environ.get("HARNESS_TEST_KILL_NODE", "").split(","):
        kill_this_node("shard")
    if os.environ.get("HARNESS_TEST_FAIL_SHARD") == f"{method_id}:{shard}":
        raise RuntimeError(f"planted failure of shard {shard} of {method_id} "
                           "(HARNESS_TEST_FAIL_SHARD)")
    if os.environ.get("HARNESS_TEST_KILL_SHARD") != f"{method_id}:{shard}":
        return
    if first_time(cache_dir() / "test-faults" / f"killed-{cell_key.replace('/', '-')}-{shard}"):
        os.kill(os.getpid(), signal.SIGKILL)


def train_fault(config: dict, rank: int, epoch: int, batch: int) -> None:
    """Called at every training batch: the training and node kills above. Both first wait
    until the controller has registered the previous epoch's checkpoint (it polls workers
    every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 0.5 s as the harness sets it): a worker that
    dies sooner loses that report and the group restarts one checkpoint earlier, which is
    correct but not the test."""
    if f"train:{epoch}:{batch}" in os.environ.get("HARNESS_TEST_KILL_NODE", "").split(","):
        _wait_for_checkpoint(epoch)
        kill_this_node("train")
    target = os.environ.get("HARNESS_TEST_KILL_TRAIN")
    if not target or rank != 0 or target != f"{epoch}:{batch}" or not config.get("fit"):
        return
    if first_time(cache_dir() / "test-faults" / f"{config['fit']}.killed"):
        _wait_for_checkpoint(epoch)
        os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_checkpoint(epoch: int) -> None:
    """Wait (60 s at most) until the controller has the previous epoch's checkpoint (its
    snapshot, read through the fit's storage filesystem)."""
    import ray.train
    storage = ray.train.get_context().get_storage()
    snapshot = f"{storage.experiment_fs_path}/checkpoint_manager_snapshot.json"
    deadline = time.time() + 60
    while epoch > 0 and time.time() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(snapshot) as f:
                latest = json.loads(f.read())["latest_checkpoint_result"]["metrics"]
            if latest["epoch"] >= epoch - 1:
                break
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.1)
