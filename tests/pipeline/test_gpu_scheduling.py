"""The GPU scheduling path, on a Ray that declares GPUs on a machine without one (issue 21).

A local Ray with ``num_gpus=2`` schedules everything the harness builds when GPUs are asked
for (evaluation workers holding half a GPU each, the Ray Train worker's GPU bundle, the CUDA
probe of every GPU node) as a GPU cluster would. Only the CUDA device itself is replaced, in
the workers, by ``gpu_stand_in`` (Ray's ``worker_process_setup_hook``): where a process would
take its CUDA device, it checks that Ray gave it a GPU, logs which, and computes on the CPU.

- a run with ``sharding.gpus_per_task: 0.5`` and ``train.use_gpu: true`` finishes (no
  ``max_calls``, no option Ray refuses), on long-lived workers (several shards per process),
  each with its GPU id, at most two per GPU, the Train worker with its own GPU; its numbers
  equal the same spec on CPU, bit for bit (the same arithmetic);
- the same request without the stand-in (torch sees no CUDA on the node that offers GPUs) is
  refused before anything trains (``cluster.check_gpus``: ``ClusterRefused``, exit 2),
  naming the node.

``tests/e2e/test_gpu_refusal.py`` makes the refusal as a user meets it (``ray start
--num-gpus``, then ``python -m harness run``); ``harness gpu-check`` covers the CUDA device.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from services import REPO, fresh_cache, short_tmp

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent

SPEC = """schema: 1
name: gpu-scheduling
backbones: [{name: tiny_vgg}]
data: {kind: quickstart, limit: 12, train_limit: 64}
methods: [{name: gradcam}, {name: lcam_fm}]
train: {epochs: 1, batch_size: 32, lr: 0.05, lr_decay: 0.9}
evaluation: {batch_size: 3, overlays: 0}
sharding: {images_per_task: 3, cpus_per_task: 0.25, max_retries: 1}
"""


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
    """A local Ray declaring 2 GPUs, its workers with the stand-in; the stand-in's log."""
    from harness.pipeline import ray_runtime
    ray_runtime.prepare_environment(None)
    import ray
    work = tmp_path_factory.mktemp("gpu")
    cache = fresh_cache(work)
    log = work / "stand-in"
    log.mkdir()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
             log_to_driver=False, _temp_dir=short_tmp("rg"), runtime_env={
                 "worker_process_setup_hook": "gpu_stand_in.install",
                 "env_vars": {"PYTHONPATH": f"{REPO}:{HERE}", "HARNESS_CACHE_DIR": str(cache),
                              "GPU_STAND_IN_LOG": str(log)}})
    try:
        yield {"work": work, "cache": cache, "log": log}
    finally:
        ray.shutdown()


def _run(declared, monkeypatch, name: str, *overrides: str):
    from harness.pipeline import heads
    from harness.pipeline.runner import run_benchmark
    from harness.spec import load_spec
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(declared["cache"]))
    monkeypatch.setattr(heads, "process_group_backend", lambda group: "gloo")   # no NCCL here
    spec_file = declared["work"] / f"{name}.yaml"
    spec_file.write_text(SPEC)
    import ray
    spec = load_spec(str(spec_file), [f"tracking.uri=sqlite:///{declared['work']}/mlflow.db",
                                      f"tracking.experiment={name}",       # the Ray above
                                      f"ray.address={ray.get_runtime_context().gcs_address}",
                                      *overrides])
    return run_benchmark(spec)


def _seen(log: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log.glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def test_gpu_shares_run_on_long_lived_workers_with_their_gpus(declared, monkeypatch):
    gpu = _run(declared, monkeypatch, "gpu", "sharding.gpus_per_task=0.5", "train.use_gpu=true",
               "train.loader_workers=0")      # the CPU run's draws (the default: 2 on GPU)
    seen = _seen(declared["log"])
    shards = [e for e in seen if e["what"].startswith("the shard job")]
    assert len(shards) == 2 * 4                        # 2 cells x 4 shards, each on a GPU share
    assert all(e["share"] == 0.5 and len(e["gpu_ids"]) == 1 for e in shards)
    per_pid = defaultdict(int)
    for e in shards:
        per_pid[e["pid"]] += 1
    assert len(per_pid) <= 4 and max(per_pid.values()) >= 2, per_pid   # long-lived workers
    on_gpu = defaultdict(set)
    for e in shards:
        on_gpu[e["gpu_ids"][0]].add(e["pid"])
    assert all(len(pids) <= 2 for pids in on_gpu.values()), on_gpu     # two halves per GPU
    assert sum(e["what"].startswith("the analysis job") for e in seen) == 2
    train = [e for e in seen if e["what"].startswith("train ")]
    assert train and train[0]["share"] == 1.0 and len(train[0]["gpu_ids"]) == 1

    cpu = _run(declared, monkeypatch, "cpu")
    for key, metrics in cpu.metrics.items():
        for name in ("AD_100", "IC_100", "AD_50", "IC_50", "AD_15", "IC_15", "FW"):
            assert gpu.metrics[key][name] == metrics[name], (key, name)


def test_gpus_that_torch_cannot_use_are_refused_before_training(declared, monkeypatch):
    import ray

    import gpu_stand_in
    from harness.pipeline import cluster
    # The probe without the stand-in: this machine's torch sees no CUDA on the GPU node.
    monkeypatch.setattr(cluster, "_cuda_of_node", gpu_stand_in.real_cuda_of_node)
    with pytest.raises(cluster.ClusterRefused) as err:
        cluster.check_gpus()
    node = ray.get_runtime_context().get_node_id()
    assert f"node {node[:12]}" in str(err.value)
    assert "offers 2 GPU to Ray" in str(err.value) and "sees no CUDA device" in str(err.value)
