"""Training an L-CAM attention head on a frozen backbone (plain torch; Ray Train wraps it).

The optimiser follows the chosen variant (docs/protocol.md section 4.5):
- ``paper``: SGD, lr 1e-4 by default, the learning rate multiplied by ``lr_decay`` after
  every epoch (0.75 x 7 epochs for VGG-16, 0.95 x 25 for ResNet-50 in the paper).
- ``reference``: the authors' code: SGD with Nesterov momentum 0.9, weight decay 5e-4, the
  bias at twice the weight's learning rate, and the backbone's Dropout active in training;
  lambda1 = lambda2 = 0 is their cross-entropy-only model (CE weight 1, ``effective_lambdas``).
The schedule, either variant: epoch e (from 0) trains at lr * lr_decay^min(e, N), N =
``lr_decay_epochs`` (None: no limit), i.e. "decay for N epochs, then hold" (the authors'
ResNet-50 run: x0.95 at the start of epochs 1-12 of 26, N = 12; ``DecayThenHold``).
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

from .lcam import (PAPER_LAMBDAS, AttentionHead, effective_lambdas, lcam_loss,
                   training_forward)


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
    lr_decay_epochs: int | None = None     # decay for this many epochs, then hold (None: all)

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
        if self.lr_decay_epochs is not None and int(self.lr_decay_epochs) < 1:
            raise ValueError(f"lr_decay_epochs must be >= 1 or None, got "
                             f"{self.lr_decay_epochs!r}")
        # the weights the loss really uses (reference CE-only: CE weight 1), so that the plan,
        # the head's cache name and its metadata show them
        self.lambdas = effective_lambdas(self.lambdas, self.variant)


class DecayThenHold(torch.optim.lr_scheduler.ExponentialLR):
    """x ``gamma`` after each of the first ``decay_epochs`` epochs, then constant: epoch e
    (from 0) trains at lr * gamma^min(e, decay_epochs). Up to the hold it computes exactly
    what ``ExponentialLR`` does (the same products, in the same order)."""

    def __init__(self, optimizer, gamma: float, decay_epochs: int):
        self.decay_epochs = int(decay_epochs)
        super().__init__(optimizer, gamma)

    def get_lr(self):
        if self.last_epoch > self.decay_epochs:
            return [group["lr"] for group in self.optimizer.param_groups]
        return super().get_lr()


def make_scheduler(optimizer, cfg: TrainConfig):
    """The per-epoch learning-rate schedule: ``ExponentialLR(lr_decay)``, or ``DecayThenHold``
    when ``cfg.lr_decay_epochs`` is set (step it once after every epoch)."""
    if cfg.lr_decay_epochs is None:
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    return DecayThenHold(optimizer, cfg.lr_decay, cfg.lr_decay_epochs)


def make_optimizer(head: nn.Module, cfg: TrainConfig):
    """SGD per the variant, and its per-epoch schedule (``make_scheduler``)."""
    params = dict(head.named_parameters())
    weights = [p for n, p in params.items() if not n.endswith("bias")]
    biases = [p for n, p in params.items() if n.endswith("bias")]
    if cfg.variant == "reference":
        opt = torch.optim.SGD([{"params": weights, "lr": cfg.lr},
                               {"params": biases, "lr": 2 * cfg.lr}],
                              lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr)
    return opt, make_scheduler(opt, cfg)


def recipe_text(cfg: TrainConfig) -> str:
    """The optimiser, schedule, labels and loss of ``cfg`` in words (``validate``'s plan)."""
    if cfg.variant == "reference":
        opt = (f"SGD Nesterov 0.9, wd 5e-4, lr {cfg.lr:g} (bias {2 * cfg.lr:g}), "
               "Dropout (if any) on in training")
    else:
        opt = f"SGD, lr {cfg.lr:g}"
    hold = ("" if cfg.lr_decay_epochs is None else
            f" for {cfg.lr_decay_epochs} epoch(s), then held")
    return (f"{cfg.epochs} epochs, {opt}, x{cfg.lr_decay:g} per epoch{hold}, labels "
            f"{cfg.labels}, {cfg.variant} loss, lambdas "
            f"{', '.join(f'{v:g}' for v in cfg.lambdas)}")


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
               feats: torch.Tensor | None = None, model_labels: torch.Tensor | None = None,
               batch_labels: torch.Tensor | None = None) -> dict:
    """One batch: labels, training forward, loss; an optimiser step when ``optimizer`` given.

    ``feats`` and ``model_labels`` (the clean forward's A and top-1) may be passed in when
    several heads train on the same batch, so the clean forward runs once for all of them.
    ``batch_labels``: the labels (of ``cfg.labels``' kind) of every worker's part of the
    optimiser batch, for the ``reference`` loss's B x B term (``lcam.lcam_loss``).
    """
    if feats is None or (cfg.labels == "model" and model_labels is None):
        with torch.no_grad():
            feats = backbone.features(images)
            model_labels = backbone.head(feats).argmax(1)
    labels = model_labels if cfg.labels == "model" else gt_labels
    with dropout_active(backbone, cfg.variant == "reference" and optimizer is not None):
        cams, logits = training_forward(backbone, head, cfg.mode, images, labels, feats)
    terms = lcam_loss(cams, labels, logits, cfg.lambdas, cfg.variant, batch_labels)
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
