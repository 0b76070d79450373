"""What runs inside the evaluation's Ray tasks: shards of images, then each cell's analysis.

``run_shard(ShardJob)`` loads the backbone, the explainer and the images *inside the task*
(cached per worker process; no model is captured in a closure), explains its slice of the
cell's images, scores them with ``harness.metrics.protocol.Evaluator`` and writes one row per
image (``harness.metrics.aggregate`` lists the columns) to a Parquet file, atomically (a
temporary name starting with '.', then ``os.replace``): a finished shard is never rewritten
and a rerun skips it. The first shard of a cell also keeps the maps of its first images.

``run_analysis(AnalysisJob)`` runs once all shards of a cell exist, on the same resources:
the per-image table of the run, the overlay grid of the kept maps, and the error analysis,
class gallery, shortcut figure and sanity randomisation of ``harness.results.analysis``. All
per-image work happens in these tasks; the driver only aggregates rows and records files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from harness.data.cache import atomic_write, write_text_atomic
from harness.metrics import causal, localisation
from harness.metrics.aggregate import columns, read_rows
from harness.metrics.protocol import Evaluator
from harness.pipeline import devices
from harness.pipeline.plan import Cell, EvaluationPlan, ImageSet

ROWS_VERSION = 2   # bumped whenever the rows a shard writes change (then shards are redone)
ANALYSIS_FILE = "analysis.json"    # a cell's analysis result; its presence means "done"


@dataclass(frozen=True)
class ShardJob:
    """One shard: a slice of one cell's images, explained and scored in one Ray task."""

    cell: Cell
    images: ImageSet
    evaluation: EvaluationPlan
    checkpoint: str | None            # the L-CAM head (learned methods)
    seed: int
    shard: int
    indices: tuple[int, ...]          # positions in the evaluation data set
    out_path: str
    prepared: str                     # the decoded images (harness.data.prepared)
    save_maps: int = 0                # keep the first N images' maps (for the overlay grid)


@dataclass(frozen=True)
class AnalysisJob:
    """The per-cell work after its shards: per-image table, overlays, figures, sanity."""

    cell: Cell
    images: ImageSet
    evaluation: EvaluationPlan
    checkpoint: str | None
    seed: int
    shard_paths: tuple[str, ...]
    out_dir: str                      # the cell's artifacts folder
    prepared: str                     # the decoded images (harness.data.prepared)


@lru_cache(maxsize=4)
def _load_backbone(name: str, weights: Any, device: str, channels_last: bool = False):
    from harness.data.models import load_backbone
    bb = load_backbone(name, weights=weights).to(device)
    return bb.to(memory_format=torch.channels_last) if channels_last else bb


@lru_cache(maxsize=4)
def _load_prepared(path: str):
    from harness.data.prepared import Prepared
    return Prepared(path)


def _prepare(cell: Cell, evaluation: EvaluationPlan, checkpoint: str | None, **changes):
    """``(device, backbone, explainer)`` of a task (``harness.pipeline.devices``: the
    device, a GPU asked for or an error, float32 unless asked); under ``autocast`` the
    explainer gets a view of the backbone whose passes alone run in reduced precision.
    ``changes`` override the method's parameters (a halved batch after running out of
    memory)."""
    import methods
    torch.set_num_threads(evaluation.num_threads)
    device = devices.task_device(evaluation.gpus_per_task, f"the shard task of {cell.key}")
    devices.set_precision(device, evaluation.tf32, evaluation.deterministic)
    backbone = _load_backbone(cell.backbone, cell.weights, str(device), evaluation.channels_last)
    seen = backbone
    if evaluation.autocast:
        seen = backbone.with_autocast(torch.float16 if device.type == "cuda" else torch.bfloat16)
    params = dict(cell.params, **({"checkpoint": checkpoint} if checkpoint else {}), **changes)
    return device, backbone, methods.create(cell.method, seen, variant=cell.variant, **params)


def explain_batch(explainer, images: torch.Tensor, autocast: bool) -> torch.Tensor:
    """The explainer's maps as float32. Under ``autocast`` the explainer was given a
    ``with_autocast`` view of the backbone (``_prepare``): its backbone passes run in
    bf16 (CPU) or fp16 (CUDA), its own arithmetic in float32; AD/IC are always scored in
    float32 on the plain backbone."""
    del autocast                                  # carried by the explainer's backbone view
    return explainer.explain(images)


