"""``python -m harness gpu-check``: the GPU paths of the harness, checked in about five minutes.

Needs no data and no download (random-init networks, a few generated images). On a machine
with CUDA it checks, and writes to a JSON file and a table:

1. **parity**: every method on a random-init ResNet-50 (224 x 224), maps on the GPU against
   the CPU's, float32 with TF32 off (Spearman >= 0.999 per image is the target); then with
   TF32 on and under autocast (reported, no target); seconds per image and peak GPU memory
   of each method;
2. **collectives**: a single-process NCCL group running the real head-training epoch
   (``harness.pipeline.heads``), whose loss sums are all-reduced on the device;
3. **Ray**: a local Ray with the GPU: the real ``fit_heads`` for two epochs, then again
   (resumed: nothing retrained), eight real shard tasks at 0.25 GPU each (their process ids,
   devices, peak memory and how many ran at once), and the two refusals a user must see: a
   request for more GPUs than the cluster has (``ResourcesRefused``, before anything starts)
   and a GPU task in a worker without CUDA (``DeviceMissing``).

``--dry`` runs the same code on the CPU with small inputs (gloo instead of NCCL, CPU shares
instead of GPU shares, the GPU refusals on a CPU-only Ray): what the test suite runs, so the
script stays working where no GPU is lent.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from harness.data.cache import write_text_atomic

METHODS = ("gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img")


class Settings:
    """Sizes of the check: full on CUDA, small with ``--dry`` (CPU)."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.backbone = "tiny_resnet" if dry else "resnet50"
        self.size = 64 if dry else 224
        self.images = 2 if dry else 4
        self.rise_masks = 64 if dry else 2000
        self.train_images = 16 if dry else 64


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps (average ranks are not needed: float maps)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@contextmanager
def _precision(tf32: bool):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _explain(name: str, bb, images: torch.Tensor, s: Settings, autocast: bool = False):
    """(maps on CPU, seconds per image, peak MiB) of method ``name`` on ``bb``'s device."""
    import methods
    params = {"n_masks": s.rise_masks} if name == "rise" else {}
    seen = bb.with_autocast(torch.float16 if bb.device.type == "cuda" else torch.bfloat16) \
        if autocast else bb
    torch.manual_seed(0)              # the same fresh L-CAM head on every device
    ex = methods.create(name, seen, **params)
    x = images.to(bb.device)
    ex.explain(x[:1])                                        # warm-up
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    maps = ex.explain(x)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if bb.device.type == "cuda" else None
    return maps.cpu(), (time.perf_counter() - start) / len(x), peak


def parity(s: Settings) -> dict[str, Any]:
    """Maps on the device against the CPU's, per method (see the module docstring)."""
    import backbones
    torch.manual_seed(0)
    images = torch.rand(s.images, 3, s.size, s.size)
    cpu = backbones.load(s.backbone, weights=None, seed=0)
    dev = backbones.load(s.backbone, weights=None, seed=0).to(s.device)
    out = {}
    for name in METHODS:
        ref, cpu_s, _ = _explain(name, cpu, images, s)
        with _precision(False):
            maps, sec, peak = _explain(name, dev, images, s)
        with _precision(True):
            tf32, _, _ = _explain(name, dev, images, s)
            low, low_s, _ = _explain(name, dev, images, s, autocast=True)
        out[name] = {
            "spearman_float32": min(spearman(a, b) for a, b in zip(ref, maps)),
            "spearman_tf32": min(spearman(a, b) for a, b in zip(ref, tf32)),
            "spearman_autocast": min(spearman(a, b) for a, b in zip(ref, low)),
            "seconds_per_image": sec, "seconds_per_image_autocast": low_s,
            "seconds_per_image_cpu": cpu_s, "peak_mib": peak}
        out[name]["met"] = out[name]["spearman_float32"] >= 0.999
    return out


def collectives(s: Settings) -> dict[str, Any]:
    """One real head-training epoch in a one-process group (NCCL on CUDA, gloo with --dry)."""
    import torch.distributed as dist

    from harness.data.models import load_backbone
    from harness.pipeline.heads import _Heads
    from harness.pipeline.plan import HeadGroup, HeadPlan, ImageSet
    from methods.lcam_train import TrainConfig
    backend = "gloo" if s.dry else "nccl"
    port = _free_port()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        bb = load_backbone(s.backbone, weights=None).to(s.device)
        group = HeadGroup(backbone=s.backbone, weights=None,
                          images=ImageSet("imagenet", "train", (s.size, s.size)), batch_size=4,
                          workers=1, use_gpu=not s.dry, num_threads=1,
                          heads=(HeadPlan("lcam_fm", TrainConfig(mode="fm", epochs=1)),))
        trainer = _Heads(group, bb, s.device, world=1)
        batches = [(torch.rand(4, 3, s.size, s.size), torch.zeros(4, dtype=torch.long))] * 2
        per_head = trainer.train_epoch(batches, 0)
        return {"backend": backend, "loss": per_head["lcam_fm"]["loss"], "met": True}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images_folder(root: Path, n: int, size: int) -> Path:
    """``n`` random PNG images in an ImageNet-style folder (train/ and val/, two classes)."""
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for i in range(n):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def ray_checks(s: Settings, workdir: Path) -> dict[str, Any]:
    """fit_heads with resume, eight shard tasks at a quarter device, the two refusals."""
    import ray
    ray.init(address="local", num_cpus=4 if s.dry else None, include_dashboard=False,
             log_to_driver=False)
    try:
        return {"fit_heads": _fit_twice(s, workdir), "shards": _quarter_shards(s, workdir),
                "refusals": _refusals(s)}
    finally:
        ray.shutdown()


