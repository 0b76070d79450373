"""Reliability under real faults (issue 5): killed workers and drivers, bad images, numerics,
and what a spec cannot make the harness do.

The run tests start ``python -m harness run jobs/smoke.yaml`` (cut down by ``OVERRIDES`` to
one backbone, four methods, 12 images in 8 shards, heads trained for 3 epochs) on local Ray
in subprocesses, against one sqlite MLflow store per module, and compare every fault run with
an undisturbed run of the same spec, pinned in ``golden/reliability.json`` (metrics, and the
hash of every head tensor; ``golden/record.py`` records it). Each sequence gets its
own cache, so shards (keyed by the spec's content) and heads are always recomputed. Faults:

- ``cold_cache``, on an empty cache: SIGKILL to the driver's process group while the
  quickstart images are written, then while the embedded backbone trains, then the same
  command to the end, in which a Ray Train worker SIGKILLs itself in epoch 2
  (``HARNESS_TEST_KILL_TRAIN``: the fit resumes from the last checkpoint in the same
  command) and a shard task's worker SIGKILLs itself once (``HARNESS_TEST_KILL_SHARD``, see
  ``harness.pipeline.faults``: it is retried, ``sharding.max_retries``);
- ``driver_killed``, on a cache with the data and the backbone but no heads: SIGKILL to the
  driver's process group while the Ray Train fit of the heads is running, then while shards
  are being written, then the same command to the end (the fit resumes from its last
  checkpoint, the evaluation from the shards written);
- corrupt, grayscale and CMYK images and a list entry naming a missing file, with
  ``data.on_bad_image`` skip and stop.

The faults of one sequence hit different stages of the same command, so one run to the end
checks several of them (the tests of a fault read what its sequence recorded); the runs of a
sequence share its cache, MLflow experiment and RAY_TMPDIR, as a user's retries would.

Ray processes of a killed driver are found by the test's own ``RAY_TMPDIR`` in their
environment and killed by PID at the end (never ``ray stop``).
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import golden
from services import (REPO, TEST_CACHE, fresh_cache, kill_ray_processes, ray_processes,
                      short_tmp, tensor_hashes, user_env)

pytestmark = pytest.mark.slow

SMOKE = REPO / "jobs" / "smoke.yaml"
OVERRIDES = ["backbones=[tiny_vgg]",
             "methods=[gradcam, {name: rise, params: {n_masks: 100, batch_size: 100}}, "
             "lcam_fm, lcam_img]",
             "data.limit=12", "sharding.images_per_task=6", "sharding.max_retries=1",
             "train.epochs=3", "data.train_limit=400", "evaluation.overlays=0"]
RUN_KEYS = {"tiny_vgg/gradcam", "tiny_vgg/rise", "tiny_vgg/lcam_fm", "tiny_vgg/lcam_img"}
N_SHARDS = 8                       # 4 methods x 12 images / 6 per task
IMAGES = 12
NOT_COMPARED = ("seconds_per_image",)   # wall time; every other metric must be identical


# -- helpers -----------------------------------------------------------------------------------
#: the pinned reference run (``golden/reliability.json``), as a user types it in the project
REFERENCE_COMMAND = " ".join(["harness", "run", "jobs/smoke.yaml", *OVERRIDES,
                              "tracking.experiment=rel-clean"])


def harness_run(*extra: str) -> list[str]:
    return [sys.executable, "-m", "harness", "run", str(SMOKE), *OVERRIDES, *extra]


def listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that ``pids`` hold (from /proc)."""
    inodes = set()
    for pid in pids:
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            with contextlib.suppress(OSError):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                if m:
                    inodes.add(m.group(1))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    found.append(_address(cols[1].split(":")[0]))
    return found


