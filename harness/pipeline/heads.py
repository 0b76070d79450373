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

import dataclasses
import hashlib
import sys
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from harness.data.cache import stable_hash
from harness.data.storage import Storage
from harness.pipeline import devices
from harness.pipeline.inputs import Inputs
from harness.pipeline.faults import train_fault
from harness.pipeline.plan import HeadGroup, HeadPlan, Plan
from harness.pipeline.shards import HeadRef
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


def read_checkpoint(ckpt, device) -> dict:
    """The ``heads.pt`` of a Ray Train checkpoint, downloaded into a folder of this process's
    own. Not ``Checkpoint.as_directory``: its shared per-node folder is downloaded again by a
    second worker that asks after the first one's download ended, rewriting ``heads.pt``
    while the first reads it (two ranks resuming on one node, as after a node was lost, read
    a truncated file: EOFError)."""
    with tempfile.TemporaryDirectory(prefix="heads-checkpoint-") as d:
        ckpt.to_directory(d)
        return torch.load(Path(d) / "heads.pt", map_location=device, weights_only=True)


def _resume(trainer: "_Heads", device) -> int:
    """Load the last epoch checkpoint of this fit, if any: the epoch to start from."""
    import ray.train
    heads, optims, scheds = trainer.heads, trainer.optims, trainer.scheds
    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0
    state = read_checkpoint(ckpt, device)
    trainer.history = list(state.get("history", []))
    for hid in heads:
        getattr(heads[hid], "module", heads[hid]).load_state_dict(state["heads"][hid])
        optims[hid].load_state_dict(state["optims"][hid])
        scheds[hid].load_state_dict(state["scheds"][hid])
    return state["epoch"] + 1


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate, in rank order, the (n_r, ...) tensors of every worker along dim 0 (an
    all_gather on the tensor's device: the training device, as NCCL needs). The row counts
    may differ between workers (a short last batch): they are gathered first, and every
    part is padded to the longest for the collective, then trimmed."""
    import torch.distributed as dist
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])


def _batch_labels(model_labels: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every worker's labels of this step, {'model': top-1, 'ground_truth': data set's}, for
    the ``reference`` loss's B x B term (``methods.lcam.lcam_loss``: each worker's maps, by
    all B labels, over its own 2 B/W; DDP's average of the gradients over the W workers then
    equals the one-worker gradient of the whole batch)."""
    both = all_gather_rows(torch.stack([model_labels, gt.long()], dim=1))
    return {"model": both[:, 0], "ground_truth": both[:, 1]}


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank of the fit, in rank order (an all-gather of strings)."""
    import ray
    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return nodes


class _Heads:
    """The heads of one worker of a fit, their optimisers and schedulers, and one epoch."""

    def __init__(self, group: HeadGroup, backbone, device, world: int):
        self.backbone, self.device, self.world = backbone, device, world
        self.nodes: list[str] = []            # the Ray node of each rank (rank order)
        self.history: list[dict] = []         # {"epoch", "heads": {head id: terms}} per epoch
        self.cfgs = {h.method_id: h.config for h in group.heads}
        self.heads, self.optims, self.scheds = {}, {}, {}
        for hid, cfg in self.cfgs.items():
            torch.manual_seed(cfg.seed)                   # identical initial heads on every rank
            head = AttentionHead(backbone.feature_channels, backbone.num_classes).to(device)
            self.optims[hid], self.scheds[hid] = make_optimizer(head, cfg)
            if world > 1:
                import ray.train.torch
                head = ray.train.torch.prepare_model(head)
            self.heads[hid] = head

    def active(self, epoch: int) -> list[str]:
        """The heads still training at ``epoch`` (a group's heads may differ in epochs)."""
        return [hid for hid in self.heads if epoch < self.cfgs[hid].epochs]

    def train_epoch(self, loader, epoch: int, fault=lambda step: None) -> dict[str, dict]:
        """One pass over ``loader`` for every active head, on shared batches: the clean
        forward (A and the model-truth labels) runs once per batch for all of them. With
        several workers, a ``reference`` head's loss gets every worker's labels of the step
        (``_batch_labels``), so its B x B term covers the whole optimiser batch."""
        sums = {hid: {} for hid in self.active(epoch)}
        gather = self.world > 1 and any(self.cfgs[h].variant == "reference" for h in sums)
        for step_index, batch in enumerate(loader):
            fault(step_index)
            images = batch[0].to(self.device, non_blocking=True)
            gt = batch[1].to(self.device)
            with torch.no_grad():
                feats = self.backbone.features(images)
                model_labels = self.backbone.head(feats).argmax(1)
            every = _batch_labels(model_labels, gt) if gather else {}
            for hid in sums:
                self.heads[hid].train()
                cfg = self.cfgs[hid]
                step = train_step(self.backbone, self.heads[hid], images, gt, cfg,
                                  self.optims[hid], feats=feats, model_labels=model_labels,
                                  batch_labels=every.get(cfg.labels)
                                  if cfg.variant == "reference" else None)
                for k, v in step.items():                 # float64 sums on the device
                    sums[hid][k] = sums[hid].get(k, 0) + (v if k == "n" else v.double() * step["n"])
        return self._means(sums)

    def _means(self, sums: dict[str, dict]) -> dict[str, dict]:
        """Per-head mean loss terms over every worker's images (an all-reduce of sums, on the
        training device: NCCL takes no CPU tensors), then the learning-rate step."""
        out = {}
        for hid, s in sums.items():
            totals = torch.stack([torch.as_tensor(s.get(k, 0.0), dtype=torch.float64,
                                                  device=self.device)
                                  for k in ("loss", "tv", "area", "ce", "n")])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(totals)      # a sum over the fit's workers
            totals = totals.cpu()
            n = max(totals[4].item(), 1.0)
            out[hid] = {"loss": totals[0].item() / n, "tv": totals[1].item() / n,
                        "area": totals[2].item() / n, "ce": totals[3].item() / n,
                        "lr": self.scheds[hid].get_last_lr()[0]}
            self.scheds[hid].step()
        return out

    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "nodes": self.nodes, "history": self.history,
                "heads": {h: getattr(m, "module", m).state_dict() for h, m in self.heads.items()},
                "optims": {h: o.state_dict() for h, o in self.optims.items()},
                "scheds": {h: s.state_dict() for h, s in self.scheds.items()}}


def _report(config: dict, trainer: _Heads, epoch: int, per_head: dict, rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches the epoch checkpoint, logs the curves
    and writes the progress file."""
    import ray.train
    metrics = {f"{hid}/{k}": v for hid, m in per_head.items() for k, v in m.items()}
    metrics["epoch"] = epoch
    trainer.history.append({"epoch": epoch, "heads": per_head})
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    _log_curves(config, epoch, per_head)
    with tempfile.TemporaryDirectory() as d:
        torch.save(trainer.state(epoch), Path(d) / "heads.pt")
        if config.get("progress"):
            config["storage"].write_bytes(config["progress"],
                                          json.dumps({"epoch": epoch + 1}).encode())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def loader_options(device: torch.device, workers: int) -> dict:
    """DataLoader settings for ``workers`` decoding processes (``train.loader_workers``):
    none decodes in the training process; with some, pinned memory on CUDA and a prefetch.

    The workers are not persistent: each epoch's iterator starts them afresh, seeded from
    torch's global RNG, which ``seed_epoch`` has just seeded from (seed, epoch). So the crops
    and flips of epoch k depend on (seed, epoch, the number of workers) alone, and a fit
    resumed at epoch k draws exactly what an unbroken one draws (persistent workers would
    carry their RNG state over from the epochs before). Starting them costs a fork each per
    epoch: nothing beside an ImageNet epoch."""
    if workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "prefetch_factor": 4,
            "persistent_workers": False}


def train_device(group: HeadGroup) -> torch.device:
    """The device of a Train worker: its CUDA device with ``train.use_gpu`` (CUDA there, or
    ``DeviceMissing``), else the CPU."""
    if not group.use_gpu:
        return torch.device("cpu")
    import ray.train.torch
    devices.task_device(1, f"the head training of {group.backbone} (train.use_gpu)")
    return ray.train.torch.get_device()


def process_group_backend(group: HeadGroup) -> str:
    """The collectives of a fit: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if group.use_gpu else "gloo"


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train loop (runs on every worker); ``config["group"]`` is a ``HeadGroup``."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from harness.data.models import load_backbone

    group: HeadGroup = config["group"]
    torch.set_num_threads(group.num_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = train_device(group)
    devices.set_precision(device, group.tf32, group.deterministic)
    backbone = load_backbone(group.backbone, weights=group.weights).to(device)
    if config.get("weights_id") and backbone.weights_id != config["weights_id"]:
        from harness.pipeline.shards import InputMismatch
        raise InputMismatch(f"node {ray.get_runtime_context().get_node_id()} has other weights "
                            f"for {group.backbone} ({backbone.weights_id}) than the driver "
                            f"({config['weights_id']}): their builds differ")
    trainer = _Heads(group, backbone, device, world)
    trainer.nodes = _worker_nodes(world)
    start = _resume(trainer, device)
    dataset = group.images.build()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=config["seed"], drop_last=False)
    loader = DataLoader(dataset, batch_size=max(1, group.batch_size // world),
                        sampler=sampler, **loader_options(device, group.loader_workers))
    for epoch in range(start, group.epochs):
        sampler.set_epoch(epoch)
        seed_epoch(config["seed"], epoch)      # the sampler's shuffle is seeded by set_epoch
        per_head = trainer.train_epoch(
            loader, epoch, lambda step, e=epoch: train_fault(config, rank, e, step))
        _report(config, trainer, epoch, per_head, rank)


def fit_heads(group: HeadGroup, *, name: str, seed: int, storage: Storage,
              tracking_uri: str | None = None, run_ids: dict[str, str] | None = None,
              progress: str | None = None, max_failures: int = 3,
              live_curves: bool = True, weights_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) one Ray Train fit of ``group``: the last epoch's state, ``{"heads":
    {head id: state_dict}, "nodes": [Ray node id per rank], "history": [...], "epoch"}``.

    ``name`` and ``storage`` identify the fit: the same pair resumes it. ``max_failures``:
    worker-group failures survived (a lost node often costs two: the loss, then a restart
    placed on the node before Ray has noticed it is gone; seen in the two-node test). ``run_ids``
    (head id -> MLflow run) receive the training curves: from rank 0 as it trains when
    ``live_curves`` (its node must reach ``tracking_uri``), else from this process after the
    fit, out of the checkpoint's history. ``progress`` (a path in the storage, which every
    worker reaches) gets the epochs done;
    ``weights_id``: the driver's weights, checked on every worker's node.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from harness.pipeline.process_group import LoopbackTorchConfig

    config = {"group": group, "seed": seed, "weights_id": weights_id,
              "tracking_uri": tracking_uri if live_curves else None,
              "run_ids": run_ids or {},
              "fit": name, "storage": storage, "progress": progress}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=LoopbackTorchConfig(backend=process_group_backend(group)),
        scaling_config=ScalingConfig(num_workers=group.workers, use_gpu=group.use_gpu,
                                     resources_per_worker=worker_resources(group),
                                     placement_strategy=group.placement.upper()),
        run_config=RunConfig(name=name, **storage.ray_storage(),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"head training {name} finished without a checkpoint")
    state = read_checkpoint(result.checkpoint, "cpu")
    if state["epoch"] + 1 < group.epochs:
        raise RuntimeError(f"head training {name} stopped at epoch {state['epoch'] + 1}/"
                           f"{group.epochs}")
    if not live_curves:
        for entry in state.get("history", []):
            _log_curves({"tracking_uri": tracking_uri, "run_ids": run_ids}, entry["epoch"],
                        entry["heads"])
    return state


def worker_resources(group: HeadGroup) -> dict[str, float]:
    """What each Train worker holds: its CPUs, and one GPU with ``train.use_gpu``."""
    return {"CPU": group.cpus, **({"GPU": 1.0} if group.use_gpu else {})}


def head_identity(group: HeadGroup, head: HeadPlan, weights_id: str,
                  train_files: str | None = None) -> dict:
    """Everything that determines a trained head (its cache file is named by a hash of it):
    the training images by their listing's digest (``train_files``: names, sizes, times)."""
    out = {"backbone": group.backbone, "weights": weights_id, "train_files": train_files,
           "group": [group.backbone, group.batch_size, group.workers, group.use_gpu,
                     group.images.identity()],
           "cfg": train_config_dict(head.config), "train_version": TRAIN_VERSION}
    if group.tf32 or group.deterministic:           # absent at the defaults: names kept
        out["precision"] = {"tf32": group.tf32, "deterministic": group.deterministic}
    if group.workers > 1 and head.config.variant == "reference":
        out["batch_labels"] = "gathered"   # the B x B term over all workers (was per worker)
    return out


def write_heads(states: dict[str, dict], backbone, group: HeadGroup,
                paths: dict[str, str], storage: Storage,
                extra: dict[str, Any] | None = None) -> None:
    """Save each trained head as a small checkpoint file in the storage (atomic)."""
    cfgs = {h.method_id: h.config for h in group.heads}
    for hid, state in states.items():
        head = AttentionHead(backbone.feature_channels, backbone.num_classes)
        head.load_state_dict(state)
        with tempfile.TemporaryDirectory() as tmp:
            local = save_head(Path(tmp) / "head.pt", head,
                              head_meta(backbone, cfgs[hid], epochs_done=cfgs[hid].epochs,
                                        **(extra or {})))
            storage.write_bytes(paths[hid], local.read_bytes())


def train_config_dict(cfg: TrainConfig) -> dict:
    """``cfg`` as plain data for a head's identity; fields added later are left out while
    they hold their default (``lr_decay_epochs``: None), so existing heads keep their names."""
    d = dataclasses.asdict(cfg)
    d["lambdas"] = list(cfg.lambdas)
    if d.get("lr_decay_epochs") is None:
        d.pop("lr_decay_epochs", None)
    return d


# -- the stage: which heads exist, which to train ------------------------------------------------
def head_files(plan: Plan, inputs: Inputs, storage: Storage) -> dict[str, str]:
    """Cell key -> its head: a checkpoint given in the spec (a local file), or the storage
    path of a trained one (named by the hash of ``head_identity``)."""
    files = {c.key: c.checkpoint for c in plan.cells if c.checkpoint}
    for group in plan.head_groups:
        wid = inputs.weights_id(group.backbone)
        for head in group.heads:
            identity = head_identity(group, head, wid, inputs.train_files.get(group.backbone))
            name = f"{head.mode}-{stable_hash(identity)}.pt"
            files[f"{group.backbone}/{head.method_id}"] = storage.path("heads", group.backbone,
                                                                      name)
    return files


def head_bytes(plan: Plan, storage: Storage, key: str, path: str) -> bytes:
    """The bytes of a cell's head file (a given checkpoint is read where it is)."""
    given = any(c.key == key and c.checkpoint for c in plan.cells)
    return Path(path).read_bytes() if given else storage.read_bytes(path)


def head_refs(plan: Plan, storage: Storage, files: dict[str, str]) -> dict[str, HeadRef]:
    """Each learned cell's head as a ``HeadRef`` for the shard tasks: its bytes read once
    (into Ray's object store when Ray is up, so that every task gets them wherever it runs),
    named by their hash (which also names the cell's shard folder)."""
    refs: dict[str, HeadRef] = {}
    for key, path in files.items():
        data = head_bytes(plan, storage, key, path)
        name = f"{hashlib.sha256(data).hexdigest()[:16]}-{path.rsplit('/', 1)[-1]}"
        payload = data
        if "ray" in sys.modules:
            import ray
            payload = ray.put(data) if ray.is_initialized() else data
        refs[key] = HeadRef(name, payload)
    return refs


def missing_heads(plan: Plan, files: dict[str, str], storage: Storage) -> bool:
    return any(not storage.exists(files[f"{g.backbone}/{h.method_id}"])
               for g in plan.head_groups for h in g.heads)
