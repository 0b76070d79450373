"""Ray Tune sweeps of L-CAM's hyper-parameters (``python -m harness tune``, ``harness.cli.tune``).

A sweep spec is a benchmark spec plus a ``sweep`` section (``harness.spec.sweep``): a search
space over lambda1-4, lr, lr_decay and epochs, the metric (validation loss, or AD/IC at a
kept fraction on a validation split held out of the training split, so disjoint from the
evaluation set), the mode and the scheduler (ASHA by default, epochs as the resource).

Each trial trains one head with the same code as ``run`` (``methods.lcam_train``: the
optimiser, the loss and the batch step) and reports every epoch, so ASHA can stop bad
trials early. Heads are small and Tune already spreads trials over the cluster's CPUs/GPUs
(``cpus_per_trial``/``gpus_per_trial``), so a trial trains in its own process rather than
as a nested multi-worker ``TorchTrainer``. Every trial is an MLflow child run of one sweep
run (params = the trial's config). At the end: a table of the best trials, the best config
as a ready-to-run benchmark spec (path printed) and the best head logged to MLflow.
An interrupted sweep continues with ``--resume`` without redoing finished trials.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from harness.errors import UserError
from harness.data.cache import cache_dir, write_text_atomic
from harness.pipeline import cluster, devices, resources
from harness.pipeline.heads import loader_options
from harness.data.storage import Storage
from harness.pipeline.plan import ImageSet, image_set, train_config
from methods.lcam_train import TrainConfig


class SweepExists(UserError):
    """A sweep of this spec was started before and ``--resume`` was not given."""


def search_space(sweep) -> dict:
    from ray import tune
    make = {"choice": lambda v: tune.choice(v), "grid": lambda v: tune.grid_search(v),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, dist in sweep.space.items()
            for kind, values in dist.items()}


def split_indices(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of the training split into (train, validation) index lists."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n_val, max(1, n // 5))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


@dataclass(frozen=True)
class TrialBase:
    """What every trial of a sweep shares (plain data, sent to each trial process)."""

    backbone: str
    weights: Any
    method: str
    images: ImageSet                   # the training split, training transform
    train_idx: tuple[int, ...]
    val_idx: tuple[int, ...]           # held out of the training split (validation)
    batch_size: int
    threads: int
    fraction: float | None             # the kept fraction of an AD/IC metric, else None
    config: TrainConfig                # the spec's training of the method (plan.train_config)
    gpus: float = 0.0                  # sweep.gpus_per_trial: the trial trains on CUDA

    def trial_config(self, searched: dict) -> TrainConfig:
        """The base config with a trial's sampled values (lambda1-4, lr, lr_decay, epochs)."""
        lambdas = [float(searched.get(f"lambda{i + 1}", v))
                   for i, v in enumerate(self.config.lambdas)]
        plain = {k: searched[k] for k in ("lr", "lr_decay", "epochs") if k in searched}
        return dataclasses.replace(self.config, lambdas=tuple(lambdas), **plain)


def _resume(head, optimizer, scheduler) -> int:
    from ray import tune
    ckpt = tune.get_checkpoint()
    if not ckpt:
        return 0
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "head.pt", weights_only=True)
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optim"])
    scheduler.load_state_dict(state["sched"])
    return state["epoch"] + 1


def _explanation_metrics(bb, explainer, head, loader, fraction: float) -> dict[str, float]:
    """AD and IC at ``fraction`` of the trial's head on the validation images."""
    from harness.metrics.protocol import Evaluator
    explainer.head = head
    ev, ys, os_ = Evaluator(bb, (fraction,)), [], []
    for images, _, _ in loader:
        scores = ev.evaluate_explainer(explainer, images)
        ys.append(scores.y)
        os_.append(scores.o)
    return Evaluator.summarise(torch.cat(ys), torch.cat(os_), (fraction,))


