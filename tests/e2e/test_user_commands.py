"""Every command as a user runs it: a subprocess in a fresh copy of the project, a plain shell.

The environment is a user's (``services.user_env``: PATH, a fresh HOME without a Ray token,
no Ray or MLflow variables), the cache and the MLflow store are the documented defaults
(``./.harness-cache``, ``sqlite:///./mlflow.db``) and the commands are the README's. The copy's
cache starts with the shared generated inputs (data set, embedded backbones) and nothing
else: heads, shards, runs and sweeps are made here. One session runs the commands in the
order a new user would (``run``, ``tune``, ``report``, ``explain``, ``bench``; independent
ones side by side) and the tests check what each left behind. The ``run`` is the session-wide
``smoke_project`` (tests/conftest.py), made once for this module and
``test_readme_cluster.py``; deleting one of its shard files and running again (that shard
alone recomputed, the same numbers) is checked on the cluster, by the README's second
submit (``test_readme_cluster.test_a_second_submit_reuses_the_cache``).
"""
from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

import golden
from services import DOCUMENTED, REPO, user_env

pytestmark = pytest.mark.slow

FRACTIONS = ("100", "50", "15")


class Session:
    """A user's shell in a fresh copy of the project: ``run(*args)`` -> CompletedProcess."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home

    def run(self, *args: str, timeout: float = 600, executable=None) -> subprocess.CompletedProcess:
        cmd = list(executable or [sys.executable, "-m", "harness"]) + list(args)
        return subprocess.run(cmd, cwd=self.root, env=user_env(self.home), capture_output=True,
                              text=True, timeout=timeout)

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess:
        proc = self.run(*args, **kw)
        assert proc.returncode == 0, f"{args}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        return proc

    def together(self, *calls):
        """Independent commands at the same time (two cores; each imports torch alone):
        ``calls`` are (method, args, kwargs) of this session, the results in that order."""
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(getattr(self, m), *args, **kw) for m, args, kw in calls]
            return [f.result() for f in futures]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def user(smoke_project):
    return Session(smoke_project["root"], smoke_project["home"])


@pytest.fixture(scope="module")
def smoke(user, smoke_project):
    """``python -m harness run jobs/smoke.yaml``, as the README shows it (``smoke_project``)."""
    proc = smoke_project["proc"]
    assert proc.returncode == 0, f"run jobs/smoke.yaml:\n{proc.stdout[-4000:]}\n" \
        f"{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    exp = user.client.get_experiment_by_name("smoke")
    parents = user.client.search_runs([exp.experiment_id], "tags.harness_role = 'benchmark'")
    assert len(parents) == 1
    return {"proc": proc, "experiment": exp, "parent": parents[0]}


def children(client, parent):
    return client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              max_results=500)


def by_hand(rows) -> dict[str, float]:
    """AD and IC from the per-image rows, written out without the harness's code."""
    y = rows.column("Y").to_pylist()
    out = {}
    for k in FRACTIONS:
        o = rows.column(f"O_{k}").to_pylist()
        drops = [max(0.0, yi - oi) / yi if yi > 0 else 0.0 for yi, oi in zip(y, o)]
        out[f"AD_{k}"] = 100.0 * sum(drops) / len(y)
        out[f"IC_{k}"] = 100.0 * sum(oi > yi for yi, oi in zip(y, o)) / len(y)
    return out


# -- the README's first commands ---------------------------------------------------------------
def test_ls_and_the_installed_script(user):
    script = Path(sys.executable).with_name("lcam-bench")
    listed, installed = user.together(("ok", ("ls",), {}),
                                      ("ok", ("ls",), {"executable": [str(script)]}))
    for name in ("gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img",
                 "tiny_vgg", "tiny_resnet", "vgg16", "resnet50", "quickstart.yaml"):
        assert name in listed.stdout, name
    assert installed.stdout == listed.stdout


def test_validate_the_quickstart(user):
    assert "jobs/quickstart.yaml: OK (2 backbones x 8 methods)" in user.ok(
        "validate", "jobs/quickstart.yaml").stdout


def test_run_writes_to_the_default_cache_and_store(user, smoke):
    out = smoke["proc"].stdout
    assert f"MLflow: sqlite:///{user.root / 'mlflow.db'}" in out
    assert (user.root / ".harness-cache" / "shards").is_dir()
    assert smoke["experiment"].tags.get("mlflow.experimentKind") == "custom_model_development"


def test_run_logs_all_sixteen_rows_and_their_numbers_recompute(user, smoke):
    """16 child runs, named to sort by backbone then the spec's row order; AD and IC of each
    equal a hand computation over its per-image Parquet artifact."""
    runs = children(user.client, smoke["parent"])
    assert len(runs) == 16 and all(r.info.status == "FINISHED" for r in runs)
    names = sorted(r.info.run_name for r in runs)
    assert names[:8] == [f"tiny_resnet {i:02d} {d}" for i, d in enumerate(
        ("Grad-CAM", "Grad-CAM++", "Score-CAM", "RISE", "L-CAM-Fm", "L-CAM-Img", "L-CAM-Fm*",
         "L-CAM-Img*"), 1)]
    for r in runs:
        local = user.client.download_artifacts(r.info.run_id, "per_image.parquet",
                                               str(user.root.parent))
        rows = pq.read_table(local)
        assert rows.num_rows == 12 == r.data.metrics["images"]
        for key, value in by_hand(rows).items():
            assert math.isclose(r.data.metrics[key], value, rel_tol=1e-12, abs_tol=1e-12), \
                (r.info.run_name, key)


