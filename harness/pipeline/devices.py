"""The device of a Ray task or worker, set up the same way everywhere it computes.

Shards, analysis tasks, Ray Train workers and Tune trials call ``task_device`` and then
``set_precision``:

- a task that asked Ray for a GPU runs on CUDA or fails: ``DeviceMissing`` names the node
  and the request (a silent CPU fallback would write CPU numbers and CPU timings as GPU ones);
- float32 everywhere unless the spec asks: TF32 (10-bit mantissa matmuls and convolutions,
  on by default for cuDNN on recent GPUs) is switched off, because IC counts a strict
  ``O > Y`` and small differences flip images; ``tf32: true`` turns it on;
- ``deterministic: true`` asks torch for deterministic algorithms (and cuBLAS for a fixed
  workspace), so that a resumed head fit equals an unbroken one on GPU too; it is slower,
  and operations without a deterministic CUDA kernel raise (the harness avoids them there:
  ``methods.lcam`` upsamples its training maps with a matrix product in that mode);
- a task with a fractional GPU share (``sharding.gpus_per_task: 0.25``) limits its CUDA
  caching allocator to that share of the GPU's memory, so co-located tasks do not starve
  each other; an out-of-memory error then halves the batch (``harness.pipeline.shards``).

``describe(device)`` is what rows, shard identities and MLflow tags record: ``cpu`` or
``cuda:<GPU model>``.
"""
from __future__ import annotations

import os
import socket

import torch


class DeviceMissing(Exception):
    """A GPU was asked for, but CUDA is not available where the task runs (not retried:
    another try on the same node cannot succeed)."""


def cuda_view() -> dict:
    """What torch sees of CUDA in this process: ``available``, ``count`` (devices),
    ``torch`` and ``cuda`` (the build's CUDA version, None for a CPU build)."""
    available = torch.cuda.is_available()
    return {"available": available, "count": torch.cuda.device_count() if available else 0,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def task_device(gpus: float, what: str) -> torch.device:
    """``cuda`` when ``gpus`` > 0 (and CUDA is there: else ``DeviceMissing``), else ``cpu``."""
    if gpus <= 0:
        return torch.device("cpu")
    if not cuda_view()["available"]:
        raise DeviceMissing(f"{what} asked for {gpus:g} GPU, but CUDA is not available in its "
                            f"Ray worker on node {socket.gethostname()} (torch "
                            f"{torch.__version__}, CUDA build: {torch.version.cuda}): install "
                            "a CUDA build of torch there, or ask for no GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    if 0 < gpus < 1:
        torch.cuda.set_per_process_memory_fraction(gpus, device)
    return device


def set_precision(device: torch.device, tf32: bool = False, deterministic: bool = False) -> None:
    """Full float32 unless ``tf32``; torch's deterministic algorithms when ``deterministic``."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)


def describe(device: torch.device | str) -> str:
    """``cpu``, or ``cuda:<GPU model>`` (what a result's rows and tags record)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda:{torch.cuda.get_device_name(device)}"


def precision_name(autocast: bool, tf32: bool, device_type: str) -> str:
    """The arithmetic of an explanation's backbone passes: float32, tf32, bf16 or fp16."""
    if autocast:
        return "fp16" if device_type == "cuda" else "bf16"
    return "tf32" if tf32 and device_type == "cuda" else "float32"
