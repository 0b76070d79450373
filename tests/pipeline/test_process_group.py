"""A Ray Train fit on one node listens on loopback only (``harness.pipeline.process_group``).

Two CPU workers (gloo) join with ``LoopbackTorchConfig``, all-reduce a tensor, and each
reports the TCP sockets its own process listens on (from /proc): every one must be bound to
127.0.0.1. With Ray Train's own ``TorchConfig`` the rendezvous ``TCPStore`` of rank 0 listens
on ``[::]`` (every interface), which this test sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from services import REPO, kill_ray_processes, short_tmp, user_env

pytestmark = pytest.mark.slow

FIT = textwrap.dedent('''
    import json, os, re, sys
    from harness.pipeline import ray_runtime
    ray_runtime.prepare_environment(None)             # before ray is imported
    import ray, torch, torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from harness.pipeline.process_group import LoopbackTorchConfig

    def listening():
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                m = re.fullmatch(r"socket:\\[(\\d+)\\]", os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
            if m:
                inodes.add(m.group(1))
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                c = line.split()
                if c[3] == "0A" and c[9] in inodes:
                    found.append(c[1].split(":")[0])
        return found

    def loop(config):
        t = torch.ones(1) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        with open(os.path.join(config["out"], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump({"sum": float(t), "listening": listening()}, f)

    out = sys.argv[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    TorchTrainer(loop, train_loop_config={"out": out},
                 torch_config=LoopbackTorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="pg", storage_path=os.path.join(out, "ray"))).fit()
''')

LOOPBACK = ("0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000")


def test_a_one_node_fit_listens_on_loopback_only(tmp_path):
    ray_tmp = short_tmp("pg-")
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    try:
        res = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO,
                             env={**user_env(tmp_path / "home", RAY_TMPDIR=ray_tmp),
                                  "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=600)
    finally:
        kill_ray_processes(ray_tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]           # the group really joined
    bound = [a for r in ranks for a in r["listening"]]
    assert all(a in LOOPBACK for a in bound), f"beyond loopback: {bound}"
    assert not list(tmp_path.glob("lcam-process-group-*"))
