"""What ``python -m harness bench`` measures: the cases and the throughput runs.

Our methods (``our_case``: Score-CAM and RISE on a subset with a one-batch warm-up), the
pytorch-grad-cam wrappers (``library_case``), the RISE peak-memory probe, L-CAM training
throughput against a head-only step (``bench_training``) and shard evaluation throughput
(``bench_evaluation``). The timing itself is ``harness.bench.timing``.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from harness.bench.timing import Bench, Case, PeakMemory, _summary

ONE_PASS = ("gradcam", "gradcampp", "lcam_fm", "lcam_img")   # one backbone pass each

OURS = ("gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img")
LIBRARY = ("pgc_gradcam", "pgc_gradcampp", "pgc_scorecam")
DISPLAY = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM",
           "rise": "RISE", "lcam_fm": "L-CAM-Fm", "lcam_img": "L-CAM-Img",
           "pgc_gradcam": "GradCAM", "pgc_gradcampp": "GradCAMPlusPlus",
           "pgc_scorecam": "ScoreCAM"}


def display(key: str) -> str:
    """The display name of a benchmarked method: ours, the library's, or a plugin's own."""
    if key in DISPLAY:
        return DISPLAY[key]
    import methods
    return methods.method_class(key).display_name


# -- the cases --------------------------------------------------------------------------------
def _scorecam_class(channels: int | None):
    import methods
    base = methods.method_class("scorecam")
    if channels is None:
        return base

    class ScoreCAMSubset(base):
        """Score-CAM's own code on the first ``channels`` feature maps (benchmark only)."""

        @property
        def forward_passes(self) -> int:
            return min(channels, self.backbone.feature_channels)

        def _saliency(self, images, feats, logits, targets):
            return super()._saliency(images, feats[:, :channels], logits, targets)

    return ScoreCAMSubset


def our_case(b: Bench, key: str) -> Case:
    import methods
    from methods.rise import DEFAULT_MASKS
    a, bb = b.args, b.backbone
    k_all = bb.feature_channels
    if key == "scorecam":
        k = min(a.scorecam_channels or k_all, k_all)
        n = min(a.scorecam_images, a.batch)
        ex = _scorecam_class(None if k == k_all else k)(bb, batch_size=b.pb)
        warm = _scorecam_class(min(b.pb, k))(bb, batch_size=b.pb)
        x = b.images[:n]
        return Case(key, "ours", DISPLAY[key], lambda: ex.explain(x), n,
                    f"{n} img, {k}/{k_all} channels, fw batch {b.pb}", k_all, k,
                    lambda p: ex.last_forward_passes, warm=lambda: warm.explain(x[:1]),
                    repeats=b.costly_repeats)
    if key == "rise":
        full = DEFAULT_MASKS.get(bb.name, 4000)
        n_masks = a.rise_masks or full
        n = min(a.rise_images, a.batch)
        ex = methods.create("rise", bb, n_masks=n_masks, batch_size=b.pb)
        warm = methods.create("rise", bb, n_masks=min(b.pb, n_masks), batch_size=b.pb)
        x = b.images[:n]
        return Case(key, "ours", DISPLAY[key], lambda: ex.explain(x), n,
                    f"{n} img, {n_masks}/{full} masks, fw batch {b.pb}", full, n_masks,
                    lambda p: ex.last_forward_passes, warm=lambda: warm.explain(x[:1]),
                    repeats=b.costly_repeats)
    ex = methods.create(key, bb)
    return Case(key, "ours", display(key), lambda: ex.explain(b.images), a.batch,
                f"{a.batch} img", ex.forward_passes, ex.forward_passes,
                lambda p: ex.last_forward_passes, repeats=a.repeats)