def test_smoke_numbers_are_the_pinned_ones(user, smoke):
    """Every AD, IC and #FW of the smoke run equals the recorded value for these embedded
    weights (tests/e2e/golden/smoke.json, ``tests/golden.py``): a refactoring must not move
    a number."""
    got = {r.data.tags["run_key"]: r.data.metrics for r in children(user.client, smoke["parent"])}
    rec = golden.pinned("smoke")
    assert set(got) == set(rec["runs"])
    assert not golden.differences(got, rec)


def test_parent_run_carries_the_table_and_plots(user, smoke):
    arts = {a.path for a in user.client.list_artifacts(smoke["parent"].info.run_id, "report")}
    assert {"report/table.md", "report/table.csv", "report/ad_ic_vs_fw-tiny_vgg.png",
            "report/ad_ic_vs_fw-tiny_resnet.png"} <= arts, arts


def test_run_logs_intervals_and_the_pairwise_matrix(user, smoke):
    """Every AD and IC of every child run lies inside its logged bootstrap interval; the
    parent's report has each backbone's pairwise matrix (docs/protocol.md section 9)."""
    for r in children(user.client, smoke["parent"]):
        m = r.data.metrics
        for key in [f"{kind}_{k}" for k in FRACTIONS for kind in ("AD", "IC")]:
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], (r.info.run_name, key)
    arts = {a.path for a in user.client.list_artifacts(smoke["parent"].info.run_id, "report")}
    assert {"report/pairwise-tiny_vgg.csv", "report/pairwise-tiny_resnet.csv"} <= arts, arts


def test_report_after_run_then_after_tune(user, smoke):
    """``report`` with no option reports the latest *benchmark* (its table equals the stored
    metrics), also after a sweep (so ``report`` runs once, after the sweep: before it, the
    benchmark is the only run there is); the sweep stops bad trials early, logs its trials
    under one run and writes a spec that runs."""
    parent_id = smoke["parent"].info.run_id
    sweep = user.ok("tune", "jobs/sweeps/lcam_quickstart.yaml",
                    "sweep.space={lr: {grid: [0.05, 1.0e-6, 2.0e-6, 3.0e-6]}}",
                    "sweep.num_samples=1", "train.epochs=2", "data.train_limit=160",
                    "sweep.validation_images=32")
    assert int(sweep.stdout.split(" stopped early")[0].split(",")[-1].strip()) >= 1
    exp = user.client.get_experiment_by_name("lcam_quickstart_sweep")
    runs = user.client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("harness_role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(trials) == 4 and all("lr" in r.data.params for r in trials)
    assert {"best_head.pt", "best.yaml"} <= {a.path for a in user.client.list_artifacts(
        parents[0].info.run_id)}
    assert f"report of run {parent_id}" in user.ok("report").stdout
    with open(user.root / "reports" / parent_id / "table.csv") as f:
        table = list(csv.DictReader(f))
    metrics = {r.data.tags["run_key"]: r.data.metrics for r in children(user.client, smoke["parent"])}
    assert len(table) == 16
    for row in table:
        stored = metrics[f"{row['backbone']}/{row['method_id']}"]
        assert float(row["AD_15"]) == stored["AD_15"] and float(row["IC_50"]) == stored["IC_50"]
    best = Path(sweep.stdout.split("benchmark spec: ")[1].split()[0])
    assert best.read_text().startswith(f"# python -m harness run {best}")
    rerun = user.ok("run", str(best), "data.limit=4", "sharding.images_per_task=4")
    assert "L-CAM-Img" in rerun.stdout


def test_child_runs_carry_provenance_and_files(user, smoke):
    for r in children(user.client, smoke["parent"]):
        for tag in ("git_commit", "version.torch", "eval_list_hash", "protocol_preset",
                    "weights_id", "feature_layer", "shard_dir"):
            assert r.data.tags.get(tag), (r.info.run_name, tag)
        if r.data.tags["method"] == "rise":
            assert len(r.data.tags["rise_mask_hash"]) == 16
        files = {a.path for a in user.client.list_artifacts(r.info.run_id)}
        assert {"per_image.parquet", "overlays.png"} <= files, files
        assert r.data.metrics["sanity_spearman_none"] == 1.0     # the analysis task's numbers
        assert ("head" in files) == r.data.tags["method"].startswith("lcam")


def test_explain_and_bench(user, smoke):
    image = sorted((user.root / ".harness-cache" / "quickstart-v1" / "val" / "star").glob(
        "*[0-9].png"))[0]
    explained, _ = user.together(
        ("ok", ("explain", str(image), "--backbone", "tiny_vgg", "--method", "gradcam",
                "--top-k", "2"), {}),
        ("ok", ("bench", "--backbones", "tiny_resnet", "--size", "64", "--batch", "2",
                "--threads", "1", "--repeats", "1", "--methods", "gradcam", "lcam_fm",
                "--no-train", "--no-eval", "--out", "bench-results/tiny.json"), {}))
    png = Path(user.root, explained.stdout.split(":")[0])
    assert png.is_file() and png.stat().st_size > 1000
    assert (user.root / "bench-results" / "tiny.json").is_file()


def test_a_spec_with_a_nul_byte_is_refused_naming_the_file(user):
    path = user.root / "broken.yaml"
    path.write_bytes(b"schema: 1\nname: bro\x00ken\nbackbones: [tiny_vgg]\nmethods: [gradcam]\n")
    for proc in user.together(("run", ("validate", "broken.yaml"), {}),
                              ("run", ("run", "broken.yaml"), {})):
        assert proc.returncode == 2, proc.stderr
        assert "broken.yaml: 1 problem" in proc.stderr and "#x0000" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_documented_variables_are_in_the_readme():
    """Tests may give a command only the variables the README tells users about."""
    readme = (REPO / "README.md").read_text()
    for name in DOCUMENTED:
        assert re.search(rf"\b{name}\b", readme), name
