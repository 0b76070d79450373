"""A killed Ray Tune sweep (``python -m harness tune``) resumes without rerunning finished
trials. (A whole sweep, as a user runs it, is in ``test_user_commands.py``.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services import fresh_cache, user_env

pytestmark = pytest.mark.slow

SWEEP = {
    "schema": 1, "name": "tiny_sweep", "seed": 0,
    "backbones": [{"name": "tiny_vgg"}],
    "data": {"kind": "quickstart", "train_limit": 160},
    "methods": [{"name": "lcam_img"}],
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "lr_decay": 0.9},
    "sweep": {"space": {"lr": {"grid": [0.05, 1.0e-6, 2.0e-6, 3.0e-6]}},
              "num_samples": 1, "metric": "val_loss",
              "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
              "validation_images": 32, "cpus_per_trial": 1},
}


def write_spec(folder: Path, name: str, **changes) -> Path:
    spec = json.loads(json.dumps(SWEEP))
    spec["name"] = name
    spec.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tune_cmd(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness", "tune", str(path), *extra]


@pytest.fixture()
def env(tmp_path):
    """Each test its own cache (sweep state, heads, results) on the shared data and backbones."""
    return user_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    HARNESS_CACHE_DIR=str(fresh_cache(tmp_path)))


def trial_results(exp_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for f in exp_dir.glob("*/result.json"):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out[f.parent.name] = lines
    return out


def test_resume_after_kill_does_not_rerun_finished_trials(tmp_path, env):
    from harness.spec import load_spec
    path = write_spec(tmp_path, "tiny_sweep_b", train={"epochs": 3, "batch_size": 32,
                                                       "lr": 0.05, "lr_decay": 0.9})
    spec = load_spec(path, sweep=True)
    exp_dir = Path(env["HARNESS_CACHE_DIR"]) / "tune" / f"{spec.name}-{spec.fingerprint()}"
    proc = subprocess.Popen(tune_cmd(path), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    finished = {}
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        results = trial_results(exp_dir) if exp_dir.exists() else {}
        finished = {k: len(v) for k, v in results.items() if v and v[-1].get("done")}
        if finished:
            break
        time.sleep(0.2)
    assert finished, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(tune_cmd(path), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(tune_cmd(path, "--resume"), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = trial_results(exp_dir)
    for trial, n in finished.items():
        assert len(after[trial]) == n, f"finished trial {trial} was run again"
    assert len(after) == 4 and all(v and v[-1].get("done") for v in after.values())
