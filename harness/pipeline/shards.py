"""What runs inside the evaluation's Ray workers: shards of images, then each cell's analysis.

``run_shard(ShardJob)`` loads the backbone, the explainer and the images *inside the worker*
(cached per worker process, which is long-lived: ``harness.pipeline.workers``; no model is
captured in a closure), explains its slice of the
cell's images and scores them with ``harness.metrics.protocol.Evaluator``: one row per image
(``harness.metrics.aggregate`` lists the columns). The first shard of a cell also keeps the
maps of its first images. ``run_analysis(AnalysisJob)`` runs once all shards of a cell exist,
on the same resources: the overlay grid of the kept maps, and the error analysis, class
gallery, shortcut figure and sanity randomisation of ``harness.results.analysis``. All
per-image work happens in these jobs; the driver only aggregates rows and records files.

The jobs write nothing shared: they *return* their rows, maps and files through Ray's object
store and the driver writes them to the run's storage (``harness.data.storage``), so a
cluster needs no shared filesystem. What a task reads is node-local and rebuilt where
missing, deterministically: the quickstart data, the embedded backbone's weights and the
prepared (decoded) images of the backbone (``harness.data.prepared``), in the node's cache;
the L-CAM head arrives through the object store (``HeadRef``). A node that rebuilds them
differently from the driver (another weights hash, another evaluation list) fails the task
with ``InputMismatch`` instead of computing other numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from harness.data.cache import atomic_write, cache_dir
from harness.data.prepared import PreparedRef
from harness.metrics.base import Batch
from harness.metrics.protocol import Evaluator
from harness.pipeline import devices
from harness.pipeline.faults import shard_fault
from harness.pipeline.plan import Cell, EvaluationPlan, ImageSet

ROWS_VERSION = 2   # bumped whenever the rows a shard writes change (then shards are redone)


class InputMismatch(Exception):
    """A node rebuilt an input differently from the driver (weights, evaluation list)."""


@dataclass(frozen=True)
class HeadRef:
    """An L-CAM head for the tasks: its file name and its bytes (a Ray object reference, or
    the bytes themselves), written to the node's cache on first use."""

    name: str
    data: Any

    def local_path(self) -> str:
        path = cache_dir() / "heads" / "received" / self.name
        if not path.is_file():
            import ray
            data = ray.get(self.data) if isinstance(self.data, ray.ObjectRef) else self.data
            atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return str(path)


@dataclass(frozen=True)
class ShardJob:
    """One shard: a slice of one cell's images, explained and scored in one Ray task."""

    cell: Cell
    images: ImageSet
    prepared: PreparedRef             # the driver's decoded images (and list hash)
    weights_id: str                   # the weights the driver loaded
    evaluation: EvaluationPlan
    head: HeadRef | None              # the L-CAM head (learned methods)
    seed: int
    shard: int
    indices: tuple[int, ...]          # positions in the evaluation data set
    save_maps: int = 0                # keep the first N images' maps (for the overlay grid)


@dataclass(frozen=True)
class AnalysisJob:
    """The per-cell work after its shards: overlays, figures, sanity."""

    cell: Cell
    images: ImageSet
    prepared: PreparedRef
    weights_id: str
    evaluation: EvaluationPlan
    head: HeadRef | None
    seed: int
    rows: Any                         # the cell's per-image rows (a pyarrow table)
    maps: bytes | None                # the first shard's kept maps (torch.save bytes)


@lru_cache(maxsize=4)
def _load_backbone(name: str, weights: Any, device: str, channels_last: bool = False):
    from harness.data.models import load_backbone
    bb = load_backbone(name, weights=weights).to(device)
    return bb.to(memory_format=torch.channels_last) if channels_last else bb