def _address(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # little-endian words
    if len(words) == 4:
        return ".".join(map(str, words))
    if words[:12] == b"\0" * 10 + b"\xff\xff":                              # ::ffff:a.b.c.d
        return ".".join(map(str, words[12:]))
    return words.hex()


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


class Stores:
    """The module's MLflow store and working directory (``mlruns/`` lands there)."""

    def __init__(self, root: Path):
        self.work = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)

    def env(self, cache: Path, ray_tmp: str, **extra: str) -> dict[str, str]:
        return user_env(HARNESS_CACHE_DIR=str(cache), MLFLOW_TRACKING_URI=self.uri,
                        RAY_TMPDIR=ray_tmp, **extra)

    def run(self, args: list[str], env: dict[str, str], timeout: float = 300):
        proc = subprocess.Popen(args, cwd=self.work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"timed out: {' '.join(args)}\n{out[-3000:]}\n{err[-3000:]}")
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def ok(self, args, env, timeout: float = 300):
        proc = self.run(args, env, timeout)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc

    def runs(self, experiment: str):
        """(parents, children) of ``experiment``."""
        exp = self.client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment!r}"
        runs = self.client.search_runs([exp.experiment_id], max_results=500)
        return ([r for r in runs if r.data.tags.get("harness_role") == "benchmark"],
                [r for r in runs if r.data.tags.get("harness_role") == "method"])

    def finished(self, experiment: str) -> dict[str, dict]:
        """Metrics by run key of the one finished parent; nothing in the experiment RUNNING."""
        parents, children = self.runs(experiment)
        running = [r.info.run_name for r in parents + children if r.info.status == "RUNNING"]
        assert not running, f"runs left RUNNING in {experiment}: {running}"
        done = [p for p in parents if p.info.status == "FINISHED"]
        assert len(done) == 1, [(p.info.run_name, p.info.status) for p in parents]
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == done[0].info.run_id]
        assert {c.data.tags["run_key"] for c in mine} == RUN_KEYS
        assert all(c.info.status == "FINISHED" for c in mine)
        return {c.data.tags["run_key"]: dict(c.data.metrics, _shard_dir=c.data.tags["shard_dir"])
                for c in mine}


def assert_same_numbers(got: dict[str, dict], want: dict[str, dict]) -> None:
    for key, ref in want.items():
        names = [n for n in ref if not n.startswith(("_", "train_")) and n not in NOT_COMPARED]
        assert {"AD_100", "IC_15", "FW_measured", "degenerate_maps", "images"} <= set(names)
        diff = {n: (got[key].get(n), ref[n]) for n in names
                if got[key].get(n) is None or not same(got[key][n], ref[n])}
        assert not diff, f"{key}: {diff}"


def assert_rows_complete(metrics: dict[str, dict]) -> None:
    """Every cell: exactly the shards planned, each image once, the per-image artifact too."""
    for key, m in metrics.items():
        shard_dir = Path(m["_shard_dir"])
        shards = sorted(shard_dir.glob("shard-*.parquet"))
        assert [s.name for s in shards] == ["shard-00000.parquet", "shard-00001.parquet"], key
        ids = [i for s in shards for i in pq.read_table(s, columns=["image_id"]).column(0).to_pylist()]
        assert len(ids) == IMAGES == len(set(ids)), (key, ids)
        per_image = pq.read_table(shard_dir / "artifacts" / "per_image.parquet")
        assert sorted(per_image.column("image_id").to_pylist()) == sorted(ids)


def assert_same_heads(got: dict, want: dict, after: str) -> None:
    """Both L-CAM head files, tensor for tensor equal to the undisturbed run's (``want``:
    the SHA-256 of each tensor, ``golden/record.py``), matched by their mode (``fm-``,
    ``img-``): a head's file name also holds the training images' listing (names, sizes,
    modification times), which differs between the data a recording made and this session's."""
    def by_mode(files: dict) -> dict:
        return {name.split("-", 1)[0]: value for name, value in files.items()}
    assert len(got) == 2 and set(by_mode(got)) == set(by_mode(want)) == {"fm", "img"}, \
        (sorted(got), sorted(want))
    for mode, hashes in by_mode(want).items():
        mine = tensor_hashes(by_mode(got)[mode])
        for k, digest in hashes.items():
            assert mine.get(k) == digest, f"the {mode} head's {k} differs after {after}"


def shard_files(cache: Path) -> list[Path]:
    return list((cache / "shards").glob("*/*/shard-*.parquet"))