@contextlib.contextmanager
def _trainable(backbone):
    """Parameters require grad while pytorch-grad-cam's gradient methods run (then frozen)."""
    params = list(backbone.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def library_case(b: Bench, key: str) -> Case:
    import numpy as np
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam import score_cam
    a, bb = b.args, b.backbone
    layers = [list(bb.body.children())[-1]]
    if key in ("pgc_gradcam", "pgc_gradcampp"):
        cls = pgc.GradCAM if key == "pgc_gradcam" else pgc.GradCAMPlusPlus
        cam = cls(model=bb, target_layers=layers)
        return Case(key, "pytorch-grad-cam", DISPLAY[key],
                    lambda: cam(input_tensor=b.images, targets=None), a.batch,
                    f"{a.batch} img, full backward", 1, 1, lambda p: p,
                    repeats=b.costly_repeats, context=lambda: _trainable(bb),
                    extra={"close": cam.activations_and_grads.release})
    k_all = bb.feature_channels
    k = min(a.scorecam_channels or k_all, k_all)
    n = min(a.scorecam_images, a.batch)

    class Subset(pgc.ScoreCAM):
        channels = k

        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            w = super().get_cam_weights(input_tensor, target_layer, targets,
                                        activations[:, :self.channels], grads)
            out = np.zeros(activations.shape[:2], dtype=w.dtype)
            out[:, :w.shape[1]] = w
            return out

    cam, warm = Subset(model=bb, target_layers=layers), Subset(model=bb, target_layers=layers)
    cam.batch_size = warm.batch_size = b.pb
    warm.channels = min(b.pb, k)
    x = b.images[:n]
    quiet = SimpleNamespace(tqdm=lambda it, *args, **kw: it)
    return Case(key, "pytorch-grad-cam", DISPLAY[key], lambda: cam(input_tensor=x, targets=None), n,
                f"{n} img, {k}/{k_all} channels, fw batch {b.pb}", k_all, k,
                lambda p: p - 1, warm=lambda: warm(input_tensor=x[:1], targets=None),
                repeats=b.costly_repeats,
                context=lambda: mock.patch.object(score_cam, "tqdm", quiet),
                extra={"close": lambda: (cam.activations_and_grads.release(),
                                         warm.activations_and_grads.release())})


def rise_memory_probe(b: Bench) -> dict:
    """RISE peak memory on one image for 1 and 4 batches of masks, twice each (min kept).

    If RISE held all N masked images or forwarded them at once, 4 batches would need about
    4x the activations of one; the allocator's own noise is far smaller than that.
    """
    import methods
    sizes = (b.pb, 4 * b.pb)
    peaks: dict[str, list[float]] = {str(n): [] for n in sizes}
    for _ in range(2):                                 # kernels are warm from the timed runs
        for n in sizes:
            ex = methods.create("rise", b.backbone, n_masks=n, batch_size=b.pb)
            with PeakMemory(b.device) as mem:
                ex.explain(b.images[:1])
            peaks[str(n)].append(mem.peak_mib)
    small, large = min(peaks[str(sizes[0])]), min(peaks[str(sizes[1])])
    return {"masks_to_peak_mib": {k: min(v) for k, v in peaks.items()}, "samples": peaks,
            "batch_size": b.pb, "bounded": large <= 1.5 * small,
            "rule": "bounded if peak(4 batches) <= 1.5 x peak(1 batch)"}


# -- training and evaluation throughput -------------------------------------------------------
def bench_training(b: Bench) -> dict:
    from methods.lcam import AttentionHead
    from methods.lcam_train import TrainConfig, make_optimizer, train_step
    bb, x, a = b.backbone, b.images, b.args
    k, r = bb.feature_channels, bb.num_classes
    labels = torch.zeros(len(x), dtype=torch.long, device=b.device)

    def fresh():
        torch.manual_seed(a.seed)
        return AttentionHead(k, r).to(b.device).train()

    floor_head = fresh()
    floor_opt = torch.optim.SGD(floor_head.parameters(), lr=1e-4)

    def floor_step():
        with torch.no_grad():
            feats = bb.features(x)
        loss = F.cross_entropy(floor_head(feats).mean(dim=(2, 3)), labels)
        floor_opt.zero_grad(set_to_none=True)
        loss.backward()
        floor_opt.step()
        return float(loss.detach())

    steps = {"head_only": floor_step}
    for mode in ("fm", "img"):
        cfg = TrainConfig(mode=mode)
        head = fresh()
        opt, _ = make_optimizer(head, cfg)
        steps[f"lcam_{mode}"] = (lambda h=head, o=opt, c=cfg: train_step(bb, h, x, labels, c, o))
    mem: dict[str, Any] = {}
    for _ in range(max(1, a.warmup)):                    # memory on the first run of each
        for name, fn in steps.items():
            with PeakMemory(b.device) if name not in mem else contextlib.nullcontext() as m:
                b.timed(fn, use_autocast=False)
            mem.setdefault(name, m)
    secs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(b.costly_repeats):                    # round-robin: load drifts hit all
        for name, fn in steps.items():
            secs[name].append(b.timed(fn, use_autocast=False))
    results: dict[str, Any] = {}
    for name in steps:
        ratios = [t / h for t, h in zip(secs[name], secs["head_only"])]
        results[name] = {"seconds_per_step": _summary(secs[name]),
                         "images_per_s": len(x) / statistics.median(secs[name]),
                         "ratio_to_head_only_step": statistics.median(ratios),
                         "peak_mib": mem[name].peak_mib}
    floor = statistics.median(b.floor_samples) * len(x)
    for v in results.values():
        v["ratio_to_forward"] = v["seconds_per_step"]["median"] / floor
    results["baseline"] = ("head_only = features(x) without autograd + the attention head + CE "
                           "of its pooled maps, backward, SGD step (no backward into the backbone)")
    return results


class _MemoryPrepared:
    """In-memory images with the ``harness.data.prepared.Prepared`` attributes a shard uses."""

    info = {"kind": "imagenet"}

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.ids = [f"bench-{i}" for i in range(len(images))]
        self.labels = [0] * len(images)

    def batch(self, indices) -> torch.Tensor:
        return self.images[list(indices)]

    def path_of(self, i: int) -> Path:
        return Path(f"/nonexistent/bench-{i}.png")       # no annotation: localisation is NaN


def bench_evaluation(b: Bench) -> dict:
    """Throughput of ``run_shard`` on an in-memory shard (data loading not timed)."""
    import methods
    from harness.metrics.protocol import PAPER, PAPER_FRACTIONS
    from harness.pipeline import shards
    from harness.data.prepared import PreparedRef
    from harness.pipeline.plan import Cell, EvaluationPlan, ImageSet
    a, bb, x = b.args, b.backbone, b.images
    n = a.eval_images or 2 * a.batch
    floor = statistics.median(b.floor_samples)
    cls = methods.method_class(a.eval_method)
    cell = Cell(backbone=bb.name, weights=a.weights, method=a.eval_method,
                method_id=a.eval_method, display_name=cls.display_name,
                variant=cls.variants[0], params={}, row=1, family=cls.family, forward_passes=1)
    evaluation = EvaluationPlan(fractions=tuple(PAPER_FRACTIONS), preset=PAPER,
                                batch_size=a.batch, overlays=0, autocast=False,
                                channels_last=False, images_per_task=n, cpus_per_task=a.threads,
                                gpus_per_task=1 if b.device.type == "cuda" else 0, max_retries=0)
    dataset = _MemoryPrepared(torch.stack([x[i % len(x)].cpu() for i in range(n)]))
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp, \
            mock.patch.object(shards, "_load_prepared", lambda *args: dataset), \
            mock.patch.object(shards, "_load_backbone", lambda *args: bb):
        def shard(i: int):
            return shards.run_shard(shards.ShardJob(
                cell=cell, images=ImageSet("imagenet", "val", (a.size, a.size)),
                prepared=PreparedRef("(in memory)", "(in memory)"), weights_id=bb.weights_id, evaluation=evaluation,
                head=None, seed=a.seed, shard=i, indices=tuple(range(n))))
        import pyarrow.parquet  # noqa: F401  (its first import is not a shard's cost)
        try:
            secs = [b.timed(lambda i=i: shard(i)) / n for i in range(b.costly_repeats)]
        finally:
            torch.set_num_threads(a.threads)
    med = statistics.median(secs)
    return {"method": a.eval_method, "images": n, "run_shard": {
        "ms_per_image": _summary([s * 1e3 for s in secs]), "images_per_s": 1 / med,
        "forwards_equivalent": med / floor,
        "note": "harness.pipeline.shards.run_shard on an in-memory shard (dataset and backbone "
                "loaders patched: data loading not timed); explain + AD/IC + Parquet write"}}