def _test_fault(out: Path, shard: int) -> None:
    """Test-only fault injection (tests/e2e/test_reliability.py), inert unless the variable is set.

    ``HARNESS_TEST_KILL_SHARD=<method_id>:<shard>`` SIGKILLs the worker process running that
    shard, once: the marker ``.killed-<shard file>`` beside the shard (atomic create) makes
    the retry, and any later run on the same cache, compute it normally.
    """
    target = os.environ.get("HARNESS_TEST_KILL_SHARD")
    if not target or target != f"{out.parent.name.rsplit('-', 1)[0]}:{shard}":
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(out.with_name(f".killed-{out.name}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


class _Rows:
    """The per-image rows of one shard, filled batch by batch."""

    def __init__(self, fractions, extra: tuple[str, ...] = ()):
        self.fractions = fractions
        self.data: dict[str, list] = {k: [] for k in (
            "image_id", "class_explained", "ground_truth", "Y", *columns(fractions),
            "degenerate", "forward_passes", "seconds", "shard", *localisation.COLUMNS, *extra)}

    def add(self, items, scores, degenerate, energy, fw: float, seconds: float, shard: int):
        d = self.data
        for col in energy:      # localisation columns, and the causal ones when asked for
            d[col] += energy[col]
        for j, (_, label, image_id) in enumerate(items):
            d["image_id"].append(str(image_id))
            d["class_explained"].append(int(scores.targets[j]))
            d["ground_truth"].append(int(label))
            d["Y"].append(float(scores.y[j]))
            for col, value in zip(columns(self.fractions), scores.o[j].tolist()):
                d[col].append(float(value))
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


def _batches(prepared, indices, size: int, device, channels_last: bool, clock: _Clock):
    """``(indices, images)`` per batch, the next batch read (and, on CUDA, copied from pinned
    memory) in a background thread while the current one is computed."""
    def load(part):
        x = prepared.batch(part)
        if device.type == "cuda":
            x = x.pin_memory()
        return part, x

    parts = [indices[k:k + size] for k in range(0, len(indices), size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
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
    """Evaluate one shard and write its Parquet file and its summary (stage seconds, device,
    process) beside it; returns the summary."""
    out = Path(job.out_path)
    summary_file = out.with_suffix(".json")
    if out.exists():
        done = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        return {**done, "shard": job.shard, "rows": pq.read_metadata(out).num_rows,
                "reused": True}
    _test_fault(out, job.shard)
    ev = job.evaluation
    torch.manual_seed(job.seed + job.shard)
    device, backbone, explainer = _prepare(job.cell, ev, job.checkpoint)
    clock = _Clock(device)
    evaluator = Evaluator(backbone, ev.fractions, ev.preset)
    images_of = _load_prepared(job.prepared)
    rows = _Rows(ev.fractions, causal.columns_for(ev.causal))
    kept = {"images": [], "maps": [], "ids": []}
    for indices, images in _batches(images_of, job.indices, ev.batch_size, device,
                                    ev.channels_last, clock):
        start = time.perf_counter()
        saliency, scores, degenerate, fw = _explain_and_score(explainer, evaluator, images, ev,
                                                              clock)
        seconds = (time.perf_counter() - start) / len(indices)
        items = [(None, images_of.labels[i], images_of.ids[i]) for i in indices]
        with clock.stage("score"):
            extra = {**localisation.energy_columns(images_of, indices, saliency),
                     **causal.shard_columns(backbone, images, saliency, scores.targets,
                                            ev.causal, ev.causal_steps, ev.causal_canvas,
                                            ev.causal_batch_size)}
        rows.add(items, scores, scores.degenerate | degenerate, extra, fw, seconds, job.shard)
        room = job.save_maps - len(kept["ids"])
        if room > 0:
            kept["images"] += list(images[:room].cpu())
            kept["maps"] += list(saliency[:room].cpu())
            kept["ids"] += [str(it[2]) for it in items[:room]]
    with clock.stage("write"):
        if kept["ids"]:
            maps = {"images": torch.stack(kept["images"]), "maps": torch.stack(kept["maps"]),
                    "ids": kept["ids"]}
            atomic_write(out.with_name(f"maps-{job.shard:05d}.pt"),
                         lambda tmp: torch.save(maps, tmp))
        write_table_atomic(pa.table(rows.data), out)
    summary = {"shard": job.shard, "rows": len(rows.data["image_id"]), "reused": False,
               "seconds": clock.seconds, "device": devices.describe(device),
               "pid": os.getpid(), "node": socket.gethostname(),
               "method_batch_size": explainer.config.get("batch_size")}
    write_text_atomic(summary_file, json.dumps(summary))
    return summary


def write_table_atomic(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def run_analysis(job: AnalysisJob) -> dict:
    """The per-cell work after its shards; returns ``{"metrics", "artifacts": [(path, dir)]}``
    (``dir``: the MLflow artifact folder, None = the run's root)."""
    from harness.results import analysis
    from harness.results.overlays import save_overlay_grid
    started = time.perf_counter()
    _, backbone, explainer = _prepare(job.cell, job.evaluation, job.checkpoint)
    rows = read_rows(job.shard_paths)
    out = Path(job.out_dir)
    per_image = out / "per_image.parquet"
    write_table_atomic(rows, per_image)
    artifacts: list[tuple[str, str | None]] = [(str(per_image), None)]
    maps = Path(job.shard_paths[0]).with_name("maps-00000.pt")
    if maps.exists():
        saved = torch.load(maps, weights_only=True)
        png = save_overlay_grid(out / "overlays.png", saved["images"], saved["maps"],
                                saved["ids"])
        artifacts.append((str(png), None))
    metrics: dict[str, float] = {}
    if job.evaluation.overlays:
        found = analysis.analyse(backbone, explainer, _load_prepared(job.prepared),
                                 out / "analysis", per_image=rows, seed=job.seed,
                                 sanity_images=1 if job.cell.family == "perturbation" else None)
        metrics = found["metrics"]
        artifacts += [(str(p), "analysis") for p in found["paths"]]
    result = {"metrics": metrics, "artifacts": artifacts,
              "seconds": time.perf_counter() - started}
    write_text_atomic(out / ANALYSIS_FILE, json.dumps(result, indent=1))   # written last
    return result


def finished_analysis(out_dir: str | Path) -> dict | None:
    """The result of a cell's analysis task that ran before (its folder is the cell's
    identity, so the same inputs), or None."""
    path = Path(out_dir) / ANALYSIS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
