"""``python -m harness run`` of a spec naming pytorch-grad-cam's methods (``pgc:``), as a user
runs it: the cells run on the evaluation workers like the built-in ones, and MLflow records
each with its id, its display name and its #FW, nominal and measured by the harness's own
count (Score-CAM: one masked forward per channel of ``tiny_vgg``'s A, 128)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from services import user_env, workspace

pytest.importorskip("pytorch_grad_cam")
pytestmark = pytest.mark.slow

SPEC = """schema: 1
name: ecosystem
backbones: [tiny_vgg]
data: {kind: quickstart, limit: 6}
methods: [gradcam, "pgc:LayerCAM", "pgc:EigenCAM", "pgc:ScoreCAM"]
evaluation: {overlays: 0}
"""


def test_library_methods_run_as_cells_with_their_measured_forwards(tmp_path):
    root = workspace(tmp_path)
    (root / "ecosystem.yaml").write_text(SPEC)
    res = subprocess.run([sys.executable, "-m", "harness", "run", "ecosystem.yaml"], cwd=root,
                         env=user_env(tmp_path / "home"), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "LayerCAM (pgc)" in res.stdout and "ScoreCAM (pgc)" in res.stdout
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ecosystem")
    runs = {r.data.tags["method_id"]: r for r in client.search_runs([exp.experiment_id], "")
            if "method_id" in r.data.tags}
    assert set(runs) == {"gradcam", "pgc_layercam", "pgc_eigencam", "pgc_scorecam"}
    fw = {mid: (r.data.metrics["FW"], r.data.metrics["FW_measured"]) for mid, r in runs.items()}
    assert fw == {"gradcam": (1, 1), "pgc_layercam": (1, 1), "pgc_eigencam": (1, 1),
                  "pgc_scorecam": (128, 128)}
    assert all(r.info.status == "FINISHED" and r.data.metrics["images"] == 6
               for r in runs.values())
