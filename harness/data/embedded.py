"""Training the embedded backbones (``tiny_vgg``, ``tiny_resnet``) on the quickstart data.

``ensure_embedded_weights(name)`` returns the cached state_dict of ``name`` in
``cache_dir()/backbones/<name>-v1.pt`` with its JSON sidecar ``<name>-v1.json`` (the val
accuracy measured on the 500 held-out images, the training time, the recipe and the
``weights_hash``), training it on first use. Training is plain torch (``RECIPES``: AdamW,
one-cycle schedule, batch 32, a few epochs), seeded and deterministic
(``torch.use_deterministic_algorithms``, 2 threads), with light augmentation: random shifts of
up to 3 pixels, no flips, so that the quickstart's planted cue stays in its corner. It runs in
a child process (``train_isolated``) and takes well under a minute on two idle cores; the
same code and seed give bit-identical weights.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from backbones.base import IMAGENET_MEAN, IMAGENET_STD
from backbones.embedded import ARCHS, INPUT_SIZE, VERSION, state_hash
from backbones.registry import WeightsError
from harness.data.cache import cache_dir, file_lock, temporary_file

MIN_VAL_ACCURACY = 0.95

# Training recipes (changing one changes the cached weights: bump backbones.embedded.VERSION).
RECIPES = {
    "tiny_vgg": {"epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
                 "weight_decay": 5e-4, "schedule": "onecycle", "pct_start": 0.25, "shift": 3,
                 "seed": 0, "threads": 2},
    "tiny_resnet": {"epochs": 6, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
                    "weight_decay": 5e-4, "schedule": "onecycle", "pct_start": 0.25, "shift": 3,
                    "seed": 0, "threads": 2},
}


@contextlib.contextmanager
def deterministic(threads: int = 2):
    """Deterministic algorithms and a fixed thread count for the block; restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def load_split(split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The quickstart ``split`` as (uint8 images (N, 3, 64, 64), int64 labels)."""
    from harness.data.images import build_dataset
    ds = build_dataset("quickstart", split, INPUT_SIZE, root=root)
    xs = torch.empty((len(ds), 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
    for i in range(len(ds)):
        xs[i] = (ds[i][0] * 255).round().to(torch.uint8)
    return xs, torch.tensor(ds.labels)


def _shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels per image (reflect padding)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    offs = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs)])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    """Top-1 accuracy of a [0, 1]-input classifier on images ``x`` (uint8 or float)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        correct += int((model(xb).argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / len(x)


class _Normalized(nn.Module):
    """[0, 1] input -> ImageNet mean/std normalisation -> the network (as SplitBackbone)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def train_embedded(name: str, progress: Callable[[int, int, dict], None] | None = None,
                   recipe: dict | None = None) -> tuple[dict, dict]:
    """Train ``name`` on the quickstart train split in this process: ``(state_dict, info)``.

    ``progress(epoch, epochs, {"loss", "train_accuracy", "seconds"})`` is called after each
    epoch. ``info`` holds the val accuracy, the wall-clock seconds and the recipe.
    ``ensure_embedded_weights`` runs this in a child process (see ``train_isolated``).
    """
    if name not in ARCHS:
        raise WeightsError(f"no embedded training recipe for {name!r}; "
                           f"available: {', '.join(ARCHS)}")
    from harness.data.quickstart import NAME, ensure_quickstart, read_marker
    r = {**RECIPES[name], **(recipe or {})}
    start, cpu0 = time.perf_counter(), time.process_time()
    root = ensure_quickstart()
    with deterministic(int(r["threads"])):
        torch.manual_seed(r["seed"])
        gen = torch.Generator().manual_seed(r["seed"])
        xtr, ytr = load_split("train", root)
        xva, yva = load_split("val", root)
        data_s = time.perf_counter() - start
        model = ARCHS[name]()
        net = _Normalized(model)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
        bs = int(r["batch_size"])
        steps = -(-len(xtr) // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], epochs=r["epochs"],
                                                    steps_per_epoch=steps,
                                                    pct_start=r["pct_start"])
        for epoch in range(1, r["epochs"] + 1):
            net.train()
            order = torch.randperm(len(xtr), generator=gen)
            tot_loss, correct = 0.0, 0
            for b in range(steps):
                idx = order[b * bs:(b + 1) * bs]
                xb, yb = _shift(xtr[idx].float() / 255, r["shift"], gen), ytr[idx]
                out = net(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += float(loss.detach()) * len(idx)
                correct += int((out.detach().argmax(1) == yb).sum())
            if progress is not None:
                progress(epoch, r["epochs"], {"loss": round(tot_loss / len(xtr), 4),
                                              "train_accuracy": round(correct / len(xtr), 4),
                                              "seconds": round(time.perf_counter() - start, 1)})
        val_acc = accuracy(net, xva, yva)
    info = {"name": name, "version": VERSION, "dataset": NAME,
            "dataset_sha256": (read_marker(root) or {}).get("content_sha256"),
            "val_accuracy": round(val_acc, 4), "val_images": len(xva),
            "train_images": len(xtr), "train_seconds": round(time.perf_counter() - start, 1),
            "train_cpu_seconds": round(time.process_time() - cpu0, 1),
            "data_seconds": round(data_s, 1), "recipe": r, "torch": torch.__version__}
    if val_acc < MIN_VAL_ACCURACY:
        warnings.warn(f"{name}: val accuracy {val_acc:.3f} is below {MIN_VAL_ACCURACY}")
    return model.state_dict(), info


_PROGRESS = "EMBEDDED-PROGRESS "


def _main(argv: list[str]) -> int:
    """The child of ``train_isolated``: train ``NAME``, write ``OUT.pt`` and ``OUT.json``."""
    name, out = argv[0], Path(argv[1])

    def report(epoch, epochs, metrics):
        print(_PROGRESS + json.dumps({"epoch": epoch, "epochs": epochs, **metrics}), flush=True)

    state, info = train_embedded(name, report)
    torch.save(state, out)
    out.with_suffix(".json").write_text(json.dumps(info))
    return 0


def train_isolated(name: str, out: Path, progress=None) -> dict:
    """Train ``name`` in a child Python (``_main``) and return its info; weights go to ``out``.

    The child gets ``OMP_WAIT_POLICY=PASSIVE`` and 2 threads: OpenMP's default busy-waiting
    makes CPU training many times slower whenever other processes share the cores, and the
    setting is only read when a process starts. The child also keeps the deterministic-
    algorithms switch out of the caller's process.
    """
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2",
               MKL_NUM_THREADS="2", HARNESS_CACHE_DIR=str(cache_dir()),
               PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    code = "import sys; from harness.data.embedded import _main; sys.exit(_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, name, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(_PROGRESS):
            if progress is not None:
                m = json.loads(line[len(_PROGRESS):])
                progress(m.pop("epoch"), m.pop("epochs"), m)
        else:
            tail = (tail + [line.rstrip()])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(f"training the embedded backbone {name!r} failed "
                           f"(exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(out.with_suffix(".json").read_text())


# ---------------------------------------------------------------- weights cache
def weights_path(name: str) -> Path:
    """Where the embedded weights of ``name`` are cached (the sidecar has suffix .json)."""
    return cache_dir() / "backbones" / f"{name}-v{VERSION}.pt"


def ensure_embedded_weights(name: str, progress=None, isolated: bool = True) -> tuple[Path, dict]:
    """The cached state_dict path and sidecar of ``name``, training it on first use.

    Files are written to temporary names and renamed into place (weights first, sidecar
    last: a sidecar means complete weights). ``isolated=False`` trains in this process.
    """
    path = weights_path(name)
    side = path.with_suffix(".json")
    with file_lock(path.with_suffix(".lock")):
        if not (path.is_file() and side.is_file()):
            for stale in path.parent.glob(f".{path.stem}.*"):   # a killed trainer's (lock held)
                stale.unlink(missing_ok=True)
            fd, tmp_name = temporary_file(path.parent, path.stem, suffix=".pt")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                if isolated:
                    info = train_isolated(name, tmp, progress)
                else:
                    state, info = train_embedded(name, progress)
                    torch.save(state, tmp)
                info["weights_hash"] = state_hash(torch.load(tmp, map_location="cpu",
                                                             weights_only=True))
                os.replace(tmp, path)
                tmp.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
                os.replace(tmp.with_suffix(".json"), side)
            finally:
                for leftover in (tmp, tmp.with_suffix(".json")):
                    if leftover.exists():
                        leftover.unlink()
    return path, json.loads(side.read_text())


