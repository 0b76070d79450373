"""``python -m harness bench --pipeline``: the whole evaluation against the explanation alone.

For each backbone (random init, 224 x 224) and each method, on ``--pipeline-images``
generated JPEG files (no data needed):

* **decode once**: ``harness.data.prepared.prepare`` (decode, resize, crop, uint8), per image;
* **whole evaluation**: the real shard task, ``harness.pipeline.shards.run_shard``, over the
  prepared images: load, explain, Y and O at the three kept fractions, localisation columns,
  the Parquet write; per image, median of ``--repeats``;
* **explanation + 3 masked forwards**: the same explainer and ``Evaluator`` on the same
  batches in this process, nothing else; per image, median of ``--repeats``;
* the ratio whole / (explanation + 3 masked forwards): the overhead of the pipeline around
  the compute it cannot avoid (target: <= 1.3 on CPU); on CUDA its inverse is the share of
  the task's time the GPU computes (target: >= 0.9 for one-pass methods at batch 64).

``--memory-images N`` instead runs ``python -m harness run`` over N generated 64 x 64 images
(``tiny_resnet``, random init, Grad-CAM) and samples the resident memory of the driver and of
the Ray workers every half second: it must stay flat as N grows (rows are streamed to
Parquet per shard, only the overlay images are kept).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

def _jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` smooth random JPEG images in ``folder/val/c0`` (an ImageNet-style tree)."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    out = folder / "val" / "c0"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = torch.rand(1, 3, size[0] // 16, size[1] // 16, generator=gen)
        img = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")[0]
        pixels = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(out / f"{i:05d}.jpg", quality=90)
    return folder


def _median_per_image(fn, repeats: int, n: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n


def _cell(name: str, backbone: str, weights):
    import methods
    from harness.pipeline.plan import Cell
    cls = methods.method_class(name)
    return Cell(backbone=backbone, weights=weights, method=name, method_id=name,
                display_name=cls.display_name, variant=cls.variants[0], params={}, row=1,
                family=cls.family, forward_passes=1)


def _evaluation(args, n: int):
    from harness.metrics.protocol import PAPER, PAPER_FRACTIONS
    from harness.pipeline.plan import EvaluationPlan
    return EvaluationPlan(fractions=tuple(PAPER_FRACTIONS), preset=PAPER, batch_size=args.batch,
                          overlays=0, autocast=False, channels_last=args.channels_last,
                          images_per_task=n, cpus_per_task=args.threads,
                          gpus_per_task=1 if args.device == "cuda" else 0, max_retries=0)


def bench_method(args, bb, prepared, images, method: str, tmp: Path) -> dict[str, Any]:
    """Whole evaluation and explanation + 3 masked forwards of ``method``, per image."""
    import methods
    from harness.metrics.protocol import Evaluator
    from harness.data.prepared import ref_of
    from harness.pipeline import shards
    n = len(prepared)
    cell, ev = _cell(method, bb.name, args.weights), _evaluation(args, n)

    def whole():
        shards.run_shard(shards.ShardJob(cell=cell, images=images,
                                         prepared=ref_of(prepared, ship=False),
                                         weights_id=bb.weights_id, evaluation=ev, head=None,
                                         seed=args.seed, shard=0, indices=tuple(range(n))))

    torch.manual_seed(0)
    ex, evaluator = methods.create(method, bb), Evaluator(bb)
    batches = [prepared.batch(range(k, min(k + args.batch, n))).to(bb.device)
               for k in range(0, n, args.batch)]

    def compute():
        for x in batches:
            evaluator.evaluate(x, ex.explain(x), logits=ex.last_logits)

    with mock.patch.object(shards, "_load_backbone", lambda *a: bb), \
            mock.patch.object(shards, "_load_prepared", lambda *a: prepared):
        whole()                                   # warm-up (imports, allocator)
        compute()
        w = _median_per_image(whole, args.repeats, n)
        c = _median_per_image(compute, args.repeats, n)
    return {"whole_ms_per_image": w * 1e3, "compute_ms_per_image": c * 1e3,
            "images_per_s": 1 / w, "ratio": w / c,
            "busy_fraction": c / w if args.device == "cuda" else None,
            "target": {"quantity": "whole / (explain + 3 masked forwards)", "limit": 1.3,
                       "met": w / c <= 1.3}}


def bench_backbone(args, name: str, tmp: Path) -> dict[str, Any]:
    from harness.data.models import load_backbone
    from harness.data.prepared import prepare
    from harness.pipeline.plan import ImageSet
    torch.set_num_threads(args.threads)
    bb = load_backbone(name, weights=args.weights).to(args.device)
    size = tuple(bb.input_size)
    root = _jpegs(tmp / f"images-{name}", args.pipeline_images, (size[0] + 32, size[1] + 96))
    images = ImageSet("imagenet", "val", size, root=str(root))
    dataset = images.build()
    start = time.perf_counter()
    prepared = prepare(images, dataset, tmp / f"cache-{name}", workers=args.threads)
    decode = (time.perf_counter() - start) / len(dataset)
    out = {"images": len(dataset), "decode_once_ms_per_image": decode * 1e3, "methods": {}}
    for method in args.methods:
        out["methods"][method] = bench_method(args, bb, prepared, images, method, tmp)
    return out


def run(args) -> dict[str, Any]:
    """The pipeline benchmark (see the module docstring); a dict of results."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if args.memory_images:
            return {"memory": memory_check(args.memory_images, Path(tmp))}
        return {"backbones": {name: bench_backbone(args, name, Path(tmp))
                              for name in args.backbones}}


