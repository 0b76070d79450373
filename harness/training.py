"""L-CAM head training on Ray Train: one ``TorchTrainer`` fit trains a group of heads.

All heads of one backbone that share the data, batch size and label source (L-CAM-Fm,
L-CAM-Img and their CE-only ablations, say) train in the same fit, on the same batches: the
clean forward that gives A and the model-truth labels runs once per batch for all of them.
Workers come from the spec (gloo DDP on CPU, nccl on GPU); each epoch every rank reports,
rank 0 attaches a checkpoint (heads, optimisers, schedulers, epoch) and logs the epoch's
curves to each head's MLflow run. A worker failure restarts the group from the last
checkpoint (``FailureConfig``); a killed driver that runs the same fit again (same name and
storage path) resumes it. The finished heads are written as small files under the cache.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from methods.lcam import AttentionHead
from methods.lcam_train import (TrainConfig, head_meta, make_optimizer, save_head, seed_epoch,
                                train_step)

TRAIN_VERSION = 2   # bumped whenever the same config trains different heads (cached heads redone)


def _log_curves(config: dict, epoch: int, per_head: dict[str, dict]) -> None:
    uri, run_ids = config.get("tracking_uri"), config.get("run_ids") or {}
    if not uri or not run_ids:
        return
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
        client = MlflowClient(uri)
        now = int(time.time() * 1000)
        for hid, metrics in per_head.items():
            if hid in run_ids:
                client.log_batch(run_ids[hid], metrics=[
                    Metric(f"train_{k}", float(v), now, epoch) for k, v in metrics.items()])
    except Exception as err:  # curves are a convenience: never fail training for them
        print(f"warning: could not log training curves to MLflow: {err}")


def _test_fault(config: dict, rank: int, epoch: int, batch: int) -> None:
    """Test-only fault injection (tests/test_reliability.py), inert unless the variable is set.

    ``HARNESS_TEST_KILL_TRAIN=<epoch>:<batch>`` SIGKILLs the rank-0 worker process when it
    reaches that batch of that epoch, once: the marker ``<progress file>.killed`` (atomic
    create) lets the restarted worker group, and any later fit, train normally. It first waits
    until the controller has registered the previous epoch's checkpoint (it polls workers
    every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s): a worker that dies sooner loses that
    report and the group restarts one checkpoint earlier, which is correct but not this test.
    """
    target = os.environ.get("HARNESS_TEST_KILL_TRAIN")
    if not target or rank != 0 or target != f"{epoch}:{batch}" or not config.get("progress_file"):
        return
    try:
        os.close(os.open(f"{config['progress_file']}.killed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    import ray.train
    snapshot = Path(ray.train.get_context().get_storage().experiment_fs_path,
                    "checkpoint_manager_snapshot.json")
    deadline = time.time() + 60
    while epoch > 0 and time.time() < deadline:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
            if latest["epoch"] >= epoch - 1:
                break
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.1)
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train loop (runs on every worker). ``config`` is plain data, see ``fit_heads``."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    import backbones
    from harness.data import build_dataset

    torch.set_num_threads(max(1, int(config.get("num_threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    backbone = backbones.load(config["backbone"], weights=config["weights"]).to(device)

    cfgs = {h["id"]: TrainConfig(**h["cfg"]) for h in config["heads"]}
    heads, optims, scheds = {}, {}, {}
    for hid, cfg in cfgs.items():
        torch.manual_seed(cfg.seed)                   # identical initial heads on every rank
        head = AttentionHead(backbone.feature_channels, backbone.num_classes).to(device)
        optims[hid], scheds[hid] = make_optimizer(head, cfg)
        heads[hid] = ray.train.torch.prepare_model(head) if world > 1 else head
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "heads.pt", map_location=device, weights_only=True)
        for hid in heads:
            getattr(heads[hid], "module", heads[hid]).load_state_dict(state["heads"][hid])
            optims[hid].load_state_dict(state["optims"][hid])
            scheds[hid].load_state_dict(state["scheds"][hid])
        start = state["epoch"] + 1

    dataset = build_dataset(**config["data"])
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=config["seed"], drop_last=False)
    loader = DataLoader(dataset, batch_size=max(1, config["batch_size"] // world),
                        sampler=sampler, num_workers=0,
                        pin_memory=device.type == "cuda")
    for epoch in range(start, config["epochs"]):
        sampler.set_epoch(epoch)
        seed_epoch(config["seed"], epoch)      # the sampler's shuffle is seeded by set_epoch
        sums = {hid: {} for hid in heads}
        for step_index, batch in enumerate(loader):
            _test_fault(config, rank, epoch, step_index)
            images, gt = batch[0].to(device, non_blocking=True), batch[1].to(device)
            with torch.no_grad():
                feats = backbone.features(images)
                model_labels = backbone.head(feats).argmax(1)
            for hid, head in heads.items():
                if epoch >= cfgs[hid].epochs:
                    continue
                head.train()
                step = train_step(backbone, head, images, gt, cfgs[hid], optims[hid],
                                  feats=feats, model_labels=model_labels)
                for k, v in step.items():
                    w = 1 if k == "n" else step["n"]
                    sums[hid][k] = sums[hid].get(k, 0.0) + v * w
        per_head = {}
        for hid in heads:
            if epoch >= cfgs[hid].epochs:
                continue
            totals = torch.tensor([sums[hid].get(k, 0.0) for k in ("loss", "tv", "area", "ce", "n")],
                                  dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(totals)
            n = max(totals[4].item(), 1.0)
            per_head[hid] = {"loss": totals[0].item() / n, "tv": totals[1].item() / n,
                             "area": totals[2].item() / n, "ce": totals[3].item() / n,
                             "lr": scheds[hid].get_last_lr()[0]}
            scheds[hid].step()
        metrics = {f"{hid}/{k}": v for hid, m in per_head.items() for k, v in m.items()}
        metrics["epoch"] = epoch
        if rank == 0:
            _log_curves(config, epoch, per_head)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"epoch": epoch,
                            "heads": {h: getattr(m, "module", m).state_dict() for h, m in heads.items()},
                            "optims": {h: o.state_dict() for h, o in optims.items()},
                            "scheds": {h: s.state_dict() for h, s in scheds.items()}},
                           Path(d) / "heads.pt")
                progress = config.get("progress_file")
                if progress:
                    Path(progress).write_text(json.dumps({"epoch": epoch + 1}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)


def fit_heads(*, name: str, backbone: str, weights: Any, heads: list[dict], data: dict,
              epochs: int, batch_size: int, seed: int, workers: int, use_gpu: bool,
              storage_path: Path, tracking_uri: str | None = None,
              run_ids: dict[str, str] | None = None, num_threads: int = 1,
              progress_file: Path | None = None, max_failures: int = 2) -> dict[str, dict]:
    """Run (or resume) one Ray Train fit; returns {head_id: state_dict} of the last epoch."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"backbone": backbone, "weights": weights, "heads": heads, "data": data,
              "epochs": epochs, "batch_size": batch_size, "seed": seed, "use_gpu": use_gpu,
              "tracking_uri": tracking_uri, "run_ids": run_ids or {},
              "num_threads": num_threads,
              "progress_file": str(progress_file) if progress_file else None}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": num_threads}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"head training {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "heads.pt", map_location="cpu", weights_only=True)
    if state["epoch"] + 1 < epochs:
        raise RuntimeError(f"head training {name} stopped at epoch {state['epoch'] + 1}/{epochs}")
    return state["heads"]


def write_heads(states: dict[str, dict], backbone, cfgs: dict[str, TrainConfig],
                paths: dict[str, Path], extra: dict[str, Any] | None = None) -> None:
    """Save each trained head as a small checkpoint file (atomic)."""
    for hid, state in states.items():
        head = AttentionHead(backbone.feature_channels, backbone.num_classes)
        head.load_state_dict(state)
        save_head(paths[hid], head, head_meta(backbone, cfgs[hid], epochs_done=cfgs[hid].epochs,
                                              **(extra or {})))


def train_config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["lambdas"] = list(cfg.lambdas)
    return d