def heads_of(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True)["state_dict"]
            for p in sorted((cache / "heads" / "tiny_vgg").glob("*.pt"))}


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_when(args: list[str], env: dict, log: Path, cwd: Path, ready, what: str,
              settle: float = 0.0) -> None:
    """Start ``args`` in a new session, wait until ``ready()``, SIGKILL its process group."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(ready, proc, what)
            time.sleep(settle)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return Stores(tmp_path_factory.mktemp("reliability"))


def compared(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {key: {n: v for n, v in sorted(m.items())
                  if not n.startswith(("_", "train_")) and n not in NOT_COMPARED}
            for key, m in sorted(metrics.items())}


def undisturbed(work: Path) -> dict:
    """An undisturbed run of the spec in a fresh cache: what the fault runs are compared
    with (``golden/record.py reliability`` pins it)."""
    stores = Stores(work)
    cache = fresh_cache(work)
    ray_tmp = short_tmp("rel")
    try:
        stores.ok(harness_run("tracking.experiment=rel-clean"), stores.env(cache, ray_tmp),
                  timeout=900)
    finally:
        kill_ray_processes(ray_tmp)
    metrics = stores.finished("rel-clean")
    assert_rows_complete(metrics)
    heads = {name: tensor_hashes(state) for name, state in heads_of(cache).items()}
    return {"command": REFERENCE_COMMAND, "runs": compared(metrics), "heads": heads}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run of the same spec: pinned in ``golden/reliability.json`` for these
    embedded weights (``golden/record.py reliability``), else made here (about a minute):
    metrics by run key, and the SHA-256 of every tensor of each trained head file."""
    rec = golden.find("reliability") or undisturbed(tmp_path_factory.mktemp("reference"))
    assert rec["command"] == REFERENCE_COMMAND, \
        "the spec changed: rerun tests/e2e/golden/record.py reliability"
    return {"metrics": rec["runs"], "heads": rec["heads"]}


@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR of this test; Ray processes left in it are killed by PID after."""
    path = short_tmp("rel")
    yield path
    kill_ray_processes(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_ray_tmp():
    """A short RAY_TMPDIR for the module's fault sequences, cleaned up as ``ray_tmp``."""
    path = short_tmp("rel")
    yield path
    kill_ray_processes(path)
    shutil.rmtree(path, ignore_errors=True)


def epochs_saved(cache: Path) -> int:
    """Epochs in the head fit's newest registered checkpoint (0 before the first)."""
    found = 0
    for snap in (cache / "ray_results").glob("heads-tiny_vgg-*/checkpoint_manager_snapshot.json"):
        for ckpt in snap.parent.glob("checkpoint_*/heads.pt"):
            with contextlib.suppress(Exception):
                found = max(found, torch.load(ckpt, weights_only=True)["epoch"] + 1)
    return found


@pytest.fixture(scope="module")
def cold_cache(stores, reference, tmp_path_factory, module_ray_tmp):
    """Faults 1, 3b and 3c in one sequence of the same command, on an empty cache, with both
    worker fault hooks set (inert until their stage): the driver's process group SIGKILLed
    while the quickstart images are written, the same command SIGKILLed while the embedded
    backbone trains, then the same command to the end, in which the rank-0 Ray Train worker
    SIGKILLs itself in epoch 2 of 3 (``HARNESS_TEST_KILL_TRAIN``) and a RISE shard task's
    worker SIGKILLs itself (``HARNESS_TEST_KILL_SHARD``). One run to the end instead of
    three (the heads train once, not twice more); each test below checks its own fault."""
    work = tmp_path_factory.mktemp("cold")
    cache = work / "cache"
    cache.mkdir()
    env = stores.env(cache, module_ray_tmp, HARNESS_TEST_KILL_SHARD="rise:1",
                     HARNESS_TEST_KILL_TRAIN="1:2")
    args = harness_run("tracking.experiment=rel-cold")

    def generated() -> int:
        return sum(len(list(d.glob("*/*/*.png"))) for d in cache.glob(".quickstart-v1.tmp-*"))

    def training_backbone() -> bool:
        return bool(list((cache / "backbones").glob(".tiny_vgg-v*.pt")))

    for stage, started, settle in (("data generation", lambda: generated() > 300, 0.0),
                                   ("backbone training", training_backbone, 3.0)):
        kill_when(args, env, work / f"killed-{stage.split()[0]}.log", stores.work, started,
                  stage, settle)
        assert not list((cache / "backbones").glob("tiny_vgg-*.json")), f"{stage}: too late"
        assert not list(cache.glob("test-faults/*")), f"{stage}: a worker fault fired already"
    assert (cache / "quickstart-v1").is_dir(), "the second run did not regenerate the data"
    stores.ok(args, env, timeout=600)
    return {"cache": cache, "metrics": stores.finished("rel-cold")}


