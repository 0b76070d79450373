"""A stand-in for CUDA in the Ray workers of ``test_gpu_scheduling.py`` (test code only).

Ray accepts declared GPUs on a machine without one (``num_gpus=2``) and schedules GPU shares,
GPU actors and GPU placement groups as on a GPU machine: only the CUDA device is missing.
``install`` (Ray's ``worker_process_setup_hook``, run in every worker process at start)
replaces the harness's device functions there: where the harness would take the CUDA device
of a GPU share, the stand-in checks that Ray assigned the process a GPU (``ray.get_gpu_ids``),
writes what it saw to ``$GPU_STAND_IN_LOG/<pid>.jsonl`` and computes on the CPU; the CUDA
probe of ``harness.pipeline.cluster.check_gpus`` sees a device. Everything else (the options,
actors, placement groups, shares, retries) is the product's own.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _log(entry: dict) -> None:
    folder = os.environ.get("GPU_STAND_IN_LOG")
    if folder:
        with open(Path(folder) / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({**entry, "pid": os.getpid(), "time": time.time()}) + "\n")


def _assigned(what: str, share: float):
    import ray
    import torch
    ids = [str(g) for g in ray.get_gpu_ids()]
    if not ids:
        raise RuntimeError(f"stand-in: {what} asked for {share:g} GPU but Ray assigned none")
    _log({"what": what, "share": share, "gpu_ids": ids,
          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    return torch.device("cpu")


def install() -> None:
    from harness.pipeline import devices, heads
    real = devices.task_device

    def task_device(gpus: float, what: str):
        return real(gpus, what) if gpus <= 0 else _assigned(what, gpus)

    devices.task_device = task_device
    devices.cuda_view = lambda: {"available": True, "count": 1, "torch": "stand-in",
                                 "cuda": "stand-in"}
    heads.train_device = lambda group: (_assigned(f"train {group.backbone}", 1.0)
                                        if group.use_gpu else real(0, "train"))


def real_cuda_of_node() -> dict:
    """``harness.pipeline.cluster._cuda_of_node`` reading torch itself, not the stand-in."""
    import socket

    import ray
    import torch
    return {"available": torch.cuda.is_available(), "count": 0, "torch": torch.__version__,
            "cuda": torch.version.cuda, "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id()}
