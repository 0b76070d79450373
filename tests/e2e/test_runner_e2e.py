"""End to end: ``jobs/smoke.yaml`` on local Ray against a real MLflow server (artifacts
through the server), then reuse and determinism after a deleted shard. Shares the test cache
(data, embedded backbones) with the other tests. (``ray job submit`` is tested with the
README's own commands in ``test_readme_cluster.py``.)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from services import REPO, fresh_cache, mlflow_server, short_tmp, user_env

pytestmark = pytest.mark.slow

SMOKE = REPO / "jobs" / "smoke.yaml"
METRICS = {"AD_100", "IC_100", "AD_50", "IC_50", "AD_15", "IC_15", "FW", "seconds_per_image"}


def run_harness(args, env, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def smoke_spec():
    from harness.spec import load_spec
    return load_spec(SMOKE)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def child_runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("harness_role") == "benchmark"]
    children = [r for r in runs if r.data.tags.get("harness_role") == "method"]
    return parents, children


@pytest.fixture(scope="module")
def env(server, tmp_path_factory):
    return user_env(MLFLOW_TRACKING_URI=server,
                    HARNESS_CACHE_DIR=str(fresh_cache(tmp_path_factory.mktemp("e2e"))))


@pytest.fixture(scope="module")
def first_run(env):
    run_harness(["run", str(SMOKE), "tracking.experiment=e2e-local"], env)


def test_smoke_run_on_local_ray_logs_to_mlflow_server(server, env, first_run):
    spec = smoke_spec()
    client = MlflowClient(server)
    parents, children = child_runs(client, "e2e-local")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    expected = {(b.name, m.id) for b in spec.backbones for m in spec.methods}
    got = {(r.data.tags["backbone"], r.data.tags["method_id"]) for r in children}
    assert got == expected
    n_images = None
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["method"] in {m.name for m in spec.methods}
        for tag in ("git_commit", "version.torch", "eval_list_hash", "protocol_preset",
                    "weights_id"):
            assert r.data.tags.get(tag), tag
        if r.data.tags["method"] == "rise":
            assert len(r.data.tags["rise_mask_hash"]) == 16
        assert METRICS <= set(r.data.metrics), set(r.data.metrics)
        assert r.info.run_name.startswith(r.data.tags["backbone"])
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"per_image.parquet", "overlays.png"} <= artifacts, artifacts
        if r.data.tags["method"].startswith("lcam"):
            assert "head" in artifacts
        local = client.download_artifacts(r.info.run_id, "per_image.parquet", short_tmp("art"))
        rows = pq.read_table(local)
        assert {"image_id", "class_explained", "ground_truth", "Y", "O_100", "O_50", "O_15",
                "degenerate", "forward_passes", "seconds"} <= set(rows.column_names)
        n_images = n_images or rows.num_rows
        assert rows.num_rows == n_images == r.data.metrics["images"]
        assert len(set(rows.column("image_id").to_pylist())) == rows.num_rows
    assert n_images == spec.data.limit


def test_shard_reuse_and_determinism_after_deleted_shard(server, env, first_run):
    """The cache of the run above: delete one shard; the rerun recomputes only that one."""
    client = MlflowClient(server)
    _, first = child_runs(client, "e2e-local")
    before = {r.data.tags["run_key"]: r.data.metrics for r in first}
    shards = sorted(p for r in first for p in Path(r.data.tags["shard_dir"]).glob("shard-*.parquet"))
    assert len(shards) == sum(2 for _ in first)          # 12 images, 6 per task
    victim = next(s for s in shards if "/gradcampp-" in str(s))
    others = {s: s.stat().st_mtime_ns for s in shards if s != victim}
    victim.unlink()
    run_harness(["run", str(SMOKE), "tracking.experiment=e2e-local"], env)
    assert victim.exists(), "the deleted shard was not recomputed"
    assert all(s.stat().st_mtime_ns == t for s, t in others.items()), "finished shards were redone"
    parents, runs = child_runs(client, "e2e-local")
    latest = max(parents, key=lambda r: r.info.start_time).info.run_id
    after = {r.data.tags["run_key"]: r.data.metrics for r in runs
             if r.data.tags["mlflow.parentRunId"] == latest}
    for key, metrics in before.items():
        for name in METRICS - {"seconds_per_image"}:
            assert after[key][name] == metrics[name], (key, name)