@pytest.fixture(scope="module")
def driver_killed(stores, reference, tmp_path_factory, module_ray_tmp):
    """Faults 2 and 3 in one sequence of the same command, on a cache without heads: SIGKILL
    to the driver's process group after the first epoch checkpoint of the Ray Train fit
    (before the last), the same command SIGKILLed again once some but not all shard files
    exist (while it runs, the TCP sockets its Ray processes listen on are recorded), then the
    same command to the end."""
    work = tmp_path_factory.mktemp("driver")
    cache = fresh_cache(work)
    env = stores.env(cache, module_ray_tmp)
    args = harness_run("tracking.experiment=rel-driver")
    out = {"cache": cache}

    kill_when(args, env, work / "killed-train.log", stores.work,
              lambda: epochs_saved(cache) > 0, "the first epoch checkpoint")
    out["epochs_at_kill"] = epochs_saved(cache)
    out["heads_at_kill"] = list((cache / "heads").glob("*/*.pt"))

    def first_shard() -> bool:
        if shard_files(cache):
            out["bound"] = listening_addresses(ray_processes(module_ray_tmp))
            out["shards_at_kill"] = len(shard_files(cache))
        return "bound" in out

    # the rerun, with whatever the killed driver's Ray left behind still in the same RAY_TMPDIR
    kill_when(args, env, work / "killed-eval.log", stores.work, first_shard,
              "the first shard file")
    out["parents_at_kill"] = stores.runs("rel-driver")[0]
    stores.ok(args, env)
    out["parents"] = stores.runs("rel-driver")[0]
    out["metrics"] = stores.finished("rel-driver")
    return out


# -- 1. worker fault ---------------------------------------------------------------------------
def test_killed_shard_worker_is_retried_and_numbers_match(cold_cache, reference):
    """A shard task whose worker process is SIGKILLed is retried (max_retries=1) and the run's
    metrics are identical to the undisturbed run's (the run of ``cold_cache``)."""
    markers = list((cold_cache["cache"] / "test-faults").glob("killed-tiny_vgg-rise-1"))
    assert len(markers) == 1, "the fault hook did not fire"
    assert_rows_complete(cold_cache["metrics"])
    assert_same_numbers(cold_cache["metrics"], reference["metrics"])


# -- 2. driver fault during evaluation ---------------------------------------------------------
def test_driver_killed_during_evaluation_then_rerun(driver_killed, reference):
    """SIGKILL to the driver's process group once some but not all shards exist; the same
    command again finishes with the undisturbed numbers, every image once, no run RUNNING,
    the interrupted parent run resumed. While it ran, every TCP socket that its Ray processes
    listened on was bound to loopback. (The run killed is itself the rerun of a driver
    killed in head training: ``driver_killed``.)"""
    done, bound = driver_killed["shards_at_kill"], driver_killed["bound"]
    assert 0 < done < N_SHARDS, f"{done} shards were done when the driver was killed"
    assert bound and all(a.startswith("127.") for a in bound), bound
    parents = driver_killed["parents_at_kill"]
    assert [p.info.status for p in parents] == ["RUNNING"]       # what the rerun must resume
    assert [p.info.run_id for p in driver_killed["parents"]] == \
        [parents[0].info.run_id], "the interrupted parent run was not resumed"
    assert_rows_complete(driver_killed["metrics"])
    assert_same_numbers(driver_killed["metrics"], reference["metrics"])


# -- 3. driver fault during head training ------------------------------------------------------
def test_driver_killed_during_head_training_then_rerun(driver_killed, reference):
    """SIGKILL to the driver's process group after the first epoch checkpoint of the Ray Train
    fit, before the last; the rerun resumes the fit and ends with heads tensor-for-tensor
    equal to the undisturbed run's (and, once run to the end, the same metrics)."""
    epochs = driver_killed["epochs_at_kill"]
    assert 0 < epochs < 3, f"killed after {epochs} of 3 epochs"
    assert not driver_killed["heads_at_kill"], "killed too late: heads were written"
    assert_same_heads(heads_of(driver_killed["cache"]), reference["heads"], "the resumed fit")
    assert_rows_complete(driver_killed["metrics"])
    assert_same_numbers(driver_killed["metrics"], reference["metrics"])