def _fit_twice(s: Settings, workdir: Path) -> dict[str, Any]:
    from harness.data.storage import Storage
    from harness.pipeline.heads import fit_heads
    from harness.pipeline.plan import HeadGroup, HeadPlan, ImageSet
    from methods.lcam_train import TrainConfig
    root = _images_folder(workdir / "images", s.train_images, s.size)
    group = HeadGroup(backbone=s.backbone, weights=None,
                      images=ImageSet("imagenet", "train", (s.size, s.size), root=str(root),
                                      train=True),
                      batch_size=8, workers=1, use_gpu=not s.dry, num_threads=1,
                      heads=(HeadPlan("lcam_fm", TrainConfig(mode="fm", epochs=2)),))
    times = []
    for _ in range(2):                         # the second fit resumes the finished one
        start = time.perf_counter()
        states = fit_heads(group, name="gpu-check", seed=0, storage=Storage(workdir / "ray"))
        times.append(time.perf_counter() - start)
    return {"seconds": times, "heads": sorted(states["heads"]), "met": times[1] < times[0]}


def _quarter_shards(s: Settings, workdir: Path) -> dict[str, Any]:
    import ray
    share = {"num_cpus": 0.25} if s.dry else {"num_cpus": 0.25, "num_gpus": 0.25}

    @ray.remote(**share)
    def probe(i: int) -> dict:
        start = time.time()
        from harness.pipeline import devices
        device = devices.task_device(0 if s.dry else 0.25, f"probe {i}")
        x = torch.rand(64, 3, s.size, s.size, device=device)
        import backbones
        bb = backbones.load(s.backbone, weights=None).to(device)
        with torch.no_grad():
            for _ in range(3):
                bb(x)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        return {"pid": os.getpid(), "device": devices.describe(device), "peak_mib": peak,
                "start": start, "end": time.time()}

    found = ray.get([probe.remote(i) for i in range(8)])
    events = sorted([(f["start"], 1) for f in found] + [(f["end"], -1) for f in found])
    running, overlap = 0, 0
    for _, step in events:
        running += step
        overlap = max(overlap, running)
    return {"tasks": found, "max_at_once": overlap, "met": overlap > 1}


def _refusals(s: Settings) -> dict[str, Any]:
    import ray

    from harness.pipeline import resources
    from harness.pipeline.devices import DeviceMissing
    gpus = ray.cluster_resources().get("GPU", 0)
    try:
        resources.check([resources.Demand("a test request", "sharding.gpus_per_task", 1,
                                          gpus + 1)])
        too_many = "not refused"
    except resources.ResourcesRefused as err:
        too_many = str(err)

    @ray.remote(num_cpus=0.25, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": ""}})
    def without_cuda() -> str:
        from harness.pipeline import devices
        try:
            devices.task_device(1, "a task that asked for a GPU")
            return "not refused"
        except DeviceMissing as err:
            return str(err)

    missing = ray.get(without_cuda.remote())
    return {"too_many_gpus": too_many, "missing_cuda": missing,
            "met": "not refused" not in (too_many, missing)}


def run(dry: bool, out: Path) -> dict[str, Any]:
    """All checks; the results as a dict, also written to ``out`` (JSON)."""
    from harness.pipeline import ray_runtime
    ray_runtime.prepare_environment(None)        # before anything imports ray
    s = Settings(dry)
    if not dry and not torch.cuda.is_available():
        from harness.errors import UserError
        raise UserError("no CUDA device here: run the GPU check on a GPU machine, or add --dry")
    started = time.perf_counter()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "dry": dry,
                               "device": torch.cuda.get_device_name() if not dry else "cpu",
                               "torch": torch.__version__}
    results["parity"] = parity(s)
    results["collectives"] = collectives(s)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        results["ray"] = ray_checks(s, Path(tmp))
    results["seconds"] = time.perf_counter() - started
    write_text_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
    return results
