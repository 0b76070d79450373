"""``python -m harness gpu-check``: the GPU paths of the harness, measured in about five minutes.

Runs from the project folder with no install and no Ray (``python3 -m harness gpu-check``:
torch, torchvision, numpy, pyarrow, rich, filelock, pyyaml, pillow and pydantic are all it
imports; pydantic's wheels, 2.6 MB, travel with the tree where it is missing: README "GPU
check"),
needs no data and no download (random-init networks, generated images). On CUDA it
measures, writes to a JSON file and prints as a table per section:

1. **parity**: every method on a random-init ResNet-50 (224 x 224), maps on the GPU against
   the CPU's, float32 with TF32 off (Spearman >= 0.999 per image is the target); then with
   TF32 on and under autocast (reported); seconds per image and peak GPU memory;
2. **busy**: the share of a long-lived evaluation worker's time that the GPU computes, for
   the one-pass methods (Grad-CAM, Grad-CAM++, L-CAM-Fm, L-CAM-Img) on ResNet-50 through the
   real shard code: ``harness.pipeline.workers.ShardWorker`` run in this process (a plain
   object, no Ray), fed one warm-up shard (it loads the backbone and builds the explainer;
   reported apart) then 4 shards of 64 images (batch 64) of a prepared set of generated
   JPEGs (``harness.data.prepared``). Busy is the shard's own explain + score seconds (its
   stage clock, ``harness.pipeline.shards._Clock``, which synchronises CUDA around each
   stage; "score" includes the per-image localisation columns) over the shard's wall time
   (target >= 0.9). The L-CAM heads are fresh random ones (no head file: the same compute);
3. **masked forwards**: RISE's (4000 masks) and Score-CAM's masked images through the
   backbone per second of the whole explanation, in float32 with TF32 off, under autocast
   (float16; bfloat16 on CPU), in channels_last and in both, each with its maps' minimum
   Spearman against float32's;
4. **four heads**: the four-head training step (L-CAM-Fm, L-CAM-Img and their CE-only
   versions, lambda1 = lambda2 = 0, on the same batches: ``harness.pipeline.heads._Heads``)
   in a one-process NCCL group: steps and images per second over 20 steps of 64 images
   already on the device (after a warm-up step), every loss finite;
5. **training input**: the head training's DataLoader (2048 generated 375 x 500 JPEGs in an
   ImageNet-style folder, the data set and train transform of ``ImageSet(train=True)``,
   ``loader_options``, copied to the device) in images per second at 4, 8 and 16 loader
   processes, their start included (as every epoch pays it) and after the first batch.

The sections run cheapest first (parity, whose CPU reference is the longest part, last)
and the JSON file is rewritten after each one, so a machine lent for minutes keeps what
finished; ``--only SECTION ...`` reruns some. A section that raises records its error (and
the traceback's end) and the others still run; the command then exits 1, as it does when
a target is missed.

``--ray`` adds the Ray part (a real ``fit_heads`` and its resume, quarter-share workers, the
refusals); it needs ``ray[train]``, whose wheel (about 75 MiB) is more than a GPU machine
without a package registry can be given here: the scheduling it would check runs on CPU in
the test suite with declared GPUs (``tests/pipeline/test_gpu_scheduling.py``).

``--dry`` runs the same code on the CPU with small inputs (the test suite runs it, with Ray
and MLflow made unimportable), so the script stays working where no GPU is lent;
it reports the numbers but no busy target (CPU numbers say nothing of a GPU's).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from harness.data.cache import write_text_atomic

METHODS = ("gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img")
ONE_PASS = ("gradcam", "gradcampp", "lcam_fm", "lcam_img")
MASKED = ("rise", "scorecam")
BUSY_TARGET = 0.9
PARITY_TARGET = 0.999
#: the sections, in the order they run (``ray`` only with ``--ray``)
SECTIONS = ("busy", "masked", "four_heads", "training_input", "parity", "ray")


class Settings:
    """Sizes of the check: full on CUDA, small with ``--dry`` (CPU)."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.backbone = "tiny_resnet" if dry else "resnet50"
        self.size = 32 if dry else 224
        self.images = 2 if dry else 4                 # parity, masked: images explained
        self.rise_masks = 16 if dry else 2000         # parity: RISE's masks
        self.train_images = 16 if dry else 64         # --ray: fit_heads' images
        self.shard_images = 4 if dry else 64          # busy: images per shard (= batch)
        self.shards = 2 if dry else 4                 # busy: shards measured (after a warm-up)
        self.masked_rise = 32 if dry else 4000        # masked forwards: RISE's masks
        self.steps = 2 if dry else 20                 # four heads: training steps
        self.batch = 4 if dry else 64                 # four heads, training input: batch
        self.jpegs = 8 if dry else 2048               # training input: generated JPEGs
        self.jpeg_size = (40, 48) if dry else (375, 500)
        self.loader_workers = (0, 2) if dry else (4, 8, 16)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps (average ranks are not needed: float maps)."""
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def _min_spearman(ref: torch.Tensor, maps: torch.Tensor) -> float:
    return min(spearman(a, b) for a, b in zip(ref, maps))


@contextmanager
def _precision(tf32: bool):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _explain(name: str, bb, images: torch.Tensor, s: Settings, autocast: bool = False,
             channels_last: bool = False, params: dict | None = None) -> dict[str, Any]:
    """Method ``name`` on ``bb``'s device: ``maps`` (on the CPU), ``seconds`` per image,
    ``peak_mib`` (CUDA) and ``forward_passes`` per image. ``channels_last``: ``bb`` is
    already in that memory format, the images are put in it too. On CUDA one image is
    explained first (warm-up: kernels, cuDNN's choices, the allocator)."""
    import methods
    if params is None:
        params = {"n_masks": s.rise_masks} if name == "rise" else {}
    cuda = bb.device.type == "cuda"
    seen = bb.with_autocast(torch.float16 if cuda else torch.bfloat16) if autocast else bb
    torch.manual_seed(0)              # the same fresh L-CAM head on every device
    ex = methods.create(name, seen, **params)
    x = images.to(bb.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cuda:
        ex.explain(x[:1])                                    # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    maps = ex.explain(x)
    _sync(bb.device)
    seconds = (time.perf_counter() - start) / len(x)
    return {"maps": maps.cpu(), "seconds": seconds, "forward_passes": ex.last_forward_passes,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def parity(s: Settings) -> dict[str, Any]:
    """Maps on the device against the CPU's, per method (see the module docstring)."""
    import backbones
    torch.manual_seed(0)
    images = torch.rand(s.images, 3, s.size, s.size)
    cpu = backbones.load(s.backbone, weights=None, seed=0)
    dev = backbones.load(s.backbone, weights=None, seed=0).to(s.device)
    out = {}
    for name in METHODS:
        ref = _explain(name, cpu, images, s)
        with _precision(False):
            f32 = _explain(name, dev, images, s)
        with _precision(True):
            tf32 = _explain(name, dev, images, s)
            low = _explain(name, dev, images, s, autocast=True)
        out[name] = {
            "spearman_float32": _min_spearman(ref["maps"], f32["maps"]),
            "spearman_tf32": _min_spearman(ref["maps"], tf32["maps"]),
            "spearman_autocast": _min_spearman(ref["maps"], low["maps"]),
            "seconds_per_image": f32["seconds"], "seconds_per_image_autocast": low["seconds"],
            "seconds_per_image_cpu": ref["seconds"], "peak_mib": f32["peak_mib"]}
        out[name]["met"] = out[name]["spearman_float32"] >= PARITY_TARGET
    return out


@contextmanager
def _cache_in(folder: Path):
    """``HARNESS_CACHE_DIR`` set to ``folder`` (the shards read their prepared set from the
    node's cache), restored afterwards."""
    from harness.data.cache import CACHE_ENV
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old


def _timed_shard(worker, job, device: torch.device) -> tuple[float, dict[str, float]]:
    """(wall seconds, the shard's own stage seconds) of one job run by ``worker``."""
    _sync(device)
    start = time.perf_counter()
    out = worker.run_shard(job)
    _sync(device)
    return time.perf_counter() - start, out["summary"]["seconds"]


def busy(s: Settings, workdir: Path) -> dict[str, Any]:
    """The share of a long-lived worker's wall time spent explaining and scoring, per
    one-pass method: ``ShardWorker.run_shard`` in this process over a prepared set of
    generated JPEGs, one warm-up shard then ``s.shards`` shards (see the module docstring)."""
    import methods
    from harness.data.cache import cache_dir
    from harness.data.models import load_backbone
    from harness.data.prepared import prepare, ref_of
    from harness.metrics.protocol import PAPER, PAPER_FRACTIONS
    from harness.pipeline.plan import Cell, EvaluationPlan, ImageSet
    from harness.pipeline.shards import ShardJob
    from harness.pipeline.workers import ShardWorker
    per = s.shard_images
    root = _images_folder(workdir / "busy-images", s.shards * per, s.jpeg_size, ("val",),
                          ".jpg", classes=1)
    out: dict[str, Any] = {}
    with _cache_in(workdir / "busy-cache"):
        images = ImageSet("folder", "val", (s.size, s.size), root=str(root))
        ref = ref_of(prepare(images, images.build(), cache_dir()), ship=False)
        weights_id = load_backbone(s.backbone, weights=None).weights_id
        ev = EvaluationPlan(fractions=tuple(PAPER_FRACTIONS), preset=PAPER, batch_size=per,
                            overlays=0, autocast=False, channels_last=False,
                            images_per_task=per, cpus_per_task=torch.get_num_threads(),
                            gpus_per_task=0 if s.dry else 1, max_retries=0)
        worker = ShardWorker()
        for name in ONE_PASS:
            cls = methods.method_class(name)
            cell = Cell(backbone=s.backbone, weights=None, method=name, method_id=name,
                        display_name=cls.display_name, variant=cls.variants[0], params={},
                        row=1, family=cls.family, forward_passes=1)
            jobs = [ShardJob(cell=cell, images=images, prepared=ref, weights_id=weights_id,
                             evaluation=ev, head=None, seed=0, shard=i,
                             indices=tuple(range(i * per, (i + 1) * per)))
                    for i in range(s.shards)]
            first, _ = _timed_shard(worker, jobs[0], s.device)     # builds the explainer
            walls, stages = [], {}
            for job in jobs:
                wall, seconds = _timed_shard(worker, job, s.device)
                walls.append(wall)
                for stage, sec in seconds.items():
                    stages[stage] = stages.get(stage, 0.0) + sec
            compute = stages.get("explain", 0.0) + stages.get("score", 0.0)
            share = compute / sum(walls)
            out[name] = {"busy": share, "target": BUSY_TARGET,
                         "met": share >= BUSY_TARGET if s.device.type == "cuda" else None,
                         "shards": len(jobs), "images_per_shard": per,
                         "first_shard_s": first, "wall_s_per_shard": sum(walls) / len(walls),
                         "images_per_s": len(jobs) * per / sum(walls),
                         "stage_s_per_shard": {k: v / len(jobs) for k, v in stages.items()}}
    return out


def masked(s: Settings) -> dict[str, Any]:
    """RISE's and Score-CAM's masked forwards per second (images through the backbone per
    second of the whole explanation) in float32 with TF32 off, under autocast, in
    channels_last and both together, each with its maps' parity against float32's."""
    import backbones
    torch.manual_seed(0)
    images = torch.rand(s.images, 3, s.size, s.size)
    plain = backbones.load(s.backbone, weights=None, seed=0).to(s.device)
    nhwc = backbones.load(s.backbone, weights=None, seed=0).to(s.device) \
        .to(memory_format=torch.channels_last)
    modes = {"float32": (plain, False, False), "autocast": (plain, True, False),
             "channels_last": (nhwc, False, True), "autocast_channels_last": (nhwc, True, True)}
    out: dict[str, Any] = {}
    for name in MASKED:
        params = {"n_masks": s.masked_rise} if name == "rise" else {}
        found: dict[str, Any] = {}
        ref = None
        with _precision(False):
            for mode, (bb, autocast, cl) in modes.items():
                r = _explain(name, bb, images, s, autocast=autocast, channels_last=cl,
                             params=params)
                ref = r["maps"] if ref is None else ref
                found[mode] = {"masked_per_s": r["forward_passes"] / r["seconds"],
                               "forwards_per_image": r["forward_passes"],
                               "seconds_per_image": r["seconds"], "peak_mib": r["peak_mib"],
                               "spearman_vs_float32": _min_spearman(ref, r["maps"])}
        out[name] = found
    return out


def four_heads(s: Settings) -> dict[str, Any]:
    """The four-head training step in a one-process group (NCCL on CUDA, gloo with --dry):
    ``_Heads.train_epoch`` over ``s.steps`` batches of ``s.batch`` images, after one warm-up
    step; every head's loss must be finite."""
    import math

    import torch.distributed as dist

    from harness.data.models import load_backbone
    from harness.pipeline import devices
    from harness.pipeline.heads import _Heads
    from harness.pipeline.plan import HeadGroup, HeadPlan, ImageSet
    from methods.lcam import PAPER_LAMBDAS
    from methods.lcam_train import TrainConfig
    ce_only = (0.0, 0.0, *PAPER_LAMBDAS[2:])          # the paper's starred rows: l1 = l2 = 0
    heads = (HeadPlan("lcam_fm", TrainConfig(mode="fm", epochs=1)),
             HeadPlan("lcam_img", TrainConfig(mode="img", epochs=1)),
             HeadPlan("lcam_fm_ce", TrainConfig(mode="fm", epochs=1, lambdas=ce_only)),
             HeadPlan("lcam_img_ce", TrainConfig(mode="img", epochs=1, lambdas=ce_only)))
    backend = "gloo" if s.dry else "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        devices.set_precision(s.device, False, False)     # as train_loop_per_worker does
        bb = load_backbone(s.backbone, weights=None).to(s.device)
        group = HeadGroup(backbone=s.backbone, weights=None,
                          images=ImageSet("imagenet", "train", (s.size, s.size)),
                          batch_size=s.batch, workers=1, use_gpu=not s.dry,
                          num_threads=torch.get_num_threads(), heads=heads)
        trainer = _Heads(group, bb, s.device, world=1)
        gen = torch.Generator().manual_seed(0)
        batch = (torch.rand(s.batch, 3, s.size, s.size, generator=gen).to(s.device),
                 torch.randint(0, bb.num_classes, (s.batch,), generator=gen).to(s.device))
        trainer.train_epoch([batch], 0)                                # warm-up
        _sync(s.device)
        start = time.perf_counter()
        per_head = trainer.train_epoch([batch] * s.steps, 0)
        _sync(s.device)
        seconds = time.perf_counter() - start
        losses = {hid: m["loss"] for hid, m in per_head.items()}
        return {"backend": backend, "heads": len(heads), "steps": s.steps, "batch": s.batch,
                "steps_per_s": s.steps / seconds, "images_per_s": s.steps * s.batch / seconds,
                "loss": losses, "met": all(math.isfinite(v) for v in losses.values())}
    finally:
        dist.destroy_process_group()


def training_input(s: Settings, workdir: Path) -> dict[str, Any]:
    """The head training's input, as ``train_loop_per_worker`` builds it (``ImageSet(...,
    train=True).build()``: the train transform; a ``DistributedSampler``; ``loader_options``),
    over ``s.jpegs`` generated JPEGs: images per second onto the device, at each number of
    loader processes (the processes' start included, as in every epoch: they are not
    persistent), and after the first batch."""
    from torch.utils.data import DataLoader, DistributedSampler

    from harness.pipeline.heads import loader_options
    from harness.pipeline.plan import ImageSet
    from methods.lcam_train import seed_epoch
    root = _images_folder(workdir / "train-images", s.jpegs, s.jpeg_size, ("train",), ".jpg")
    dataset = ImageSet("imagenet", "train", (s.size, s.size), root=str(root),
                       train=True).build()
    out: dict[str, Any] = {"images": len(dataset), "batch": s.batch,
                           "image_size": list(s.jpeg_size), "workers": {}}
    for workers in s.loader_workers:
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=s.batch, sampler=sampler,
                            **loader_options(s.device, workers))
        sampler.set_epoch(0)
        seed_epoch(0, 0)
        start, first, n = time.perf_counter(), None, 0
        for batch in loader:
            batch[0].to(s.device, non_blocking=True)
            n += len(batch[0])
            if first is None:
                _sync(s.device)
                first, after = time.perf_counter() - start, n
        _sync(s.device)
        seconds = time.perf_counter() - start
        steady = (n - after) / (seconds - first) if n > after and seconds > first else None
        out["workers"][str(workers)] = {"images": n, "images_per_s": n / seconds,
                                        "first_batch_s": first,
                                        "images_per_s_after_first": steady}
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images_folder(root: Path, n: int, size, splits=("train", "val"), suffix: str = ".png",
                   classes: int = 2) -> Path:
    """``n`` smooth random images per split of (H, W) ``size`` in an ImageNet-style folder
    (``root/<split>/c<k>/``), written by a few threads."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    h, w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(len(splits) * n, 3, max(2, h // 16), max(2, w // 16), generator=gen)

    def one(k: int) -> None:
        split, i = splits[k // n], k % n
        folder = root / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img = torch.nn.functional.interpolate(coarse[k:k + 1], size=(h, w), mode="bilinear")[0]
        pixels = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}{suffix}", quality=90)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(splits) * n)))
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


def _section(fn: Callable[..., dict], *args) -> tuple[dict[str, Any], float]:
    """``(fn(*args), seconds)``, or ``{"error": ..., "traceback": [...]}`` when it raised:
    one failing section is recorded and the others still run."""
    started = time.perf_counter()
    try:
        found = fn(*args)
    except Exception as err:
        lines = traceback.format_exc().strip().splitlines()
        found = {"error": f"{type(err).__name__}: {err}", "traceback": lines[-12:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return found, time.perf_counter() - started


def failed(results: dict[str, Any]) -> list[str]:
    """The sections that raised or missed a target (``met`` False; None: no target here)."""
    def misses(value) -> bool:
        if isinstance(value, dict):
            return value.get("met") is False or any(misses(v) for v in value.values())
        return False
    return [name for name in SECTIONS if name in results and (
        "error" in results[name] or misses(results[name]))]


def run(dry: bool, out: Path, with_ray: bool = False,
        only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every section (``only``: those named; ``ray`` only ``with_ray`` or named); the results as a
    dict, written to ``out`` (JSON, atomically) after each section."""
    with_ray = with_ray or "ray" in (only or ())
    if with_ray:
        from harness.pipeline import ray_runtime
        ray_runtime.prepare_environment(None)        # before anything imports ray
    if not dry and not torch.cuda.is_available():
        from harness.errors import UserError
        raise UserError("no CUDA device here: run the GPU check on a GPU machine, or add --dry")
    s = Settings(dry)
    started = time.perf_counter()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "dry": dry,
                               "device": torch.cuda.get_device_name() if not dry else "cpu",
                               "torch": torch.__version__, "cuda": torch.version.cuda,
                               "complete": False, "section_seconds": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        steps = {"parity": (parity, s), "busy": (busy, s, work), "masked": (masked, s),
                 "four_heads": (four_heads, s), "training_input": (training_input, s, work),
                 "ray": (ray_checks, s, work)}
        for name in SECTIONS:
            if (name == "ray" and not with_ray) or (only and name not in only):
                continue
            results[name], results["section_seconds"][name] = _section(*steps[name])
            results["seconds"] = time.perf_counter() - started
            write_text_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
    results["complete"] = True
    results["failed"] = failed(results)
    results["seconds"] = time.perf_counter() - started
    write_text_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
    return results