# -- 3b. worker fault during head training -----------------------------------------------------
def test_killed_train_worker_resumes_from_the_last_checkpoint(cold_cache, reference, stores):
    """The Ray Train worker SIGKILLs itself in the middle of epoch 2 (of 3); FailureConfig
    restarts the worker group from the epoch-1 checkpoint, the run finishes in one command,
    epoch 1 is not trained (logged) twice, and the heads equal the undisturbed run's."""
    cache = cold_cache["cache"]
    markers = list((cache / "test-faults").glob("heads-tiny_vgg-*.killed"))
    assert len(markers) == 1, "the fault hook did not fire"
    assert_same_heads(heads_of(cache), reference["heads"], "the worker restart")
    parent = [p for p in stores.runs("rel-cold")[0] if p.info.status == "FINISHED"][0]
    child = [c for c in stores.runs("rel-cold")[1]
             if c.data.tags["run_key"] == "tiny_vgg/lcam_fm"
             and c.data.tags["mlflow.parentRunId"] == parent.info.run_id][0]
    steps = [m.step for m in stores.client.get_metric_history(child.info.run_id, "train_loss")]
    assert sorted(steps) == [0, 1, 2], f"epochs logged: {sorted(steps)} (a restart from scratch?)"
    assert_same_numbers(cold_cache["metrics"], reference["metrics"])


# -- 3c. driver faults while the data set is generated and the backbone trained ---------------
def test_driver_killed_during_data_generation_and_backbone_training(cold_cache, reference):
    """On an empty cache: SIGKILL to the driver's process group while the quickstart images are
    being written, the same command again killed while the embedded backbone trains, then the
    same command once more: byte-identical data, bit-identical backbone weights, no temporary
    leftovers, and the undisturbed run's numbers."""
    cache = cold_cache["cache"]
    want_data = json.loads((TEST_CACHE / "quickstart-v1" / "quickstart.json").read_text())
    got_data = json.loads((cache / "quickstart-v1" / "quickstart.json").read_text())
    assert got_data["content_sha256"] == want_data["content_sha256"]
    [want_side] = (TEST_CACHE / "backbones").glob("tiny_vgg-*.json")
    got_side = cache / "backbones" / want_side.name
    assert json.loads(got_side.read_text())["weights_hash"] == \
        json.loads(want_side.read_text())["weights_hash"]
    leftovers = list(cache.glob(".quickstart-v1.tmp-*")) + \
        list((cache / "backbones").glob(".tiny_vgg-*"))
    assert not leftovers, leftovers
    assert_rows_complete(cold_cache["metrics"])
    assert_same_numbers(cold_cache["metrics"], reference["metrics"])


