"""Timing machinery of ``python -m harness bench``: how one entry is measured.

Device sync, the wall/CPU timer, peak memory (``PeakMemory``), the backbone pass counter,
median and min-max summaries, and ``Bench``: one backbone's model and image batch, its
plain-forward floor samples and ``Bench.measure``, which warms a ``Case`` up and times its
repetitions, each between two floor samples. What is measured is in ``harness.bench.cases``;
the command, table and JSON in ``harness.bench.driver``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

TARGET_RATIO = 1.1


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
    display_name: str                  # the method's name in the table
    run: Callable[[], Any]
    n_images: int
    what: str                          # what was run, for the table
    fw_nominal: float                  # docs/protocol.md's #FW at the paper setting
    fw_run: float                      # nominal #FW of what actually ran
    fw_measured: Callable[[int], float]  # from the pass count per image -> measured #FW
    warm: Callable[[], Any] | None = None  # reduced warm-up (None: ``run`` itself)
    repeats: int = 1
    context: Callable[[], Any] = contextlib.nullcontext
    extra: dict = field(default_factory=dict)


class Bench:
    """Everything shared by the cases of one backbone."""

    def __init__(self, args: argparse.Namespace, name: str):
        from harness.data.models import load_backbone
        self.args, self.name = args, name
        self.device = torch.device(args.device)
        bb = load_backbone(name, weights=args.weights).to(self.device)
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
        out = {"impl": case.impl, "display_name": case.display_name, "run": case.what,
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
