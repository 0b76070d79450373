"""``bench --dispatch`` and ``bench --validate`` run and write their side-by-side times (no
timing targets here: the numbers are for the README's table, measured side by side)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services import REPO, user_env

pytestmark = pytest.mark.slow


def test_dispatch_bench_times_every_way_on_the_same_shards(tmp_path):
    out = tmp_path / "dispatch.json"
    res = subprocess.run([sys.executable, "-m", "harness", "bench", "--dispatch",
                          "--dispatch-shards", "3", "--dispatch-images", "2", "--out", str(out)],
                         cwd=REPO, env=user_env(tmp_path / "home"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["shards"] == 3 and got["images_per_shard"] == 2
    assert set(got["ways"]) == {"task, fresh process", "task, reused process",
                                "long-lived worker"}
    for way in got["ways"].values():
        assert way["inside_s_per_shard"] > 0
        assert way["wall_s_per_shard"] >= way["inside_s_per_shard"]
        assert way["first_shard_s"] > 0 and way["steady_s_per_shard"] > 0
    assert got["ways"]["long-lived worker"]["x_long_lived"] == 1.0
    assert "long-lived worker" in res.stdout


def test_dispatch_bench_refuses_an_empty_run(tmp_path):
    res = subprocess.run([sys.executable, "-m", "harness", "bench", "--dispatch",
                          "--dispatch-shards", "0", "--out", str(tmp_path / "d.json")],
                         cwd=REPO, env=user_env(tmp_path / "home"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "--dispatch-shards" in res.stderr
    assert not (tmp_path / "d.json").exists()


def test_validate_bench_compares_with_the_old_imports(tmp_path):
    out = tmp_path / "validate.json"
    res = subprocess.run([sys.executable, "-m", "harness", "bench", "--validate",
                          "jobs/smoke.yaml", "--validate-repeats", "1", "--out", str(out)],
                         cwd=REPO, env=user_env(tmp_path / "home"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    got = json.loads(out.read_text())
    assert set(got["ways"]) == {"validate", "with the old imports"}
    assert all(w["seconds"] > 0 and w["peak_mib"] > 0 for w in got["ways"].values())


def test_validate_of_the_embedded_spec_imports_neither_torchvision_nor_mlflow(tmp_path):
    code = ("import sys; from harness.cli import main; rc = main(['validate', 'jobs/smoke.yaml']); "
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torchvision', 'mlflow', 'ray'})); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                         env=user_env(tmp_path / "home"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "LOADED []" in res.stdout
