"""``python -m harness bench``: latency, #FW, peak memory and throughput of every method.

One process, one model, one batch of random images in [0, 1], one thread count. Per backbone:

* **floor**: a plain ``backbone(images)`` forward, in ms per image. A floor sample is taken
  before the first and after every timed repetition of every method; each repetition's
  ratio uses the mean of the samples either side of it, so drifts in machine load cancel.
* **our methods** (gradcam, gradcampp, scorecam, rise, lcam_fm, lcam_img): ``explain`` time
  per explained image and ``x(FWmeas*fwd)``, its ratio to (#FW x floor), #FW being the count
  the method *measured* (``last_forward_passes``: exact savings such as Score-CAM's skipped
  constant channels make it lower than nominal); ``x(FWrun*fwd)`` uses the nominal count of
  what ran. The clean prediction forward is timed but is not in #FW (protocol.md section 1),
  so a one-pass method at 1.00x costs exactly one forward, and a subset run of N passes
  carries 1/N of clean-forward overhead: ``x(passes*fwd)`` divides by every image that
  entered the backbone's first layer (``passes``, counted by a forward pre-hook). The target
  (``<= 1.1``) is checked on ``x(FWmeas*fwd)``. ``x cpu`` is the same ratio in process CPU
  time, a cross-check when the machine is shared.
* **pytorch-grad-cam** GradCAM, GradCAMPlusPlus and ScoreCAM on the same ``SplitBackbone``,
  target layer = the last module of ``backbone.body``. Its gradient methods need gradients
  through the backbone, so its parameters are made trainable while they run, as they are
  in an ordinary torchvision model (frozen again afterwards). Its ScoreCAM uses our forward
  batch (``batch_size`` attribute); its tqdm progress bar is replaced by a no-op. Its #FW
  is the pass count (minus its clean forward for ScoreCAM).
* Costly methods run on a *subset*, never extrapolated from a per-pass time:
  ``--rise-masks N`` runs RISE with N masks; ``--scorecam-channels k`` runs Score-CAM on the
  first k feature channels (the method's own code on A[:, :k]: the map is a partial sum, the
  time is exactly that of k channels; the library likewise); ``--rise-images`` and
  ``--scorecam-images`` explain fewer images. The ``run`` column says what ran; their
  warm-up is a one-batch run of the same code.
* **peak memory** (MiB above the level before the call): on Linux the RSS high-water mark
  (``VmHWM``), reset through ``/proc/self/clear_refs`` after ``gc`` and ``malloc_trim``;
  on CUDA ``torch.cuda.max_memory_allocated`` above the allocated level before; elsewhere
  ``ru_maxrss`` growth (a lower bound). Taken on each method's first full-size run. A RISE
  probe compares the peak for 1 and 4 batches of masks: memory must not grow with N.
* **L-CAM training**: images/s of ``lcam_train.train_step`` (Fm and Img, SGD step included)
  against a head-only training step: frozen ``features`` without autograd, the same
  attention head, cross-entropy of its spatially pooled maps, backward and SGD step (the
  least any head training on a frozen backbone costs). Round-robin repetitions.
* **evaluation**: ``harness.evaluation.run_shard`` on an in-memory shard of ``--eval-images``
  (its dataset and backbone loaders are patched to return these images and this model:
  data loading is not timed; explain, AD/IC scoring, localisation columns and the Parquet
  write are). If ``run_shard`` fails, ``protocol.Evaluator.evaluate_explainer`` on one batch
  is measured instead and the JSON says so.

Median and min-max over ``--repeats`` repetitions (``--costly-repeats`` for the costly
entries) after ``--warmup`` runs; ``torch.cuda.synchronize`` around each on GPU. Float32
denormals are flushed (random-init networks make many). A rich table is printed and a JSON
file written atomically. The load average is recorded: two OpenMP threads on a loaded
machine can stall for seconds per call; ``OMP_WAIT_POLICY=PASSIVE`` avoids it (recorded).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable
from unittest import mock

import torch
import torch.nn.functional as F

OURS = ("gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img")
LIBRARY = ("pgc_gradcam", "pgc_gradcampp", "pgc_scorecam")
DISPLAY = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM",
           "rise": "RISE", "lcam_fm": "L-CAM-Fm", "lcam_img": "L-CAM-Img",
           "pgc_gradcam": "GradCAM", "pgc_gradcampp": "GradCAMPlusPlus",
           "pgc_scorecam": "ScoreCAM"}
TARGET_RATIO = 1.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m harness bench``."""
    a = parser.add_argument
    a("--backbones", nargs="+", default=["resnet50", "vgg16"])
    a("--weights", default=None, help="backbone weights (default: random init; never downloads)")
    a("--size", type=int, default=224, help="input side in pixels")
    a("--batch", type=int, default=8, help="images per batch (the floor's batch)")
    a("--threads", type=int, default=2, help="torch intra-op threads")
    a("--repeats", type=int, default=5, help="timed repetitions per method")
    a("--warmup", type=int, default=1, help="untimed runs before timing")
    a("--methods", nargs="+", default=[*OURS, *LIBRARY],
      help=f"any of {', '.join(OURS + LIBRARY)}")
    a("--perturbation-batch", type=int, default=None,
      help="masked images per forward in Score-CAM and RISE (default: --batch)")
    a("--costly-repeats", type=int, default=None,
      help="timed repetitions of Score-CAM, RISE, the pytorch-grad-cam methods, the training "
           "steps and the evaluation shard (default: min(repeats, 3))")
    a("--rise-masks", type=int, default=None, help="masks run (default: the paper's N)")
    a("--rise-images", type=int, default=1, help="images explained by RISE")
    a("--scorecam-channels", type=int, default=None,
      help="run Score-CAM on the first k feature channels (default: all K)")
    a("--scorecam-images", type=int, default=1, help="images explained by Score-CAM")
    a("--eval-method", default="lcam_fm", help="method of the evaluation-throughput run")
    a("--eval-images", type=int, default=None, help="images in the evaluated shard (default 2x batch)")
    a("--no-train", action="store_true", help="skip the L-CAM training throughput")
    a("--no-eval", action="store_true", help="skip the evaluation throughput")
    a("--out", default="bench-results/bench.json", help="JSON results file")
    a("--device", choices=("cpu", "cuda"), default="cpu")
    a("--channels-last", action="store_true", help="model and images in channels_last")
    a("--autocast", action="store_true",
      help="torch.autocast for inference (bfloat16 on CPU, float16 on CUDA)")
    a("--keep-denormals", action="store_true",
      help="do not flush float32 denormals (random-init networks produce many; they are 10-100x "
           "slower on CPU)")
    a("--seed", type=int, default=0)


