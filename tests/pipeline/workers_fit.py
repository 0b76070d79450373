"""A head fit on real Ray Train workers, for ``test_heads_workers.py`` (run in its own process:
``python workers_fit.py OUT_DIR [two] [two_no_gather]``; tests/ and tests/pipeline/ on
PYTHONPATH), and the same loop on one process without Ray (``run_loop(0, 1)``).

The Ray Train loop below is ``harness.pipeline.heads.train_loop_per_worker`` with the data and
the backbone made deterministic (fixed tensors, no augmentation, the tiny backbone of
conftest.py, which has no Dropout), so that a fit on one worker and a fit on two can be
compared number for number: ``_Heads`` (the harness's heads, optimisers and ``train_epoch``,
with the labels gathered across workers) on a ``DistributedSampler`` whose per-worker batch is
``batch_size // workers``. Three heads train together: L-CAM-Fm ``reference`` (model labels),
L-CAM-Img ``reference`` (ground-truth labels) and L-CAM-Fm ``paper``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

EPOCHS, BATCH, IMAGES = 2, 8, 32


def heads():
    from harness.pipeline.plan import HeadPlan
    from methods.lcam_train import TrainConfig
    return (HeadPlan("ref_fm", TrainConfig(mode="fm", epochs=EPOCHS, lr=0.05,
                                           variant="reference")),
            HeadPlan("ref_img_gt", TrainConfig(mode="img", epochs=EPOCHS, lr=0.05,
                                               variant="reference", labels="ground_truth")),
            HeadPlan("paper_fm", TrainConfig(mode="fm", epochs=EPOCHS, lr=0.5)))


def data():
    from conftest import images_for
    labels = torch.randint(0, 5, (IMAGES,), generator=torch.Generator().manual_seed(3))
    return torch.utils.data.TensorDataset(images_for(IMAGES, 16, 16, seed=5), labels)


def run_loop(rank: int, world: int, no_gather: bool = False) -> dict:
    """The epochs of one worker: {'means': per epoch and head, 'heads': state_dicts}."""
    from torch.utils.data import DataLoader, DistributedSampler

    from conftest import build_tiny_backbone
    from harness.pipeline import heads as heads_module
    from harness.pipeline.plan import HeadGroup, ImageSet
    from methods.lcam_train import seed_epoch

    if no_gather:                       # the old behaviour: each worker's own labels only
        heads_module._batch_labels = lambda m, g: {"model": m, "ground_truth": g.long()}
    group = HeadGroup(backbone="tiny", weights=None, batch_size=BATCH, workers=world,
                      use_gpu=False, num_threads=1, heads=heads(),
                      images=ImageSet(kind="quickstart", split="train", input_size=(16, 16)))
    trainer = heads_module._Heads(group, build_tiny_backbone(), torch.device("cpu"), world)
    dataset = data()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH // world, sampler=sampler)
    means = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        seed_epoch(0, epoch)
        means.append(trainer.train_epoch(loader, epoch))
    return {"means": means, "heads": trainer.state(EPOCHS - 1)["heads"]}


def train_loop(config: dict) -> None:
    """The loop of every Ray Train worker; rank 0 saves the heads and the epochs' means."""
    import ray.train
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    result = run_loop(rank, world, bool(config.get("no_gather")))
    if rank == 0:
        torch.save(result, config["out"])
    ray.train.report({"epoch": EPOCHS})


def fit(workers: int, out: Path, storage: Path, **options) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    TorchTrainer(train_loop, train_loop_config={"out": str(out), **options},
                 scaling_config=ScalingConfig(num_workers=workers,
                                              resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=out.stem, storage_path=str(storage))).fit()


def main(out_dir: str, *names: str) -> None:
    """Fit on Ray Train workers: ``two`` (2 workers) and/or ``two_no_gather``."""
    from harness.pipeline.ray_runtime import init_ray
    out = Path(out_dir)
    init_ray(num_cpus=2, env_vars={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    for name in names or ("two",):
        fit(2, out / f"{name}.pt", out / "ray_results", no_gather=name == "two_no_gather")
    (out / "done.json").write_text(json.dumps({"ok": True}))


if __name__ == "__main__":
    main(*sys.argv[1:])
