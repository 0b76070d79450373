"""Two small backbones trained offline on the quickstart data: ``tiny_vgg`` and ``tiny_resnet``.

They let the whole benchmark run on a laptop CPU, offline, in minutes, with the same split
contract as the paper's networks (``SplitBackbone``; images in [0, 1], ImageNet mean/std
normalisation inside; 64x64 inputs; the 10 classes of ``harness.quickstart.CLASSES``):

- ``tiny_vgg`` mirrors VGG-16 (in its ``vgg16_bn`` form: from scratch, plain VGG stacks
  train too slowly for the time budget): 3x3 conv-BN-ReLU stacks with 2x2 max-pools.
  A = ``features.20`` (the ReLU after the last conv, before the last max-pool), 8x8x128;
  the head is that max-pool, a global max-pool and an MLP classifier with Dropout, as
  VGG-16's ``features[30:]``, ``avgpool`` and ``classifier``.
- ``tiny_resnet`` mirrors ResNet: a 3x3 conv-BN-ReLU stem with a max-pool, then three stages
  of torchvision ``BasicBlock`` residual blocks (16, 32, 64 channels). A = ``layer3``
  output, 8x8x64; the head is global average pooling and ``fc``.

Weights: ``"embedded"`` (the default) trains the network on the quickstart train split on first
use and caches its state_dict in ``cache_dir()/backbones/<name>-v1.pt`` with a JSON sidecar
``<name>-v1.json`` recording the val accuracy measured on the 500 held-out images, the
training time and the recipe; later loads reuse the files (``bb.weights_info`` is the
sidecar). Training is plain torch (``RECIPES``: AdamW, one-cycle schedule, batch 32, a few
epochs), seeded and deterministic (``torch.use_deterministic_algorithms``, 2 threads), with
light augmentation: random shifts of up to 3 pixels, no flips, so that the quickstart's
planted cue stays in its corner. It runs in a child process (``train_isolated``) and takes
well under a minute on two idle cores. A state_dict path, or ``None`` (random init, seeded),
are accepted too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, conv1x1

from harness.paths import cache_dir

from .base import IMAGENET_MEAN, IMAGENET_STD, SplitBackbone
from .registry import REGISTRY, WeightsError

VERSION = 1
INPUT_SIZE = 64
NUM_CLASSES = 10
MIN_VAL_ACCURACY = 0.95

# Training recipes (changing one changes the cached weights: bump VERSION).
RECIPES = {
    "tiny_vgg": {"epochs": 4, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
                 "weight_decay": 5e-4, "schedule": "onecycle", "pct_start": 0.25, "shift": 3,
                 "seed": 0, "threads": 2},
    "tiny_resnet": {"epochs": 6, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3,
                    "weight_decay": 5e-4, "schedule": "onecycle", "pct_start": 0.25, "shift": 3,
                    "seed": 0, "threads": 2},
}


def _class_names() -> list[str]:
    from harness.quickstart import CLASSES
    return list(CLASSES)


# ---------------------------------------------------------------- architectures
def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class TinyVGG(nn.Module):
    """VGG-style (as torchvision's ``vgg*_bn``): ``features``, ``pool``, ``classifier``.

    ``features``: 3x3 conv-BN-ReLU stacks of 16, 32, 64-64 and 128-128 channels, each stack
    but the last followed by a 2x2 max-pool; then the final max-pool (index 21). A is the ReLU
    after the last conv (``features.20``), 8x8x128 at 64x64 input. The head is the final
    max-pool, a global max-pool and the MLP ``classifier`` with Dropout.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 16), nn.MaxPool2d(2),                          # 0-3    64 -> 32
            *_conv_bn(16, 32), nn.MaxPool2d(2),                         # 4-7    32 -> 16
            *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),      # 8-14   16 -> 8
            *_conv_bn(64, 128), *_conv_bn(128, 128),                    # 15-20  A: 8x8x128
            nn.MaxPool2d(2),                                            # 21     8 -> 4
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(128, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class TinyResNet(nn.Module):
    """ResNet-style: ``conv1/bn1/relu/maxpool`` stem, ``layer1..3`` of BasicBlocks, ``fc``.

    Widths 16, 32, 64; ``layer2`` and ``layer3`` stride 2. A = ``layer3`` output, 8x8x64 at
    64x64 input. The head is global average pooling and ``fc``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)                                          # 64 -> 32
        self.layer1 = self._stage(widths[0], widths[0], 1)                      # 32
        self.layer2 = self._stage(widths[0], widths[1], 2)                      # 16
        self.layer3 = self._stage(widths[1], widths[2], 2)                      # 8: A
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


ARCHS = {"tiny_vgg": TinyVGG, "tiny_resnet": TinyResNet}


# name -> (feature layer, K)
SPLITS = {"tiny_vgg": ("features.20", 128), "tiny_resnet": ("layer3", 64)}


def _split(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    if name == "tiny_vgg":
        body = model.features[:21]
        tail = nn.Sequential(*model.features[21:], model.pool, nn.Flatten(1), model.classifier)
        return body, tail
    body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1,
                         model.layer2, model.layer3)
    return body, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)


# ---------------------------------------------------------------- training
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
    from harness.data import build_dataset
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
    from harness.quickstart import NAME, ensure_quickstart, read_marker
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
    code = "import sys; from backbones.embedded import _main; sys.exit(_main(sys.argv[1:]))"
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


def state_hash(state: dict) -> str:
    """16 hex digits of SHA-256 over a state_dict's names, dtypes, shapes and values.

    (The bytes of a ``torch.save`` file differ between saves of equal tensors.)
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def ensure_embedded_weights(name: str, progress=None, isolated: bool = True) -> tuple[Path, dict]:
    """The cached state_dict path and sidecar of ``name``, training it on first use.

    Files are written to temporary names and renamed into place (weights first, sidecar
    last: a sidecar means complete weights). ``isolated=False`` trains in this process.
    """
    path = weights_path(name)
    side = path.with_suffix(".json")
    from harness.quickstart import file_lock
    with file_lock(path.with_suffix(".lock")):
        if not (path.is_file() and side.is_file()):
            for stale in path.parent.glob(f".{path.stem}.*"):   # a killed trainer's (lock held)
                stale.unlink(missing_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt",
                                            dir=path.parent)
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


# ---------------------------------------------------------------- registry entries
def _build(name: str, weights, seed: int, progress) -> SplitBackbone:
    info: dict = {}
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ARCHS[name]()
        wid = "random-init"
    else:
        if weights == "embedded":
            path, info = ensure_embedded_weights(name, progress)
            wid = f"embedded:{path.stem}:{info.get('weights_hash', '')}"
        else:
            path = Path(str(weights)).expanduser()
            if not path.is_file():
                raise WeightsError(f"weights: {str(weights)!r} is neither 'embedded' nor an "
                                   "existing state_dict file. Use 'embedded' (trained on the "
                                   "quickstart data on first use), a file path, or null for "
                                   "random init.")
            side = path.with_suffix(".json")
            info = json.loads(side.read_text()) if side.is_file() else {}
            wid = f"file:{path.name}"
        model = ARCHS[name]()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise WeightsError(f"weights: {str(path)!r} is not a {name} state_dict: "
                               f"{str(err).splitlines()[0]}") from None
    body, tail = _split(name, model)
    layer, k = SPLITS[name]
    bb = SplitBackbone(name=name, body=body, tail=tail, feature_layer=layer,
                       feature_channels=k, num_classes=NUM_CLASSES, weights_id=wid,
                       input_size=(INPUT_SIZE, INPUT_SIZE), class_names=_class_names())
    bb.weights_info = info
    return bb


_META = dict(family="embedded", input_size=(INPUT_SIZE, INPUT_SIZE), num_classes=NUM_CLASSES,
             dataset="quickstart-v1", default_weights="embedded", version=VERSION,
             min_val_accuracy=MIN_VAL_ACCURACY)


@REGISTRY.register("tiny_vgg", paper="VGG-style (Simonyan & Zisserman 2015), embedded",
                   feature_layer="features.20", feature_shape=(128, 8, 8), **_META)
def tiny_vgg(weights="embedded", seed: int = 0, progress=None) -> SplitBackbone:
    """VGG-style embedded backbone (A = features.20, 8x8x128); see the module doc."""
    return _build("tiny_vgg", weights, seed, progress)


@REGISTRY.register("tiny_resnet", paper="ResNet-style (He et al. 2016), embedded",
                   feature_layer="layer3", feature_shape=(64, 8, 8), **_META)
def tiny_resnet(weights="embedded", seed: int = 0, progress=None) -> SplitBackbone:
    """ResNet-style embedded backbone (A = layer3, 8x8x64); see the module doc."""
    return _build("tiny_resnet", weights, seed, progress)