# -- measurement primitives --------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda: torch.cuda.max_memory_allocated above memory_allocated before the call"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return ("linux: RSS high-water mark (VmHWM) reset via /proc/self/clear_refs after gc "
                "and malloc_trim; peak minus VmRSS before the call")
    except OSError:
        return "ru_maxrss growth during the call (a lower bound: counts only a new process peak)"


class PeakMemory:
    """Context manager: ``peak_mib`` = memory above the pre-call level at the call's peak."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, None
        self.kind = memory_method(device).split(":")[0]

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if self.kind == "linux":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS") or 0
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.kind == "linux":
            self.peak_mib = max(0, (_status_kib("VmHWM") or 0) - self.base) / 1024
        else:
            self.peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024


class PassCounter:
    """Counts images entering the backbone's first layer (every forward, clean included)."""

    def __init__(self, backbone):
        self.n = 0
        self.handle = backbone.first_layer.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs) -> None:
        self.n += int(inputs[0].shape[0])

    def close(self) -> None:
        self.handle.remove()


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


@dataclass
class Case:
    """One timed entry: ``run`` does the work for ``n_images`` images."""

    key: str
    impl: str                          # 'ours' | 'pytorch-grad-cam'
    run: Callable[[], Any]
    n_images: int
    what: str                          # what was run, for the table
    fw_nominal: float                  # protocol.md's #FW at the paper setting
    fw_run: float                      # nominal #FW of what actually ran
    fw_measured: Callable[[int], float]  # from the pass count per image -> measured #FW
    warm: Callable[[], Any] | None = None  # reduced warm-up (None: ``run`` itself)
    repeats: int = 1
    context: Callable[[], Any] = contextlib.nullcontext
    extra: dict = field(default_factory=dict)