@lru_cache(maxsize=4)
def _load_prepared(images: ImageSet, ref: PreparedRef):
    """The driver's prepared images: from the node's cache, written there from the object
    store on first use (``PreparedRef``); on a single node without shipped data, made here
    from the node's own copy of the data when missing, and checked against the driver's."""
    from harness.data.prepared import prepare
    found = ref.local(cache_dir())
    if found is not None:
        return found
    dataset = images.build()
    if dataset.list_hash != ref.list_hash:
        raise InputMismatch(f"node {socket.gethostname()} resolved another evaluation list "
                            f"({dataset.list_hash}) than the driver ({ref.list_hash}) from "
                            f"{images.root or images.kind}: its data differs")
    made = prepare(images, dataset, cache_dir())
    if made.path.name != ref.name:
        raise InputMismatch(f"node {socket.gethostname()} prepared other images "
                            f"({made.path.name}) than the driver ({ref.name}) from "
                            f"{images.root or images.kind}: its files differ")
    return made


def _prepare(job, role: str = "shard", **changes):
    """``(device, backbone, explainer)`` of a task (``harness.pipeline.devices``: the
    device, a GPU asked for or an error, float32 unless asked); under ``autocast`` the
    explainer gets a view of the backbone whose passes alone run in reduced precision.
    ``changes`` override the method's parameters."""
    import methods
    cell, evaluation = job.cell, job.evaluation
    torch.set_num_threads(evaluation.num_threads)
    device = devices.task_device(evaluation.gpus_per_task, f"the {role} job of {cell.key}")
    devices.set_precision(device, evaluation.tf32, evaluation.deterministic)
    backbone = _load_backbone(cell.backbone, cell.weights, str(device), evaluation.channels_last)
    if backbone.weights_id != job.weights_id:
        raise InputMismatch(f"node {socket.gethostname()} has other weights for "
                            f"{cell.backbone} ({backbone.weights_id}) than the driver "
                            f"({job.weights_id}): their builds differ")
    key = (cell.key, cell.method, cell.variant, repr(sorted(cell.params.items())),
           repr(sorted(changes.items())), job.head.name if job.head else None, job.weights_id,
           str(device), evaluation.autocast, evaluation.channels_last)
    explainer = _EXPLAINERS.get(key)
    if explainer is None:
        seen = backbone
        if evaluation.autocast:
            seen = backbone.with_autocast(torch.float16 if device.type == "cuda"
                                          else torch.bfloat16)
        head = {"checkpoint": job.head.local_path()} if job.head else {}
        params = dict(cell.params, **head, **changes)
        explainer = methods.create(cell.method, seen, variant=cell.variant, **params)
        _EXPLAINERS.put(key, explainer)
    return device, backbone, explainer


class _Recent(dict):
    """The last ``size`` values put, by key (the oldest is dropped first)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self.pop(key, None)
        self[key] = value
        while len(self) > self.size:
            del self[next(iter(self))]


#: The explainers of this process, by everything that makes one (cell, parameters, head,
#: weights, device, precision): a long-lived worker (``harness.pipeline.workers``) builds each
#: once (an L-CAM head loaded once, RISE's masks made once) for all the shards of its cell.
#: Explaining draws nothing from torch's global RNG, so a reused explainer gives the same maps.
_EXPLAINERS = _Recent(4)


def explain_batch(explainer, images: torch.Tensor, autocast: bool) -> torch.Tensor:
    """The explainer's maps as float32. Under ``autocast`` the explainer was given a
    ``with_autocast`` view of the backbone (``_prepare``): its backbone passes run in
    bf16 (CPU) or fp16 (CUDA), its own arithmetic in float32; AD/IC are always scored in
    float32 on the plain backbone."""
    del autocast                                  # carried by the explainer's backbone view
    return explainer.explain(images)


class _Rows:
    """The per-image rows of one shard, filled batch by batch: the image's identity, AD/IC's
    columns (Y, O_<k>), the explanation's (degenerate, forwards, seconds, shard), then the
    columns of every other metric of the run (``EvaluationPlan.measures``), as each declares
    them (``Metric.columns``)."""

    def __init__(self, measures):
        self.measures = measures
        first, *rest = measures               # AD/IC
        self.data: dict[str, list] = {k: [] for k in (
            "image_id", "class_explained", "ground_truth", *first.columns(),
            "degenerate", "forward_passes", "seconds", "shard",
            *(c for m in rest for c in m.columns()))}

    def score(self, batch: Batch) -> dict[str, list]:
        """Every metric's columns for ``batch``, checked against their declarations."""
        out: dict[str, list] = {}
        for metric in self.measures:
            found = metric.score(batch)
            if set(found) != set(metric.columns()) or any(
                    len(v) != len(batch.images) for v in found.values()):
                raise RuntimeError(f"metric {metric.name} wrote the columns "
                                   f"{sorted(found)}, declared {sorted(metric.columns())} "
                                   f"with one value per image")
            out.update(found)
        return out

    def add(self, items, scores, degenerate, measured, fw: float, seconds: float, shard: int):
        d = self.data
        for col in measured:      # every metric's columns (AD/IC's Y and O_<k> among them)
            d[col] += measured[col]
        for j, (_, label, image_id) in enumerate(items):
            d["image_id"].append(str(image_id))
            d["class_explained"].append(int(scores.targets[j]))
            d["ground_truth"].append(int(label))
            d["degenerate"].append(bool(degenerate[j]))
            d["forward_passes"].append(float(fw))
            d["seconds"].append(seconds)
            d["shard"].append(shard)


