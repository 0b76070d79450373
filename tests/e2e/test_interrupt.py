"""Ctrl-C and a failing method, as a user meets them: ``python -m harness run`` in a fresh copy
of the project and a plain environment.

- Ctrl-C (SIGINT to the command's process group, as a terminal sends it) once the evaluation
  has written its first shards: exit code 130, "interrupted", no MLflow run left RUNNING (the
  parent run FAILED, so that the next ``run`` resumes it), every result file whole (each
  Parquet file reads, no temporary file left) and no process of the run's own Ray left.
- A method whose shard cannot be computed (its worker killed, no retries left): exit 1, the
  method's run FAILED with the error, the others FINISHED, the parent run FAILED.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from services import ray_processes, short_tmp, user_env, workspace

pytestmark = pytest.mark.slow

SPEC = ["jobs/smoke.yaml", "backbones=[tiny_vgg]",
        "methods=[gradcam, {name: rise, params: {n_masks: 400, batch_size: 100}}]",
        "data.limit=12", "sharding.images_per_task=2", "sharding.max_retries=0",
        "evaluation.overlays=0", "tracking.experiment=interrupt"]


def runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("interrupt")
    return client.search_runs([exp.experiment_id], "", max_results=100)


def shard_files(root: Path) -> list[Path]:
    return sorted((root / ".harness-cache" / "shards").glob("*/*/shard-*.parquet"))


def test_ctrl_c_exits_130_with_nothing_half_written(tmp_path):
    root, ray_tmp = workspace(tmp_path), short_tmp("int-")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", *SPEC], cwd=root,
                            env=user_env(tmp_path / "home", RAY_TMPDIR=ray_tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while not shard_files(root) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before any shard was written"
    assert shard_files(root), "no shard within 10 minutes"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted" in err
    all_runs = runs(root)
    assert all_runs and not [r.info.run_name for r in all_runs if r.info.status == "RUNNING"]
    parent = [r for r in all_runs if r.data.tags.get("harness_role") == "benchmark"]
    assert [r.info.status for r in parent] == ["FAILED"]
    cache = root / ".harness-cache"
    for shard in shard_files(root):
        assert pq.read_table(shard).num_rows == 2, shard
    leftovers = [p for p in cache.rglob("*") if p.is_file() and (".tmp" in p.name
                                                                  or p.name.endswith("~"))]
    assert not leftovers, leftovers
    time.sleep(2)
    assert not ray_processes(ray_tmp), "the run's own Ray outlived the interrupted command"


def test_a_failing_method_ends_failed_and_the_others_finish(tmp_path):
    root = workspace(tmp_path)
    res = subprocess.run([sys.executable, "-m", "harness", "run", *SPEC], cwd=root,
                         env=user_env(tmp_path / "home", HARNESS_TEST_FAIL_SHARD="gradcam:1"),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "1 method run(s) failed: tiny_vgg/gradcam" in res.stdout + res.stderr
    status = {r.data.tags.get("run_key", r.data.tags.get("harness_role")): r.info.status
              for r in runs(root)}
    assert status == {"tiny_vgg/gradcam": "FAILED", "tiny_vgg/rise": "FINISHED",
                      "benchmark": "FAILED"}, status