# -- 4. data faults ----------------------------------------------------------------------------
def bad_tree(root: Path) -> tuple[Path, list[str]]:
    """A quickstart-layout val/ with 6 good images, a grayscale, a CMYK and a truncated one,
    and a list file naming them plus a missing file; returns (root, list lines)."""
    from PIL import Image
    src = TEST_CACHE / "quickstart-v1" / "val"
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    (root / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")   # tiny_vgg's 10 classes
    lines = []
    for label, cls in enumerate(classes[:6]):
        (root / "val" / cls).mkdir()
        name = f"{cls}_val_0000.png"
        shutil.copy(src / cls / name, root / "val" / cls / name)
        lines.append(f"{cls}/{name} {label}")
    first = src / classes[0] / f"{classes[0]}_val_0001.png"
    Image.open(first).convert("L").save(root / "val" / classes[0] / "gray.png")
    Image.open(first).convert("CMYK").save(root / "val" / classes[0] / "cmyk.jpg")
    (root / "val" / classes[0] / "truncated.png").write_bytes(first.read_bytes()[:200])
    lines += [f"{classes[0]}/gray.png 0", f"{classes[0]}/cmyk.jpg 0",
              f"{classes[0]}/truncated.png 0", f"{classes[0]}/missing.png 0"]
    return root, lines


def data_args(root: Path, list_file: Path, mode: str, experiment: str) -> list[str]:
    return [sys.executable, "-m", "harness", "run", str(SMOKE), "backbones=[tiny_vgg]",
            "methods=[gradcam]", "evaluation.overlays=0", f"data.root={root}",
            f"data.list_file={list_file}", f"data.on_bad_image={mode}",
            f"tracking.experiment={experiment}"]


def test_bad_images_skip_counts_and_stop_names_the_file(stores, tmp_path, ray_tmp):
    """skip: the run finishes on the 8 readable images (grayscale and CMYK converted), the 2
    bad ones are counted in MLflow (``skipped_images``) and under the table. stop: exit 2
    naming the missing file, or the truncated one, no traceback, no MLflow run created."""
    root, lines = bad_tree(tmp_path / "data")
    full = tmp_path / "list.txt"
    full.write_text("\n".join(lines) + "\n")
    no_missing = tmp_path / "list-no-missing.txt"
    no_missing.write_text("\n".join(lines[:-1]) + "\n")
    cache = fresh_cache(tmp_path)
    env = stores.env(cache, ray_tmp)

    def start(args) -> subprocess.Popen:   # the two refusals run while the skip run does
        return subprocess.Popen(args, cwd=stores.work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    stop_missing = start(data_args(root, full, "stop", "rel-stop-missing"))
    corrupt = start(data_args(root, no_missing, "stop", "rel-stop-corrupt"))
    skip = stores.run(data_args(root, full, "skip", "rel-skip"), env)
    out, err = stop_missing.communicate(timeout=300)
    c_out, c_err = corrupt.communicate(timeout=300)
    stop_corrupt = subprocess.CompletedProcess(corrupt.args, corrupt.returncode, c_out, c_err)
    assert skip.returncode == 0, skip.stdout[-4000:] + skip.stderr[-4000:]
    assert re.search(r"2 images? skipped", skip.stdout), skip.stdout[-3000:]
    assert "truncated.png" in skip.stdout and "missing.png" in skip.stdout
    _, children = stores.runs("rel-skip")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.metrics["skipped_images"] == 2
    assert children[0].data.metrics["images"] == len(lines) - 2

    assert stop_missing.returncode == 2, out[-3000:] + err[-3000:]
    assert "missing.png" in err and "Traceback" not in out + err, err
    assert "nothing was started" in err

    assert stop_corrupt.returncode == 2, stop_corrupt.stdout[-3000:] + stop_corrupt.stderr[-3000:]
    text = stop_corrupt.stdout + stop_corrupt.stderr
    assert "truncated.png" in stop_corrupt.stderr, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for experiment in ("rel-stop-missing", "rel-stop-corrupt"):
        exp = stores.client.get_experiment_by_name(experiment)
        assert exp is None or not stores.client.search_runs([exp.experiment_id]), experiment


def test_nothing_left_after_skipping_is_refused(tmp_path, monkeypatch):
    """When every listed image is bad, ``check_data`` refuses the run, saying so (not a
    KeyError from an empty table at aggregation)."""
    from harness.pipeline.inputs import InputRefused, prepare_data
    from harness.pipeline.plan import plan
    from harness.spec import load_spec
    root, lines = bad_tree(tmp_path / "data")
    bad_only = tmp_path / "list.txt"
    bad_only.write_text("\n".join(lines[-2:]) + "\n")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(fresh_cache(tmp_path)))
    spec = load_spec(SMOKE, ["backbones=[tiny_vgg]", "methods=[gradcam]", f"data.root={root}",
                             f"data.list_file={bad_only}", "data.on_bad_image=skip"])
    with pytest.raises(InputRefused, match="no images left"):
        prepare_data(plan(spec), lambda *progress: None, tmp_path / "root")


# -- 5. numerics -------------------------------------------------------------------------------
class _Toy(torch.nn.Module):
    """A 'backbone' whose logits are ``base * (1 + mean pixel)``: masking changes them."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.base = base
        self.device = torch.device("cpu")

    def forward(self, x):
        return self.base[: x.shape[0]] * (1 + x.mean(dim=(1, 2, 3)))[:, None]


def test_evaluator_with_nan_inf_maps_and_underflowing_y():
    """NaN, inf, constant and empty maps are degenerate (scored as all-zero maps); a target
    probability that underflows to 0 or is tiny gives finite Y, O and AD/IC."""
    from harness.metrics.protocol import Evaluator
    base = torch.tensor([[2.0, -1.0]]).repeat(7, 1)   # masking moves every image's O
    base[5] = torch.tensor([200.0, -200.0])        # class 1: probability underflows to 0
    base[6] = torch.tensor([0.0, 40.0])            # class 0: about 1e-35 on the clean image
    ev = Evaluator(_Toy(base), (1.0, 0.5, 0.15))
    maps = torch.rand(7, 8, 8)
    maps[0, 2, 3] = float("nan")
    maps[1, 0, 0] = float("inf")
    maps[2] = float("-inf")
    maps[3] = 0.5
    targets = torch.tensor([0, 0, 0, 0, 0, 1, 0])
    images = torch.rand(7, 3, 8, 8)
    scores = ev.evaluate(images, maps, targets)
    assert scores.degenerate.tolist() == [True, True, True, True, False, False, False]
    assert torch.isfinite(scores.y).all() and torch.isfinite(scores.o).all()
    assert scores.y[5] == 0 and 0 < scores.y[6] < 1e-20
    assert (scores.o[6] > scores.y[6]).all()       # darker masked image: smaller logit gap
    for j in range(4):                             # degenerate = scored with an all-zero map
        zero = ev.evaluate(images[j:j + 1], torch.zeros(1, 8, 8), targets[j:j + 1])
        assert torch.equal(scores.o[j], zero.o[0])
        kept = ev.evaluate(images[j:j + 1], maps[4:5], targets[j:j + 1])   # a proper map
        assert not torch.equal(zero.o[0], kept.o[0])   # the map matters: O could differ
    out = Evaluator.summarise(scores.y, scores.o, ev.fractions)
    assert all(math.isfinite(v) for v in out.values()), out


def test_aggregate_is_finite_and_counts_degenerate_maps():
    """``aggregate`` over rows with Y = 0, denormal Y, O > Y and degenerate flags: finite
    AD/IC, degenerate counted; an empty table is refused with a clear error."""
    import pyarrow as pa

    from harness.metrics.aggregate import aggregate
    tiny = 1e-44
    rows = pa.table({"image_id": ["a", "b", "c", "d"], "Y": [0.0, tiny, 0.5, 0.9],
                     "O_100": [0.3, 0.0, 0.7, 0.9], "O_15": [0.0, tiny / 2, 0.1, 0.0],
                     "degenerate": [True, False, True, False],
                     "forward_passes": [1.0] * 4, "seconds": [0.1] * 4})
    out = aggregate(rows, (1.0, 0.15), 1, 4)
    assert all(math.isfinite(v) for v in out.values()), out
    assert out["degenerate_maps"] == 2 and out["images"] == 4
    assert out["AD_100"] == pytest.approx(100 / 4 * (0 + 1 + 0 + 0))
    assert out["IC_100"] == pytest.approx(100 / 4 * 2)
    assert out["AD_15"] == pytest.approx(100 / 4 * (0 + 0.5 + 0.8 + 1))
    with pytest.raises(RuntimeError, match="no evaluation rows"):
        aggregate(rows.slice(0, 0), (1.0, 0.15), 1, 0)


# -- 6. security -------------------------------------------------------------------------------
def test_spec_cannot_construct_import_or_run_anything(tmp_path):
    """A python/object tag (in the file or an override) is refused as YAML and not run; a
    dotted name that would import something is an unknown method, backbone or weights."""
    from harness.spec import SpecError, load_spec
    marker = tmp_path / "ran"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"schema: 1\nname: !!python/object/apply:os.system ['touch {marker}']\n"
                    "backbones: [tiny_vgg]\nmethods: [gradcam]\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(spec)
    with pytest.raises(SpecError):
        load_spec(SMOKE, [f"name=!!python/object/apply:os.system ['touch {marker}']"])
    with pytest.raises(SpecError):
        load_spec(REPO / "tests" / "specs" / "bad" / "27_python_tag.yaml")
    assert not marker.exists()
    for override, message in [("methods=[os.system]", "unknown method 'os.system'"),
                               ("methods=[{name: subprocess.run}]", "unknown method"),
                               ("backbones=[os.path]", "unknown backbone"),
                               ("backbones=[{name: tiny_vgg, weights: os.system}]", "weights")]:
        with pytest.raises(SpecError, match=re.escape(message)):
            load_spec(SMOKE, [override])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_checkpoint_or_weights_file_is_not_run(tmp_path):
    """Head checkpoints and backbone state_dict files are read with ``weights_only=True``: a
    pickle that would run a command is refused and the command never runs."""
    import backbones
    from methods.lcam import load_head
    marker = tmp_path / "ran"
    evil = tmp_path / "head.pt"
    torch.save({"state_dict": _Evil(marker), "meta": {}}, evil, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        load_head(evil, backbones.load("tiny_vgg", weights=None))
    from backbones.registry import WeightsError
    with pytest.raises(WeightsError, match="head.pt.*is not a readable state_dict file "
                       r"\(UnpicklingError"):       # the user's file named, the cause kept
        backbones.load("tiny_vgg", weights=str(evil))
    assert not marker.exists()
