"""Training an L-CAM attention head on a frozen backbone (plain torch; Ray Train wraps it).

The optimiser follows the chosen variant (docs/protocol.md section 4.5):
- ``paper``: SGD, lr 1e-4 by default, the learning rate multiplied by ``lr_decay`` after
  every epoch (0.75 x 7 epochs for VGG-16, 0.95 x 25 for ResNet-50 in the paper).
- ``reference``: the authors' code: SGD with Nesterov momentum 0.9, weight decay 5e-4, the
  bias at twice the weight's learning rate, and the backbone's Dropout active in training.
Labels are the backbone's own top-1 on each training image ("model truth", from the clean
forward that L-CAM-Fm needs anyway), or the data set's ground truth (``labels='ground_truth'``).
Only the head's parameters are trained; the backbone never gets gradients.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .lcam import PAPER_LAMBDAS, AttentionHead, lcam_loss, training_forward


@dataclass
class TrainConfig:
    """Hyper-parameters of one head training (defaults: the paper's VGG-16 recipe)."""

    mode: str = "img"                      # 'fm' | 'img'
    epochs: int = 7
    lr: float = 1e-4
    lr_decay: float = 0.75
    lambdas: tuple = PAPER_LAMBDAS         # (l1 TV, l2 area, l3 CE, l4 area power)
    variant: str = "paper"                 # 'paper' | 'reference'
    labels: str = "model"                  # 'model' (top-1) | 'ground_truth'
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.lambdas = tuple(float(v) for v in self.lambdas)
        if self.mode not in ("fm", "img"):
            raise ValueError(f"mode must be 'fm' or 'img', got {self.mode!r}")
        if self.variant not in ("paper", "reference"):
            raise ValueError(f"variant must be 'paper' or 'reference', got {self.variant!r}")
        if self.labels not in ("model", "ground_truth"):
            raise ValueError(f"labels must be 'model' or 'ground_truth', got {self.labels!r}")
        if len(self.lambdas) != 4:
            raise ValueError("lambdas must be 4 numbers (TV, area, CE, area power)")


def make_optimizer(head: nn.Module, cfg: TrainConfig):
    """SGD per the variant, with a per-epoch exponential learning-rate decay."""
    params = dict(head.named_parameters())
    weights = [p for n, p in params.items() if not n.endswith("bias")]
    biases = [p for n, p in params.items() if n.endswith("bias")]
    if cfg.variant == "reference":
        opt = torch.optim.SGD([{"params": weights, "lr": cfg.lr},
                               {"params": biases, "lr": 2 * cfg.lr}],
                              lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)


@contextlib.contextmanager
def dropout_active(backbone: nn.Module, active: bool):
    """Turn the backbone's Dropout layers on (the reference recipe) and always back off."""
    drops = [m for m in backbone.modules() if isinstance(m, nn.Dropout)] if active else []
    for m in drops:
        m.training = True
    try:
        yield
    finally:
        for m in drops:
            m.training = False


def train_step(backbone, head, images, gt_labels, cfg: TrainConfig, optimizer=None,
               feats: torch.Tensor | None = None, model_labels: torch.Tensor | None = None) -> dict:
    """One batch: labels, training forward, loss; an optimiser step when ``optimizer`` given.

    ``feats`` and ``model_labels`` (the clean forward's A and top-1) may be passed in when
    several heads train on the same batch, so the clean forward runs once for all of them.
    """
    if feats is None or (cfg.labels == "model" and model_labels is None):
        with torch.no_grad():
            feats = backbone.features(images)
            model_labels = backbone.head(feats).argmax(1)
    labels = model_labels if cfg.labels == "model" else gt_labels
    with dropout_active(backbone, cfg.variant == "reference" and optimizer is not None):
        cams, logits = training_forward(backbone, head, cfg.mode, images, labels, feats)
    terms = lcam_loss(cams, labels, logits, cfg.lambdas, cfg.variant)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
    # The terms stay on the device (no host sync per term and step); callers sum them there.
    out: dict = {k: v.detach() for k, v in terms.items()}
    out["n"] = len(images)
    return out


def seed_epoch(seed: int, epoch: int, generator: torch.Generator | None = None) -> None:
    """Seed everything random in one training epoch from (seed, epoch) alone.

    The augmentation (random flips and crops) draws from torch's global RNG and the shuffle
    from ``generator``: seeding both at the start of each epoch makes a run resumed from an
    epoch checkpoint train on exactly what an unbroken run would have.
    """
    base = int(seed) * 1_000_003 + int(epoch)
    torch.manual_seed(base + 1)
    if generator is not None:
        generator.manual_seed(base + 2)


def run_epoch(backbone, head, loader: Iterable, cfg: TrainConfig, optimizer=None,
              device="cpu") -> dict:
    """Mean loss terms over one pass of ``loader`` (training when ``optimizer`` is given),
    summed in float64 on the device and read back once at the end."""
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in loader:
        images, gt = batch[0], batch[1]
        step = train_step(backbone, head, images.to(device), gt.to(device), cfg, optimizer)
        for k, v in step.items():
            if k != "n":
                sums[k] = sums.get(k, 0.0) + v.double() * step["n"]
        n += step["n"]
    return {k: float(v) / max(n, 1) for k, v in sums.items()} | {"images": n}


def save_head(path: str | Path, head: nn.Module, meta: dict) -> Path:
    """Write {'state_dict', 'meta'} (the file ``lcam.load_head`` reads) in one step: a
    temporary file in the same folder, then ``os.replace``, so readers never see half a head."""
    module = getattr(head, "module", head)        # unwrap DDP
    state = {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
             "meta": meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def head_meta(backbone, cfg: TrainConfig, **more) -> dict:
    return {"backbone": backbone.name, "weights": backbone.weights_id,
            "in_channels": backbone.feature_channels, "num_classes": backbone.num_classes,
            "mode": cfg.mode, "train_config": asdict(cfg) | {"lambdas": list(cfg.lambdas)},
            "trained": True, **more}


def train_head(backbone, loader: Iterable, cfg: TrainConfig, checkpoint: str | Path | None = None,
               device="cpu", on_epoch: Callable[[int, dict], None] | None = None) -> AttentionHead:
    """Train a fresh head for ``cfg.epochs`` epochs; save it to ``checkpoint`` if given."""
    torch.manual_seed(cfg.seed)
    backbone.to(device)
    head = AttentionHead(backbone.feature_channels, backbone.num_classes).to(device).train()
    optimizer, scheduler = make_optimizer(head, cfg)
    for epoch in range(cfg.epochs):
        seed_epoch(cfg.seed, epoch)
        metrics = run_epoch(backbone, head, loader, cfg, optimizer, device)
        metrics["lr"] = scheduler.get_last_lr()[0]
        scheduler.step()
        if on_epoch:
            on_epoch(epoch, metrics)
    head.eval()
    if checkpoint is not None:
        save_head(checkpoint, head, head_meta(backbone, cfg, epochs_done=cfg.epochs))
    return head