def trial(config: dict, base: TrialBase) -> None:
    """One Tune trial: train a head epoch by epoch, validate, report, checkpoint."""
    from ray import tune
    from torch.utils.data import DataLoader, Subset

    import methods
    from harness.data.models import load_backbone
    from methods.lcam import AttentionHead
    from methods.lcam_train import make_optimizer, run_epoch, seed_epoch

    torch.set_num_threads(max(1, base.threads))
    device = devices.task_device(base.gpus, "a Tune trial (sweep.gpus_per_trial)")
    devices.set_precision(device)
    cfg = base.trial_config(config)
    bb = load_backbone(base.backbone, weights=base.weights).to(device)
    train_set = Subset(base.images.build(), list(base.train_idx))
    val_set = Subset(dataclasses.replace(base.images, train=False).build(), list(base.val_idx))
    gen = torch.Generator().manual_seed(cfg.seed)
    options = loader_options(device, max(2, base.threads) if device.type == "cuda" else 0)
    train_loader = DataLoader(train_set, batch_size=base.batch_size, shuffle=True,
                              generator=gen, **options)
    val_loader = DataLoader(val_set, batch_size=base.batch_size, **options)
    torch.manual_seed(cfg.seed)
    head = AttentionHead(bb.feature_channels, bb.num_classes).to(device)
    optimizer, scheduler = make_optimizer(head, cfg)
    start = _resume(head, optimizer, scheduler)
    explainer = methods.create(base.method, bb) if base.fraction else None
    for epoch in range(start, cfg.epochs):
        seed_epoch(cfg.seed, epoch, gen)      # a restored trial trains as an unbroken one
        head.train()
        train = run_epoch(bb, head, train_loader, cfg, optimizer, device)
        scheduler.step()
        head.eval()
        with torch.no_grad():
            val = run_epoch(bb, head, val_loader, cfg, None, device)
        metrics = {"train_loss": train["loss"], "val_loss": val["loss"], "val_ce": val["ce"],
                   "val_tv": val["tv"], "val_area": val["area"], "epoch": epoch + 1}
        if explainer is not None:
            metrics.update(_explanation_metrics(bb, explainer, head, val_loader, base.fraction))
        with tempfile.TemporaryDirectory() as d:
            torch.save({"head": head.state_dict(), "optim": optimizer.state_dict(),
                        "sched": scheduler.state_dict(), "epoch": epoch}, Path(d) / "head.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def trial_base(spec, sweep) -> TrialBase:
    """The trials' shared setup from the spec (loads the backbone once: an embedded one is
    trained here on first use, before any trial starts)."""
    from harness.data.models import load_backbone
    bspec, mspec = spec.backbone(sweep.backbone), spec.method(sweep.method)
    load_backbone(bspec.name, weights=bspec.weights)
    images = image_set(spec, bspec.name, train=True)
    n = len(dataclasses.replace(images, train=False).build())
    train_idx, val_idx = split_indices(n, sweep.validation_images, spec.seed)
    return TrialBase(backbone=bspec.name, weights=bspec.weights, method=mspec.name,
                     images=images, train_idx=tuple(train_idx), val_idx=tuple(val_idx),
                     batch_size=spec.train_for(bspec, mspec).batch_size,
                     threads=max(1, int(sweep.cpus_per_trial)), fraction=sweep.fraction(),
                     config=train_config(spec, bspec, mspec), gpus=sweep.gpus_per_trial)


def best_spec(spec, sweep, config: dict) -> dict:
    """The base spec restricted to the tuned backbone, with the best train overrides."""
    out = spec.to_dict()
    out.pop("sweep", None)
    out["name"] = f"{spec.name}-best"
    out["backbones"] = [b for b in out["backbones"] if b["name"] == sweep.backbone]
    for m in out["methods"]:
        if m["id"] == sweep.method:
            m["train"] = {**(m.get("train") or {}),
                          **{k: (int(v) if k == "epochs" else float(v)) for k, v in config.items()}}
            m["display_name"] = None
    return out


def _scheduler(sweep, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    sched = sweep.scheduler
    if sched.name != "asha":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                         grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)


def _tuner(spec, sweep, base: TrialBase, storage: Storage, name: str, resume: bool,
           tracking_uri: str, parent: str):
    """A new ``Tuner`` for the sweep, or the interrupted one restored (``--resume``); its
    results in ``<storage>/tune/<name>``."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    trainable = tune.with_resources(tune.with_parameters(trial, base=base),
                                    {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    fs = {} if storage.local else {"storage_filesystem": storage.fs}
    exp_dir = storage.path("tune", name)
    if resume and tune.Tuner.can_restore(exp_dir, **fs):
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True,
                                  param_space=search_space(sweep), **fs)
    max_t = max([base.config.epochs] + [int(v) for d in sweep.space.get("epochs", {}).values()
                                        for v in d])
    callbacks = [MLflowLoggerCallback(
        tracking_uri=tracking_uri, experiment_name=spec.tracking.experiment or spec.name,
        tags={"mlflow.parentRunId": parent, "harness_role": "trial",
              "backbone": sweep.backbone, "method_id": sweep.method}, save_artifact=False)]
    return tune.Tuner(
        trainable, param_space=search_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode,
                                    scheduler=_scheduler(sweep, max_t),
                                    num_samples=sweep.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage.path("tune"), **fs,
                                  callbacks=callbacks, verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=1, checkpoint_score_attribute=sweep.metric,
                                      checkpoint_score_order=sweep.mode)))


def _ranked(results, sweep, base: TrialBase) -> tuple[list[tuple], int]:
    """(best score over its epochs, epochs run, config) per trial, best first; and how many
    trials the scheduler stopped before their last epoch."""
    rows = []
    for r in results:
        if r.metrics and sweep.metric in r.metrics:
            hist = r.metrics_dataframe[sweep.metric]
            rows.append((hist.min() if sweep.mode == "min" else hist.max(),
                         r.metrics.get("training_iteration", 0), r.config))
    rows.sort(key=lambda x: x[0], reverse=sweep.mode == "max")
    stopped = sum(1 for r in results if r.metrics and r.metrics.get("training_iteration", 0)
                  < int(r.config.get("epochs", base.config.epochs)))
    return rows, stopped


def _table(spec, sweep, rows):
    from rich.table import Table
    table = Table(title=f"best trials of {spec.name} ({sweep.metric}, {sweep.mode})")
    keys = sorted(sweep.space)
    for col in ("rank", sweep.metric, "epochs run", *keys):
        table.add_column(col, justify="right")
    for i, (score, its, config) in enumerate(rows[:5], 1):
        table.add_row(str(i), f"{score:.4g}", str(its), *(f"{config.get(k):.4g}" if
                      isinstance(config.get(k), float) else str(config.get(k)) for k in keys))
    return table


def _write_best(spec, sweep, best, score: float, name: str) -> tuple[Path, Path]:
    """The best config as a runnable spec and the best head, in ``<cache>/sweeps/<name>``."""
    out_dir = cache_dir() / "sweeps" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: best.config[k] for k in sweep.space}
    spec_path, head_path = out_dir / "best.yaml", out_dir / "best_head.pt"
    with best.get_best_checkpoint(sweep.metric, sweep.mode).as_directory() as d:
        shutil.copyfile(Path(d) / "head.pt", head_path)
    write_text_atomic(spec_path, f"# python -m harness run {spec_path}\n# best of sweep {name}: "
                      f"{sweep.metric} = {score:.6g} ({sweep.mode}); trained head: {head_path}\n"
                      + yaml.safe_dump(best_spec(spec, sweep, config), sort_keys=False))
    return spec_path, head_path


def run_sweep(spec, resume: bool = False, console=None) -> dict:
    """Run (or resume) the sweep; returns the best config, metric and written paths."""
    from harness.pipeline.ray_runtime import prepare_environment
    from harness.pipeline.runner import init_ray, prepare_locations
    from harness.results.tracking import Tracker, git_commit, package_versions
    from harness.terminal import make_console
    uri, storage = prepare_locations(spec)
    prepare_environment(spec.ray.address)        # before ray is imported
    console, sweep = console or make_console(), spec.sweep
    name = f"{spec.name}-{spec.fingerprint()}"
    exp_dir = storage.path("tune", name)
    if storage.exists(exp_dir) and not resume:
        raise SweepExists(f"a sweep of this spec already exists at {exp_dir}: pass --resume "
                          "to continue it, or delete that folder to start over")
    base = trial_base(spec, sweep)
    init_ray(spec)                               # refuse what can never run before recording
    resources.check([resources.Demand("each Tune trial", "sweep.cpus_per_trial/gpus_per_trial",
                                      sweep.cpus_per_trial, sweep.gpus_per_trial)])
    cluster.check_nodes((base.images.root,) if base.images.root else (), storage, trains=True)
    tracker = Tracker(spec.tracking.experiment or spec.name, uri)
    parent = tracker.parent_run(f"sweep {spec.name}", spec.fingerprint(), {
        "git_commit": git_commit(), **package_versions(), "harness_kind": "sweep",
        "backbone": sweep.backbone, "method_id": sweep.method}, role="sweep")
    ok = False
    try:
        results = _tuner(spec, sweep, base, storage, name, resume, tracker.uri, parent).fit()
        best = results.get_best_result(sweep.metric, sweep.mode, scope="all")
        ok = best is not None and best.config is not None
    finally:
        if not ok:
            tracker.finish(parent, ok=False)
    rows, stopped = _ranked(results, sweep, base)
    console.print(_table(spec, sweep, rows))
    spec_path, head_path = _write_best(spec, sweep, best, rows[0][0], name)
    tracker.log(parent, params={f"best.{k}": best.config[k] for k in sweep.space},
                metrics={f"best_{sweep.metric}": rows[0][0], "trials": len(results),
                         "stopped_early": stopped})
    tracker.artifact(parent, spec_path)
    tracker.artifact(parent, head_path)
    tracker.finish(parent, ok=True)
    console.print(f"{len(results)} trials, {stopped} stopped early by the scheduler.")
    console.print(f"best config written as a benchmark spec: {spec_path}")
    return {"best_config": {k: best.config[k] for k in sweep.space}, "best_metric": rows[0][0],
            "spec_path": str(spec_path), "head_path": str(head_path), "trials": len(results),
            "stopped_early": stopped, "parent_run_id": parent, "experiment_dir": str(exp_dir)}
