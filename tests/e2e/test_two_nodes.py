"""A real two-node Ray cluster on this machine, without a shared filesystem (issues 17, 22).

The head node runs in the test's mount namespace; the second node (``ray start --address``)
runs inside its own (``unshare --mount``, as root) with a private folder mounted over the
cache path and a tmpfs over ``/tmp/ray``: nothing one node writes there is visible to the
other, even under the same absolute path, as on a cluster without a shared filesystem. The
second node starts with a copy of the ``tiny_vgg`` weights (as a user copies weights to the
nodes). The **images are only in the object store**: an S3 server (moto) on 127.0.0.1 holds
the data set (a small folder of the quickstart's files, ``services.quickstart_folder``) and
the results; MLflow is a server on 127.0.0.1; every node reaches both, as on a cluster.

Then ``ray job submit`` of the smoke spec on that data set (one backbone, two Ray Train
workers spread over the nodes, two epochs), the way a user submits it:
- shards run on both nodes (each run's ``nodes`` tag), the heads train on both
  (``train_nodes``), and every number equals a one-node run's of the same spec on a local
  copy of the folder (pinned in ``golden/two_nodes.json`` by ``golden/record.py``); no node
  holds an image file: the evaluation set reached the second node decoded, through Ray's
  object store, and its training worker streamed its images from S3;
- a node lost mid-run, twice in one job: during the second epoch of head training (the fit
  resumes from the first epoch's checkpoint on the head), and, after the node rejoined,
  during the evaluation (its shard is retried on the head): the job finishes with the same
  numbers again;
- without an object store for the results (a local folder the second node does not see), a
  run that must train heads is refused before anything starts, naming the node.

Both nodes are stopped by their own processes (found by their ``RAY_TMPDIR``), never by
``ray stop``, which would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import golden
from services import (S3, _stop, bucket_uri, free_port, kill_ray_processes, mlflow_server,
                      object_store, quickstart_folder, short_tmp, upload, user_env, workspace)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                 reason="needs root and unshare for a private mount namespace")]

SPEC = ["jobs/smoke.yaml", "backbones=[tiny_vgg]", "data.kind=folder", "train.workers=2",
        "train.placement=spread", "train.epochs=2"]
ONE_NODE = ["ray.num_cpus=2"]             # the pinned one-machine run's overrides (golden/)


class Cluster:
    """A head (2 CPUs) and a second node (1 CPU) in a private mount namespace."""

    def __init__(self, root: Path, env: dict, work: Path):
        self.root, self.env, self.work = root, env, work
        self.port, self.dashboard = free_port(), free_port()
        self.cache = root / ".harness-cache"          # the default cache, on both nodes
        self.node_disk = work / "node2-disk"          # the second node's own disk
        self.node_disk.mkdir(exist_ok=True)
        # The embedded backbone's weights copied to the node, as a user copies weights: the
        # node would otherwise train tiny_vgg again on its one CPU, ~45 s of this module.
        weights = self.node_disk / "backbones"
        weights.mkdir(exist_ok=True)
        for f in (self.cache / "backbones").glob("tiny_vgg-v1.*"):
            shutil.copy2(f, weights / f.name)
        self.second: subprocess.Popen | None = None
        self.started = 0

    def ray(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=kw.pop("timeout", 300), **kw)

    def start(self) -> None:
        """The head, as its own process (``--block``), then the second node."""
        log = open(self.work / "head.log", "w")
        self.head = subprocess.Popen(
            ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
             f"--ray-client-server-port={free_port()}", "--num-cpus=2",
             f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=23000",
             "--max-worker-port=23999", "--disable-usage-stats", "--block"],
            cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 120
        while not self.alive():
            assert self.head.poll() is None and time.time() < deadline, \
                (self.work / "head.log").read_text()[-3000:]
            time.sleep(1)
        self.start_second()

    def start_second(self) -> None:
        """The second node: its own disk over the cache path, its own ``RAY_TMPDIR``."""
        self.started += 1
        inner = (f"mount --bind {self.node_disk} {self.cache} && "
                 f"mount -t tmpfs tmpfs {self.env['RAY_TMPDIR']} && "
                 f"exec ray start --address=127.0.0.1:{self.port} --node-ip-address=127.0.0.1 "
                 "--num-cpus=1 --min-worker-port=24000 --max-worker-port=24999 "
                 f"--dashboard-agent-listen-port={free_port()} --disable-usage-stats --block")
        log = open(self.work / f"node2-{self.started}.log", "w")
        self.second = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                        "sh", "-c", inner], cwd=self.root, env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.time() + 120
        while len(self.alive()) < 2:
            assert self.second.poll() is None and time.time() < deadline, \
                (self.work / f"node2-{self.started}.log").read_text()[-3000:]
            time.sleep(1)

    def alive(self) -> list[str]:
        out = self.ray("list", "nodes", "--address", f"127.0.0.1:{self.port}", "--format",
                       "json", "--limit", "100")
        if out.returncode != 0:
            return []
        try:        # while the head starts, `ray list` may print "No resource in the cluster"
            nodes = json.loads(out.stdout)
        except json.JSONDecodeError:
            return []
        return [n["node_id"] for n in nodes if n["state"] == "ALIVE"]

    def submit(self, args: list[str], runtime_env: dict | None = None) -> subprocess.Popen:
        """``ray job submit`` of ``harness run`` with the cache on each node's own disk, once
        the head's job agent takes jobs."""
        deadline = time.time() + 120
        while "No available agent" in (probe := self.ray(
                "job", "submit", "--address", f"http://127.0.0.1:{self.dashboard}", "--",
                "true")).stdout + probe.stderr and time.time() < deadline:
            time.sleep(2)
        extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        return subprocess.Popen(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{self.dashboard}",
             "--working-dir", ".", *extra, "--", "python", "-m", "harness", "run", *args,
             f"storage.cache={self.cache}"],
            cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)

    def stop(self) -> None:
        """Both nodes and every Ray process they started (by their ``RAY_TMPDIR``)."""
        for proc in (self.second, getattr(self, "head", None)):
            if proc is not None:
                _stop(proc)
        kill_ray_processes(self.env["RAY_TMPDIR"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("two-nodes")
    root = workspace(work)
    env = user_env(work / "home", RAY_AUTH_MODE="token", RAY_TMPDIR=short_tmp("r2n"), **S3)
    (work / "home").mkdir(exist_ok=True)
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert token.returncode == 0, token.stderr
    with mlflow_server(work / "mlflow") as tracking, object_store(work) as endpoint:
        data = upload(endpoint, quickstart_folder(work / "data"), "data/quickstart")
        cluster = Cluster(root, env, work)
        try:
            cluster.start()
            yield {"cluster": cluster, "tracking": tracking, "endpoint": endpoint,
                   "root": root, "env": env, "work": work, "data": f"data.root={data}"}
        finally:
            cluster.stop()


def finish(proc: subprocess.Popen, timeout: float = 1200) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "succeeded" in out, out[-6000:]
    return out


def method_runs(tracking: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = sorted((r for r in runs if r.data.tags.get("harness_role") == "benchmark"),
                     key=lambda r: r.info.start_time)
    latest = parents[-1].info.run_id
    return {r.data.tags["method_id"]: r for r in runs
            if r.data.tags.get("mlflow.parentRunId") == latest}


def numbers(runs: dict) -> dict[str, dict[str, float]]:
    """Every metric that the spec determines (not timings) of each method run, but the
    localisation ones: boxes and masks are read from local folders only (harness.data.sources),
    so from the object store they are not there."""
    skip = ("seconds", "task_seconds", "images_per_s", "localisation")
    return {mid: {k: v for k, v in r.data.metrics.items() if not k.startswith(skip)}
            for mid, r in runs.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for mid in a:
        assert a[mid].keys() == b[mid].keys(), mid
        differ = {k: (a[mid][k], b[mid][k]) for k in a[mid]
                  if not (a[mid][k] == b[mid][k]
                          or (math.isnan(a[mid][k]) and math.isnan(b[mid][k])))}
        assert not differ, (mid, differ)


def one_node_run(work: Path) -> dict:
    """The spec on one machine with a local Ray (``ONE_NODE``), on a local copy of the data
    set: its numbers (``golden/record.py two_nodes`` pins them)."""
    root = workspace(work)
    db = work / "mlflow.db"
    data = quickstart_folder(work / "data")
    args = ["-m", "harness", "run", *SPEC, *ONE_NODE]
    res = subprocess.run([sys.executable, *args, f"data.root={data}",
                          f"tracking.uri=sqlite:///{db}"], cwd=root,
                         env=user_env(work / "home"), capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return {"command": " ".join(args[1:]), "runs": numbers(method_runs(f"sqlite:///{db}",
                                                                       "smoke"))}


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The same spec's numbers on one machine: pinned in ``golden/two_nodes.json`` for these
    embedded weights (``golden/record.py two_nodes``), else run here (about a minute)."""
    rec = golden.find("two_nodes") or one_node_run(tmp_path_factory.mktemp("one-node"))
    assert rec["command"].split() == ["harness", "run", *SPEC, *ONE_NODE], \
        "the spec changed: rerun tests/e2e/golden/record.py two_nodes"
    return rec["runs"]


@pytest.fixture(scope="module")
def two_nodes(setup):
    cluster = setup["cluster"]
    out = finish(cluster.submit([*SPEC, setup["data"], f"tracking.uri={setup['tracking']}",
                                 f"storage.uri={bucket_uri(setup['endpoint'], 'plain')}"]))
    return {"out": out, "runs": method_runs(setup["tracking"], "smoke")}


def test_shards_and_training_use_both_nodes_and_the_numbers_equal_one_nodes(setup, one_node,
                                                                            two_nodes):
    runs = two_nodes["runs"]
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs.values())
    nodes = set(setup["cluster"].alive())
    assert len(nodes) == 2
    shard_nodes = {n for r in runs.values() for n in r.data.tags["nodes"].split(",")}
    assert shard_nodes == nodes, "the shards did not run on both nodes"
    for mid in ("lcam_fm", "lcam_img", "lcam_fm_ce", "lcam_img_ce"):
        assert set(runs[mid].data.tags["train_nodes"].split(",")) == nodes, mid
    assert_same(numbers(runs), one_node)


def test_results_are_in_the_object_store_not_on_the_nodes(setup, two_nodes):
    import pyarrow.fs as pafs
    s3 = pafs.S3FileSystem(endpoint_override=setup["endpoint"], scheme="http",
                           access_key=S3["AWS_ACCESS_KEY_ID"], secret_key=S3["AWS_SECRET_ACCESS_KEY"])
    found = s3.get_file_info(pafs.FileSelector("lcam/plain", recursive=True))
    names = [f.path for f in found if f.type == pafs.FileType.File]
    assert len([n for n in names if "/shards/" in n and n.endswith(".parquet")
                and "/shard-" in n]) == 16                 # 8 methods x 2 shards
    assert len([n for n in names if "/heads/tiny_vgg/" in n and n.endswith(".pt")]) == 4
    assert not list(setup["cluster"].cache.glob("shards/**/*.parquet")), \
        "shards were written to the head's local cache"


def test_a_node_lost_in_training_and_in_evaluation_changes_no_number(setup, two_nodes):
    cluster, markers = setup["cluster"], setup["work"] / "markers"
    markers.mkdir()
    job = cluster.submit([*SPEC, setup["data"], f"tracking.uri={setup['tracking']}",
                          f"storage.uri={bucket_uri(setup['endpoint'], 'killed')}"],
                         runtime_env={"env_vars": {
                             "HARNESS_TEST_KILL_NODE": "train:1:0,shard",
                             "HARNESS_TEST_FAULT_MARKERS": str(markers)}})
    try:
        deadline = time.time() + 900                   # lost in the second epoch of training
        while cluster.second.poll() is None:
            assert job.poll() is None, "the job ended, the node was not lost:\n" + \
                job.communicate()[0][-4000:]
            assert time.time() < deadline, "the second node was not lost"
            time.sleep(0.5)
        assert (markers / "node-killed-train").exists()
        cluster.start_second()                         # a node joins again (its disk kept)
        out = finish(job)
    finally:
        if job.poll() is None:
            job.kill()
    assert (markers / "node-killed-shard").exists(), "no shard ran on the rejoined node"
    assert cluster.second.wait(timeout=120) is not None   # lost again, in the evaluation
    runs = method_runs(setup["tracking"], "smoke")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs.values()), out[-3000:]
    assert_same(numbers(runs), numbers(two_nodes["runs"]))
    # resumed, not restarted: each epoch's training loss was logged once (rank 0 logs as it
    # trains; a fit restarted from scratch would log epoch 0 twice)
    client = MlflowClient(setup["tracking"])
    steps = sorted(m.step for m in client.get_metric_history(runs["lcam_fm"].info.run_id,
                                                             "train_loss"))
    assert steps == [0, 1], steps
    cluster.start_second()                             # for the tests after this one


def test_a_local_storage_that_a_node_cannot_see_is_refused_before_training(setup, tmp_path):
    cluster = setup["cluster"]
    folder = cluster.cache / "results"               # under the path each node has privately
    job = cluster.submit([*SPEC, setup["data"], "train.lr=0.04",
                          f"tracking.uri={setup['tracking']}",
                          f"storage.uri={folder}"])
    out, _ = job.communicate(timeout=900)
    assert job.returncode != 0, out[-3000:]
    assert "cannot read storage.uri" in out and "s3://bucket/prefix" in out, out[-3000:]
    assert not list(folder.glob("heads/**/*.pt"))


def test_no_node_holds_an_image_file(setup, two_nodes):
    """The images were only in S3: the second node's disk holds the evaluation set decoded
    (received through Ray's object store) and no image file; its training worker streamed
    its images from the store."""
    node = setup["cluster"].node_disk
    assert list(node.glob("prepared/*/images.npy")), "the evaluation set did not reach the node"
    images = [p for p in node.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    assert not images, images[:5]
    assert not (node / "quickstart-v1").exists()
