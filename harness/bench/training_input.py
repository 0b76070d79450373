"""``python -m harness bench --training-input``: the head training's input on this machine's CPUs.

The same measurement as the GPU check's ``training_input`` section
(``harness.bench.gpu_check.training_input``: ``ImageSet(..., train=True).build()``, the
train transform, a ``DistributedSampler``, ``heads.loader_options``, loader processes
started afresh as in every epoch), on the CPU, over ``--training-input-images`` generated
ImageNet-sized JPEGs (375 x 500, cropped to ``--size``), at each number of loader processes
of ``--training-input-workers`` (0: decoded in the training process itself, i.e. one CPU;
N: N processes, i.e. ``train.loader_workers: N`` on N spare CPUs). All settings are measured
side by side in one process, so their ratios hold on a noisy machine; the absolute images
per second are this machine's at that moment."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch


class CpuSettings:
    """The few sizes ``gpu_check.training_input`` reads, for the CPU."""

    def __init__(self, args: argparse.Namespace):
        self.dry = True
        self.device = torch.device("cpu")
        self.size = args.size
        self.batch = args.batch
        self.jpegs = args.training_input_images
        self.jpeg_size = (375, 500)
        self.loader_workers = tuple(args.training_input_workers)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Images per second at each number of loader processes (``gpu_check.training_input``)."""
    from harness.bench import gpu_check
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lcam-training-input-") as work:
        out = gpu_check.training_input(CpuSettings(args), Path(work))
    out["threads"] = args.threads
    return out


def table(results: dict[str, Any]):
    """A rich table: one row per number of loader processes, the ratio to the first row."""
    from rich.table import Table
    t = Table(title=f"training input: {results['images']} JPEGs "
                    f"{results['image_size'][0]}x{results['image_size'][1]}, batch "
                    f"{results['batch']}")
    for col in ("loader processes", "images/s", "x first row", "first batch (s)",
                "images/s after the first batch"):
        t.add_column(col, justify="right")
    rows = results["workers"]
    base = next(iter(rows.values()))["images_per_s"]
    for workers, r in rows.items():
        steady = r["images_per_s_after_first"]
        t.add_row(workers, f"{r['images_per_s']:.1f}", f"{r['images_per_s'] / base:.2f}x",
                  f"{r['first_batch_s']:.2f}", "-" if steady is None else f"{steady:.1f}")
    return t