class _Clock:
    """Seconds per stage of a task (load, explain, score, write), device work included."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@lru_cache(maxsize=1)
def _loader() -> ThreadPoolExecutor:
    """The process's one loading thread, reused by every shard it runs. A thread per shard
    made glibc give each new thread its own malloc arena: a Ray worker then kept ~10 MB more
    per shard (its anonymous memory grew from 680 to 850 MB between 10,000 and 50,000
    images; ``bench --pipeline --memory-images``)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-loader")


def _batches(prepared, indices, size: int, device, channels_last: bool, clock: _Clock):
    """``(indices, images)`` per batch, the next batch read (and, on CUDA, copied from pinned
    memory) in the background thread (``_loader``) while the current one is computed."""
    def load(part):
        x = prepared.batch(part)
        if device.type == "cuda":
            x = x.pin_memory()
        return part, x

    parts = [indices[k:k + size] for k in range(0, len(indices), size)]
    pool = _loader()
    future = pool.submit(load, parts[0]) if parts else None
    for n in range(len(parts)):
        with clock.stage("load"):
            part, x = future.result()
            if n + 1 < len(parts):
                future = pool.submit(load, parts[n + 1])
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        yield part, x


def _explain_and_score(explainer, evaluator, images, ev, clock: _Clock):
    """``(saliency, scores)`` of a batch; on a CUDA out-of-memory error the method's own
    batch (masks, channels) is halved and the images are split, until it fits."""
    try:
        with clock.stage("explain"):
            saliency = explain_batch(explainer, images, ev.autocast)
        with clock.stage("score"):
            # Y from the explainer's clean pass (one forward fewer), unless in reduced precision
            scores = evaluator.evaluate(images, saliency,
                                        logits=None if ev.autocast else explainer.last_logits)
        return saliency, scores, explainer.last_degenerate, explainer.last_forward_passes
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        inner = explainer.config.get("batch_size")
        if inner and inner > 1:
            explainer.config["batch_size"] = inner // 2
            return _explain_and_score(explainer, evaluator, images, ev, clock)
        if len(images) == 1:
            raise
        halves = [_explain_and_score(explainer, evaluator, part, ev, clock)
                  for part in images.split((len(images) + 1) // 2)]
        return (torch.cat([h[0] for h in halves]), _concat_scores([h[1] for h in halves]),
                torch.cat([h[2] for h in halves]), halves[0][3])


def _concat_scores(parts):
    first = parts[0]
    return dataclasses.replace(first, **{k: torch.cat([getattr(p, k) for p in parts])
                                         for k in ("targets", "y", "o", "degenerate")})


def run_shard(job: ShardJob) -> dict:
    """Evaluate one shard: ``{"rows": pyarrow table, "maps": bytes | None, "summary": {stage
    seconds, device, process, node}}`` (the driver writes them to the storage)."""
    shard_fault(job.cell.method_id, job.cell.key, job.shard)
    ev = job.evaluation
    torch.manual_seed(job.seed + job.shard)
    device, backbone, explainer = _prepare(job)
    clock = _Clock(device)
    evaluator = Evaluator(backbone, ev.fractions, ev.preset)
    images_of = _load_prepared(job.images, job.prepared)
    rows = _Rows(ev.measures())
    kept = {"images": [], "maps": [], "ids": []}
    for indices, images in _batches(images_of, job.indices, ev.batch_size, device,
                                    ev.channels_last, clock):
        start = time.perf_counter()
        saliency, scores, degenerate, fw = _explain_and_score(explainer, evaluator, images, ev,
                                                              clock)
        seconds = (time.perf_counter() - start) / len(indices)
        items = [(None, images_of.labels[i], images_of.ids[i]) for i in indices]
        with clock.stage("score"):
            measured = rows.score(Batch(backbone, images, saliency, scores.targets,
                                        scores=scores, dataset=images_of,
                                        indices=tuple(indices)))
        rows.add(items, scores, scores.degenerate | degenerate, measured, fw, seconds,
                 job.shard)
        room = job.save_maps - len(kept["ids"])
        if room > 0:
            kept["images"] += list(images[:room].cpu())
            kept["maps"] += list(saliency[:room].cpu())
            kept["ids"] += [str(it[2]) for it in items[:room]]
    with clock.stage("write"):
        table = pa.table(rows.data)
        maps = None
        if kept["ids"]:
            buf = io.BytesIO()
            torch.save({"images": torch.stack(kept["images"]), "maps": torch.stack(kept["maps"]),
                        "ids": kept["ids"]}, buf)
            maps = buf.getvalue()
    summary = {"shard": job.shard, "rows": table.num_rows, "seconds": clock.seconds,
               "device": devices.describe(device), "pid": os.getpid(),
               "node": socket.gethostname(), "node_id": _node_id(),
               "method_batch_size": explainer.config.get("batch_size")}
    return {"rows": table, "maps": maps, "summary": summary}


def _node_id() -> str | None:
    if "ray" not in sys.modules:                       # outside Ray: never import it here
        return None
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:                                   # outside Ray (tests, bench)
        return None


def run_analysis(job: AnalysisJob) -> dict:
    """The per-cell work after its shards: ``{"metrics", "files": {name: bytes}, "seconds"}``
    (``name`` relative to the cell's artifacts: ``overlays.png``, ``analysis/<figure>.png``)."""
    import tempfile

    from harness.results import analysis
    from harness.results.overlays import save_overlay_grid
    started = time.perf_counter()
    _, backbone, explainer = _prepare(job, role="analysis")
    with tempfile.TemporaryDirectory(prefix="analysis-") as tmp:
        out, paths = Path(tmp), []
        if job.maps:
            saved = torch.load(io.BytesIO(job.maps), weights_only=True)
            paths.append(save_overlay_grid(out / "overlays.png", saved["images"], saved["maps"],
                                           saved["ids"]))
        metrics: dict[str, float] = {}
        if job.evaluation.overlays:
            found = analysis.analyse(backbone, explainer,
                                     _load_prepared(job.images, job.prepared),
                                     out / "analysis", per_image=job.rows, seed=job.seed,
                                     sanity_images=1 if job.cell.family == "perturbation"
                                     else None)
            metrics = found["metrics"]
            paths += list(found["paths"])
        files = {str(Path(p).relative_to(out)): Path(p).read_bytes() for p in paths}
    return {"metrics": metrics, "files": files, "seconds": time.perf_counter() - started}
