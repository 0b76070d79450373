"""``python -m harness gpu-check --dry``: the GPU check's code runs on the CPU and meets its
targets there (the parity of identical devices, gloo collectives, a resumed fit, overlapping
quarter-share tasks, both refusals), so the script is ready wherever a GPU is lent."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services import REPO, user_env

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_meets_every_target(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "harness", "gpu-check", "--dry", "--out",
                           str(out)], cwd=REPO, env=user_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["dry"] and set(results["parity"]) == {"gradcam", "gradcampp", "scorecam",
                                                        "rise", "lcam_fm", "lcam_img"}
    assert all(r["spearman_float32"] > 0.999 for r in results["parity"].values())
    assert results["collectives"]["backend"] == "gloo"
    refusals = results["ray"]["refusals"]
    assert "needs 1 CPU and 1 GPU" in refusals["too_many_gpus"]
    assert "CUDA is not available" in refusals["missing_cuda"]
    assert results["ray"]["shards"]["max_at_once"] > 1