class Bench:
    """Everything shared by the cases of one backbone."""

    def __init__(self, args: argparse.Namespace, name: str):
        import backbones
        self.args, self.name = args, name
        self.device = torch.device(args.device)
        bb = backbones.load(name, weights=args.weights).to(self.device)
        gen = torch.Generator().manual_seed(args.seed)
        images = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(self.device)
        if args.channels_last:
            bb = bb.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        self.backbone, self.images = bb, images
        self.pb = args.perturbation_batch or args.batch
        self.costly_repeats = args.costly_repeats or min(args.repeats, 3)
        self.counter = PassCounter(bb)
        self.floor_samples: list[float] = []
        self.floor_cpu: list[float] = []
        self.last_cpu = 0.0

    def autocast(self):
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.args.autocast)

    def timed(self, fn: Callable[[], Any], use_autocast: bool = True) -> float:
        """Wall seconds of ``fn()``; the process CPU seconds are left in ``last_cpu``."""
        _sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        with self.autocast() if use_autocast else contextlib.nullcontext():
            fn()
        _sync(self.device)
        t = time.perf_counter() - t0
        self.last_cpu = time.process_time() - c0
        return t

    def floor_once(self) -> tuple[float, float]:
        """One plain forward of the batch; returns (wall, CPU) seconds per image."""
        with torch.no_grad():
            t = self.timed(lambda: self.backbone(self.images)) / len(self.images)
        c = self.last_cpu / len(self.images)
        self.floor_samples.append(t)
        self.floor_cpu.append(c)
        return t, c

    def measure(self, case: Case) -> dict:
        a = self.args
        mem = None
        with case.context():
            for i in range(a.warmup):
                if case.warm is None and mem is None:
                    with PeakMemory(self.device) as mem:
                        self.timed(case.run)
                else:
                    self.timed(case.warm or case.run)
            secs, cpus, passes, fws = [], [], [], []
            ratios, ratios_run, ratios_cpu, ratios_passes = [], [], [], []
            after = self.floor_once()      # each repetition sits between two plain forwards
            for r in range(case.repeats):
                before, before_cpu = after
                self.counter.n = 0
                if mem is None:
                    with PeakMemory(self.device) as mem:
                        t = self.timed(case.run) / case.n_images
                else:
                    t = self.timed(case.run) / case.n_images
                c = self.last_cpu / case.n_images
                p = self.counter.n / case.n_images
                after = self.floor_once()
                floor, floor_cpu = (before + after[0]) / 2, (before_cpu + after[1]) / 2
                fws.append(case.fw_measured(p))
                fw = max(fws[-1], 1.0)
                secs.append(t)
                cpus.append(c)
                passes.append(p)
                ratios.append(t / (fw * floor))
                ratios_run.append(t / (max(case.fw_run, 1.0) * floor))
                ratios_cpu.append(c / (fw * floor_cpu))
                ratios_passes.append(t / (max(p, 1.0) * floor))
        out = {"impl": case.impl, "display_name": DISPLAY[case.key], "run": case.what,
               "images": case.n_images, "ms_per_image": _summary([s * 1e3 for s in secs]),
               "fw_nominal": case.fw_nominal, "fw_run": case.fw_run,
               "fw_measured": statistics.median(fws), "passes_counted": statistics.median(passes),
               "cpu_ms_per_image": _summary([c * 1e3 for c in cpus]),
               "ratio": _summary(ratios), "ratio_run": _summary(ratios_run),
               "ratio_cpu": _summary(ratios_cpu), "ratio_passes": _summary(ratios_passes),
               "peak_mib": mem.peak_mib if mem else None, **case.extra}
        if case.impl == "ours":
            out["target"] = {"limit": TARGET_RATIO, "met": out["ratio"]["median"] <= TARGET_RATIO}
        return out


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
        return Case(key, "ours", lambda: ex.explain(x), n,
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
        return Case(key, "ours", lambda: ex.explain(x), n,
                    f"{n} img, {n_masks}/{full} masks, fw batch {b.pb}", full, n_masks,
                    lambda p: ex.last_forward_passes, warm=lambda: warm.explain(x[:1]),
                    repeats=b.costly_repeats)
    ex = methods.create(key, bb)
    return Case(key, "ours", lambda: ex.explain(b.images), a.batch, f"{a.batch} img",
                ex.forward_passes, ex.forward_passes, lambda p: ex.last_forward_passes,
                repeats=a.repeats)


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
        return Case(key, "pytorch-grad-cam", lambda: cam(input_tensor=b.images, targets=None),
                    a.batch, f"{a.batch} img, full backward", 1, 1, lambda p: p,
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
    return Case(key, "pytorch-grad-cam", lambda: cam(input_tensor=x, targets=None), n,
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


class _MemoryDataset(list):
    """(image, label, id) items with the ``harness.data.ImageDataset`` attributes a shard uses."""

    info = {"kind": "imagenet"}

    def path_of(self, i: int) -> Path:
        return Path(f"/nonexistent/bench-{i}.png")       # no annotation: localisation is NaN


def bench_evaluation(b: Bench) -> dict:
    """Throughput of ``run_shard`` on an in-memory shard; ``evaluate_explainer`` if it fails."""
    import methods
    from . import evaluation
    from .protocol import PAPER, PAPER_FRACTIONS, Evaluator
    a, bb, x = b.args, b.backbone, b.images
    n = a.eval_images or 2 * a.batch
    floor = statistics.median(b.floor_samples)
    out: dict[str, Any] = {"method": a.eval_method, "images": n}

    def summary(secs: list[float], note: str) -> dict:
        return {"ms_per_image": _summary([s * 1e3 for s in secs]),
                "images_per_s": 1 / statistics.median(secs),
                "forwards_equivalent": statistics.median(secs) / floor, "note": note}

    dataset = _MemoryDataset([(x[i % len(x)].cpu(), 0, f"bench-{i}") for i in range(n)])
    try:
        with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp, \
                mock.patch.object(evaluation, "_load_dataset", lambda data: dataset), \
                mock.patch.object(evaluation, "_load_backbone", lambda *args: bb):
            def shard(i: int):
                job = evaluation.ShardJob(
                    shard=i, indices=tuple(range(n)), out_path=str(Path(tmp) / f"s{i}.parquet"),
                    backbone=bb.name, weights=a.weights, method=a.eval_method, variant=None,
                    params=(), checkpoint=None, data=(), fractions=tuple(PAPER_FRACTIONS),
                    preset=tuple(sorted(PAPER.as_dict().items())), batch_size=a.batch,
                    seed=a.seed, num_threads=a.threads, use_gpu=b.device.type == "cuda")
                return evaluation.run_shard(job)
            import pyarrow.parquet  # noqa: F401  (its first import is not a shard's cost)
            secs = [b.timed(lambda i=i: shard(i)) / n for i in range(b.costly_repeats)]
        out["run_shard"] = summary(secs, "harness.evaluation.run_shard on an in-memory shard "
                                         "(dataset and backbone loaders patched: data loading "
                                         "not timed); explain + AD/IC + Parquet write")
    except Exception as err:  # the evaluation module is edited by others: report, fall back
        out["run_shard"] = {"error": f"{type(err).__name__}: {err}"}
        ex, ev = methods.create(a.eval_method, bb), Evaluator(bb)
        secs = [b.timed(lambda: ev.evaluate_explainer(ex, x)) / len(x)
                for _ in range(b.costly_repeats)]
        out["evaluate_explainer"] = summary(secs, "run_shard failed: protocol.Evaluator."
                                                  "evaluate_explainer on one batch instead")
    finally:
        torch.set_num_threads(a.threads)
    return out


# -- driver, table, JSON ----------------------------------------------------------------------
def _environment(args) -> dict:
    from importlib import metadata
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           **{k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
              if k in os.environ}}
    for pkg in ("torch", "torchvision", "grad-cam"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not-installed"
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        env["git_commit"] = "unknown"
    return env


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def render(results: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table
    for name, r in results["backbones"].items():
        fl = r["floor"]["ms_per_image"]
        t = Table(title=f"{name}: plain forward {fl['median']:.1f} ms/img "
                        f"[{fl['min']:.1f}-{fl['max']:.1f}] (batch {results['config']['batch']}, "
                        f"{results['config']['threads']} threads, {results['config']['device']})",
                  title_justify="left")
        for col in ("method", "impl", "run", "ms/img med [min-max]", "#FW nom/run/meas",
                    "passes", "x(FWmeas*fwd) med [min-max]", "x(FWrun*fwd)", "x(passes*fwd)",
                    "x cpu", "peak MiB", "target"):
            t.add_column(col, overflow="fold")
        for key, m in r["methods"].items():
            if "error" in m:
                t.add_row(m["display_name"], "", f"[red]error: {escape(m['error'])}[/red]")
                continue
            ms, ra = m["ms_per_image"], m["ratio"]
            target = ("-" if "target" not in m else
                      ("met" if m["target"]["met"] else "[red]MISSED[/red]") + f" <={TARGET_RATIO}")
            t.add_row(m["display_name"], m["impl"], m["run"],
                      f"{ms['median']:.1f} [{ms['min']:.1f}-{ms['max']:.1f}]",
                      f"{m['fw_nominal']:g}/{m['fw_run']:g}/{m['fw_measured']:g}",
                      f"{m['passes_counted']:g}",
                      f"{ra['median']:.2f} [{ra['min']:.2f}-{ra['max']:.2f}]",
                      f"{m['ratio_run']['median']:.2f}", f"{m['ratio_passes']['median']:.2f}",
                      f"{m['ratio_cpu']['median']:.2f}",
                      "-" if m["peak_mib"] is None else f"{m['peak_mib']:.0f}", target)
        console.print(t)
        if "rise_memory" in r:
            rm = r["rise_memory"]
            console.print(f"  RISE peak MiB by masks run {rm['masks_to_peak_mib']} at batch "
                          f"{rm['batch_size']}: {'bounded' if rm['bounded'] else 'GROWS with N'}")
        if "train" in r:
            tr = r["train"]
            console.print("  training: " + "; ".join(
                f"{k} {v['images_per_s']:.1f} img/s ({v['ratio_to_head_only_step']:.2f}x head-only "
                f"step, {v['ratio_to_forward']:.2f}x forward)" for k, v in tr.items() if k != "baseline"))
        if "eval" in r:
            ev = r["eval"]
            parts = [f"{k} {v['images_per_s']:.1f} img/s ({v['forwards_equivalent']:.2f} forwards/img)"
                     for k, v in ev.items() if isinstance(v, dict) and "images_per_s" in v]
            errs = [f"{k}: {v['error']}" for k, v in ev.items() if isinstance(v, dict) and "error" in v]
            console.print(f"  evaluation ({ev['method']}, {ev['images']} img shard): "
                          + "; ".join(parts + errs))


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when it ran (targets missed are reported, not failed), 2 on usage."""
    from .terminal import make_console
    import backbones
    import methods
    console = make_console()
    err = make_console(stderr=True)
    unknown = [m for m in args.methods if m not in OURS + LIBRARY]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from "
              f"{', '.join(OURS + LIBRARY)}", file=sys.stderr)
        return 2
    bad_bb = [n for n in args.backbones if n not in backbones.names()]
    if bad_bb:
        print(f"error: unknown backbone(s) {', '.join(bad_bb)}; available: "
              f"{', '.join(backbones.names())}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    small = [f"--{k.replace('_', '-')}" for k in ("size", "batch", "threads", "repeats",
                                                 "rise_images", "scorecam_images")
             if getattr(args, k) < 1]
    small += [f"--{k.replace('_', '-')}" for k in ("perturbation_batch", "costly_repeats",
                                                  "rise_masks", "scorecam_channels", "eval_images")
              if getattr(args, k) is not None and getattr(args, k) < 1]
    if small or args.warmup < 0:
        print(f"error: {', '.join(small or ['--warmup'])} must be positive", file=sys.stderr)
        return 2
    if args.eval_method not in methods.names():
        print(f"error: --eval-method {args.eval_method!r} is not a method", file=sys.stderr)
        return 2
    if any(m.startswith("pgc_") for m in args.methods):
        try:
            import pytorch_grad_cam  # noqa: F401
        except ImportError:
            err.print("pytorch-grad-cam (grad-cam) is not installed: its methods are skipped")
            args.methods = [m for m in args.methods if not m.startswith("pgc_")]
    threads_before = torch.get_num_threads()
    try:
        return _run(args, console, err)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, console, err) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flush = torch.set_flush_denormal(not args.keep_denormals) and not args.keep_denormals
    dev = torch.device(args.device)
    results: dict[str, Any] = {
        "schema": "lcam-bench/bench/1", "argv": sys.argv,
        "config": {k: v for k, v in vars(args).items() if not callable(v)},
        "environment": _environment(args), "loadavg_start": os.getloadavg(),
        "memory_method": memory_method(dev), "flush_denormal": flush,
        "timing_method": ("median and min-max over repetitions after warm-up, perf_counter, "
                          "torch.cuda.synchronize on GPU; ratios use the floor measured just "
                          "before and after each repetition"),
        "backbones": {}, "targets": []}
    started = time.perf_counter()
    for name in args.backbones:
        b = Bench(args, name)
        for _ in range(max(args.warmup, 1)):
            b.floor_once()
        b.floor_samples.clear()
        b.floor_cpu.clear()
        for _ in range(max(args.repeats, 1)):
            b.floor_once()
        r: dict[str, Any] = {"methods": {}}
        for key in args.methods:
            err.log(f"{name}: {key}")
            close = None
            try:
                case = our_case(b, key) if key in OURS else library_case(b, key)
                close = case.extra.pop("close", None)
                r["methods"][key] = b.measure(case)
            except Exception as exc:  # e.g. the library under --autocast on CPU (no bf16 numpy)
                r["methods"][key] = {"display_name": DISPLAY[key], "error": f"{type(exc).__name__}: {exc}"}
                err.print(f"{name}: {key} failed: {type(exc).__name__}: {exc}")
            finally:
                if close:
                    close()
        r["floor"] = {"ms_per_image": _summary([s * 1e3 for s in b.floor_samples]),
                      "cpu_ms_per_image": _summary([s * 1e3 for s in b.floor_cpu]),
                      "batch": args.batch, "samples": "all plain forwards taken during the run"}
        if "rise" in args.methods:
            err.log(f"{name}: RISE memory probe")
            r["rise_memory"] = rise_memory_probe(b)
        if not args.no_train:
            err.log(f"{name}: L-CAM training throughput")
            r["train"] = bench_training(b)
        if not args.no_eval:
            err.log(f"{name}: evaluation throughput")
            r["eval"] = bench_evaluation(b)
        b.counter.close()
        for key, m in r["methods"].items():
            if "target" in m:
                results["targets"].append({"backbone": name, "method": key,
                                           "ratio": m["ratio"]["median"], **m["target"]})
        if "rise_memory" in r:
            results["targets"].append({"backbone": name, "method": "rise",
                                       "quantity": "peak memory bounded by batch, not N",
                                       "met": r["rise_memory"]["bounded"]})
        results["backbones"][name] = r
    results["wall_seconds"] = time.perf_counter() - started
    results["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    write_json_atomic(results, out)
    render(results, console)
    missed = [f"{t['backbone']}/{t['method']}" for t in results["targets"] if not t["met"]]
    console.print(f"targets: {len(results['targets']) - len(missed)}/{len(results['targets'])} met"
                  + (f"; missed: {', '.join(missed)}" if missed else ""))
    console.print(f"wrote {out} in {results['wall_seconds']:.0f} s (load average "
                  f"{results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f})")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
