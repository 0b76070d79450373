"""The head training's input (issue 21): its own loader settings, resume-exact with loader
processes, a compact image list."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from services import REPO


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "shapes3", REPO / "examples" / "own-dataset" / "shapes3.py")
    shapes3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes3)
    from harness.data.images import build_dataset
    root = shapes3.make(tmp_path_factory.mktemp("input") / "shapes3", train_per_class=6,
                        val_per_class=1)
    return build_dataset("folder", "train", 64, root=root, train=True)


def _epoch(loader, sampler, epoch: int) -> torch.Tensor:
    """One epoch of the Train loop's input, as ``train_loop_per_worker`` draws it."""
    from methods.lcam_train import seed_epoch
    sampler.set_epoch(epoch)
    seed_epoch(0, epoch)
    return torch.cat([batch[0] for batch in loader])


def test_a_resumed_fit_with_loader_processes_draws_what_an_unbroken_one_draws(train_set):
    from harness.pipeline.heads import loader_options

    def loader():
        sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(train_set, batch_size=4, sampler=sampler,
                          **loader_options(torch.device("cpu"), 2)), sampler

    unbroken, sampler = loader()
    _epoch(unbroken, sampler, 0)
    second = _epoch(unbroken, sampler, 1)              # epoch 1 after epoch 0
    resumed, sampler = loader()
    assert torch.equal(_epoch(resumed, sampler, 1), second)   # epoch 1 first, as on resume
    assert not torch.equal(_epoch(resumed, sampler, 0), second)


def test_training_gets_its_own_loader_settings(tmp_path):
    from harness.pipeline.plan import plan
    from harness.spec import load_spec
    spec = tmp_path / "s.yaml"
    spec.write_text("schema: 1\nbackbones: [{name: tiny_vgg}]\nmethods: [{name: lcam_fm}]\n"
                    "train: {cpus_per_worker: 6, loader_workers: 4}\n"
                    "sharding: {cpus_per_task: 1}\n")
    (group,) = plan(load_spec(str(spec))).head_groups
    assert (group.cpus, group.loader_workers, group.num_threads) == (6.0, 4, 2)
    (gpu,) = plan(load_spec(str(spec), ["train.loader_workers=null",
                                        "train.use_gpu=true", "ray.address=auto"])).head_groups
    assert gpu.loader_workers == 5                      # cpus_per_worker - 1 on a GPU


def test_the_image_list_is_compact():
    from harness.data.items import ImageList
    root = "/data/imagenet/train"
    entries = ((f"{root}/n{c:08d}/n{c:08d}_{k}.JPEG", c, f"n{c:08d}/n{c:08d}_{k}.JPEG")
               for c in range(100) for k in range(100))
    items = ImageList.of(root, entries)
    assert len(items) == 10_000 and items.nbytes / len(items) < 100
    assert items[123] == (items.path(123), 1, "n00000001/n00000001_23.JPEG")
    assert str(items.path(123)) == f"{root}/n00000001/n00000001_23.JPEG"
    part = items.take([5, 9_999])
    assert list(part) == [items[5], items[9_999]]
