"""The README's main job, ``jobs/quickstart.yaml``, gives exactly its pinned numbers.

Every AD, IC and #FW of the 16 rows equals the value recorded before the harness was
restructured (``golden/quickstart.json``). The run takes about 10 minutes on two cores
(heads for 3 epochs on 4,000 images, RISE with 500 masks on 200 images), so it is marked
``full`` and left out of the default run; run it with
``python3 -m pytest -m full tests/e2e/test_quickstart_numbers.py``. The smoke run's numbers
are pinned the same way in every run (``test_user_commands.py``).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

import golden
from services import user_env, workspace

pytestmark = [pytest.mark.slow, pytest.mark.full]


def test_quickstart_numbers_are_the_pinned_ones(tmp_path):
    root = workspace(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "jobs/quickstart.yaml"],
                          cwd=root, env=user_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id], "tags.harness_role = 'method'",
                              max_results=100)
    got = {r.data.tags["run_key"]: r.data.metrics for r in runs}
    rec = golden.pinned("quickstart")
    assert set(got) == set(rec["runs"])
    assert not golden.differences(got, rec)
