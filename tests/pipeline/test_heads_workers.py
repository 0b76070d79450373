"""The L-CAM heads' training does not depend on the number of Ray Train workers.

``reference``'s B x B loss term (and so its TV strength) is taken over the whole optimiser
batch: ``_Heads.train_epoch`` gathers every worker's labels of the step (``all_gather_rows``)
and passes them to the loss; each worker divides by its own batch and DDP averages the
gradients, which gives the one-worker loss and gradients (``tests/methods/test_lcam.py`` shows
the arithmetic on one process). Here: the collective itself on two gloo processes (rows of
different lengths), and a real fit on two Ray Train workers (CPU, gloo) against one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services import REPO

HERE = Path(__file__).resolve().parent


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    from harness.pipeline.heads import _batch_labels, all_gather_rows
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        local = torch.arange(3 + rank * 2).view(-1, 1) * 10 + rank     # 3 rows, then 5 rows
        gathered = all_gather_rows(local)
        labels = _batch_labels(torch.full((2,), rank), torch.full((2,), 7 + rank))
        torch.save({"rows": gathered, "labels": labels}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_concatenates_every_workers_rows_in_rank_order(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_gather_worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    want = torch.cat([torch.arange(3).view(-1, 1) * 10, torch.arange(5).view(-1, 1) * 10 + 1])
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        assert torch.equal(got["rows"], want)
        assert got["labels"]["model"].tolist() == [0, 0, 1, 1]
        assert got["labels"]["ground_truth"].tolist() == [7, 7, 8, 8]


@pytest.mark.slow
def test_two_ray_train_workers_train_the_heads_one_worker_trains(tmp_path):
    """A real TorchTrainer fit on 2 workers (gloo, CPU) against the same loop on one process:
    the same data and batches give the same per-epoch loss terms and the same heads, for the
    reference loss (model and ground-truth labels) and the paper loss. (With each worker's
    own labels only, ``workers_fit.py ... two_no_gather``, the reference heads differ: the
    mean TV of the first epoch is about half.)"""
    import workers_fit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        str(HERE)]),
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/ray")}
    proc = subprocess.run([sys.executable, str(HERE / "workers_fit.py"), str(tmp_path), "two"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (tmp_path / "done.json").exists(), proc.stderr[-4000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = workers_fit.run_loop(0, 1)
    for hid in ("ref_fm", "ref_img_gt", "paper_fm"):
        for epoch in range(2):
            for key in ("loss", "tv", "area", "ce", "lr"):
                assert two["means"][epoch][hid][key] == pytest.approx(
                    one["means"][epoch][hid][key], rel=1e-5), (hid, epoch, key)
        for name, value in one["heads"][hid].items():
            assert torch.allclose(two["heads"][hid][name], value, rtol=1e-4, atol=1e-6), \
                (hid, name)