def memory_check(n: int, tmp: Path) -> dict[str, Any]:
    """Peak resident memory of a real run over ``n`` images, driver and workers apart."""
    import psutil
    import yaml
    root = _jpegs(tmp / "images", n, (64, 64))
    spec = tmp / "memory.yaml"
    spec.write_text(yaml.safe_dump({
        "schema": 1, "name": "memory", "backbones": [{"name": "tiny_resnet", "weights": None}],
        "methods": ["gradcam"], "data": {"kind": "imagenet", "root": str(root)},
        "evaluation": {"batch_size": 64, "overlays": 4},
        "sharding": {"images_per_task": 500}}))
    env = dict(os.environ, HARNESS_CACHE_DIR=str(tmp / "cache"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    start = time.perf_counter()
    log = open(tmp / "memory-run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(spec)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    driver, workers, by_task = {"rss": 0, "anon": 0}, {"rss": 0, "anon": 0}, {}
    top = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            _peak(driver, top.pid)
            for child in top.children(recursive=True):
                title = " ".join(child.cmdline())[:64]
                if "ray::" in title:              # ray::<task running now>, or ray::IDLE
                    task = (title.split("ray::", 1)[1].split() or ["?"])[0]
                    _peak(workers, child.pid)
                    _peak(by_task.setdefault(task, {"rss": 0, "anon": 0}), child.pid)
        except (psutil.Error, OSError):            # a process that just ended
            pass
        time.sleep(0.5)
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"the memory run failed (exit {proc.returncode}): "
                           f"{(tmp / 'memory-run.log').read_text()[-2000:]}")
    return {"images": n, "seconds": time.perf_counter() - start,
            "driver_peak_mib": driver["rss"] / 2**20, "worker_peak_mib": workers["rss"] / 2**20,
            "driver_anon_peak_mib": driver["anon"] / 2**20,
            "worker_anon_peak_mib": workers["anon"] / 2**20,
            "worker_peaks_mib_by_task": {task: {k: v / 2**20 for k, v in peak.items()}
                                         for task, peak in sorted(by_task.items())}}


def _peak(peaks: dict[str, int], pid: int) -> None:
    """Raise ``peaks`` to the process's resident memory: all of it (``rss``) and its
    anonymous part (``anon``, ``RssAnon``: what the process itself allocated). The rest is
    file pages mapped in, such as the memory-mapped prepared images a task has read: the
    kernel shares and reclaims those, and they grow with the images read, not with a leak."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    for key, field in (("rss", "VmRSS"), ("anon", "RssAnon")):
        if field in fields:
            peaks[key] = max(peaks[key], int(fields[field].split()[0]) * 1024)
