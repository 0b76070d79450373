"""Decode once: a backbone's evaluation images are decoded once into a prepared set
(``harness.data.prepared``) that every method's shards read, bit for bit equal to what the
transform gives."""
from __future__ import annotations

import threading
from unittest import mock

import torch

from harness.data import images as images_module
from harness.data.prepared import Prepared, prepare, ref_of
from harness.pipeline import shards
from harness.pipeline.plan import EvaluationPlan, ImageSet
from harness.metrics.protocol import PAPER, PAPER_FRACTIONS


def folder(tmp_path, n=6):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        d = tmp_path / "data" / "val" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(40, 52, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f"{i}.png")
    return tmp_path / "data"


def test_prepared_images_equal_the_transform_and_are_reused(tmp_path):
    images = ImageSet("imagenet", "val", (32, 32), root=str(folder(tmp_path)))
    ds = images.build()
    with mock.patch.object(images_module, "load_image", wraps=images_module.load_image) as load:
        first = prepare(images, ds, tmp_path / "cache")
        again = prepare(images, ds, tmp_path / "cache")
    assert load.call_count == len(ds) == len(first) == 6        # once per image, then reused
    assert again.path == first.path
    for i in range(len(ds)):
        assert torch.equal(first.batch([i])[0], ds[i][0])       # x / 255 == ToTensor, exactly
        assert first[i][1:] == ds[i][1:] and first.path_of(i) == ds.path_of(i)
    assert torch.equal(first.batch(range(1, 4)), torch.stack([ds[i][0] for i in (1, 2, 3)]))
    assert first.list_hash == ds.list_hash and Prepared(first.path).classes == ds.classes


def test_every_method_of_a_backbone_reads_the_prepared_set_no_decode(tmp_path, tiny_backbone,
                                                                     monkeypatch):
    """Two methods' shards over the same images: no image is decoded by a shard (the shard
    finds the prepared set in the node's cache)."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    from harness.pipeline.plan import Cell
    images = ImageSet("imagenet", "val", (16, 16), root=str(folder(tmp_path)))
    ds = images.build()
    prepared = prepare(images, ds, tmp_path / "cache")
    ev = EvaluationPlan(fractions=PAPER_FRACTIONS, preset=PAPER, batch_size=4, overlays=0,
                        autocast=False, channels_last=False, images_per_task=6,
                        cpus_per_task=1, gpus_per_task=0, max_retries=0)
    loading_threads = set()

    def batch(self, indices, original=Prepared.batch):
        loading_threads.add(threading.current_thread())     # kept: no id reused
        return original(self, indices)

    with mock.patch.object(images_module, "load_image") as load, \
            mock.patch.object(shards, "_load_backbone", lambda *a: tiny_backbone), \
            mock.patch.object(Prepared, "batch", batch):
        for method in ("gradcam", "gradcampp"):
            cell = Cell(backbone="tiny", weights=None, method=method, method_id=method,
                        display_name=method, variant="paper", params={}, row=1,
                        family="gradient", forward_passes=1)
            result = shards.run_shard(shards.ShardJob(
                cell=cell, images=images, prepared=ref_of(prepared, ship=False),
                weights_id=tiny_backbone.weights_id, evaluation=ev, head=None, seed=0, shard=0,
                indices=tuple(range(6))))
            summary = result["summary"]
            assert summary["rows"] == 6 and result["rows"].num_rows == 6 and set(summary["seconds"]) >= {"load", "explain",
                                                                        "score", "write"}
    assert load.call_count == 0
    # one loading thread for the process, not one per shard (a new thread a shard made glibc
    # open a malloc arena per thread: a Ray worker's memory grew with the shards it ran)
    assert len(loading_threads) == 1 and threading.current_thread() not in loading_threads
