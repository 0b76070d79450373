"""Shared fixtures for the core test suite (registries, backbones, methods, protocol, L-CAM).

Everything runs on CPU with tiny inputs and random-init weights (never a download):
- ``random_backbone(name)``: the registered backbone ``name`` with ``weights=None, seed=0``,
  loaded once per session (VGG-16's random init alone takes ~1.5 s).
- ``tiny_backbone``: a 3-layer ``SplitBackbone`` (K=6 feature channels, R=5 classes) whose
  head is global average pooling + a linear layer, so gradients have a closed form; channel
  4 is always 0 and channel 5 always 0.5 after the ReLU (constant channels).
- ``make_images(b, h, w, seed)``: reproducible images in [0, 1].
- ``smoke_project`` (end-to-end modules): a copy of the project after a user's
  ``python -m harness run jobs/smoke.yaml``, made once per session.
Threads are set to 2 and float32 denormals are flushed to zero (see below).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):     # the package without an install; tests/services.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

torch.set_num_threads(2)
# Random-init backbones push some gradients (e.g. L-CAM-Img training through ResNet-50) into
# float32 denormals, which are 10-100x slower on CPU; flushing them changes values < 1e-38.
torch.set_flush_denormal(True)

import backbones  # noqa: E402
from backbones.base import SplitBackbone  # noqa: E402

TINY_K, TINY_R = 6, 5


def build_tiny_backbone(name: str = "tiny", seed: int = 0, k: int = TINY_K,
                        r: int = TINY_R) -> SplitBackbone:
    """A small frozen CNN: 16x16 input -> A (B, k, 4, 4) -> GAP -> Linear(k, r)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        conv2 = nn.Conv2d(8, k, 3, stride=2, padding=1)
        with torch.no_grad():
            if k >= 6:
                conv2.weight[4:6] = 0.0                # two constant channels ...
                conv2.bias[4] = -1.0                   # ... one always 0 after the ReLU
                conv2.bias[5] = 0.5                    # ... one always 0.5
        body = nn.Sequential(conv1, nn.ReLU(inplace=True), conv2, nn.ReLU(inplace=True))
        fc = nn.Linear(k, r)
        with torch.no_grad():
            fc.weight.mul_(4.0)                        # logits with some spread
        tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)
    return SplitBackbone(name=name, body=body, tail=tail, feature_layer="body.3",
                         feature_channels=k, num_classes=r, weights_id="random-init",
                         input_size=(16, 16))


def images_for(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random images in [0, 1] (a low-res noise field upsampled + fine noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(h // 8, 2), max(w // 8, 2), generator=gen)
    smooth = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    fine = torch.rand(b, 3, h, w, generator=gen)
    return (0.7 * smooth + 0.3 * fine).clamp(0, 1)


@pytest.fixture(scope="session")
def random_backbone():
    """Callable name -> the registered backbone with random init (cached per session)."""
    cache: dict[str, SplitBackbone] = {}

    def get(name: str) -> SplitBackbone:
        if name not in cache:
            cache[name] = backbones.load(name, weights=None, seed=0)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_backbone() -> SplitBackbone:
    return build_tiny_backbone()


@pytest.fixture
def make_images():
    return images_for


def module_hooks(module: nn.Module) -> dict[str, int]:
    """Every runtime hook still registered on ``module`` or any submodule (name -> count)."""
    found = {}
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_forward_pre_hooks_with_kwargs")
    for name, m in module.named_modules():
        for attr in attrs:
            n = len(getattr(m, attr, None) or {})
            if n:
                found[f"{name or '<root>'}.{attr}"] = n
        for pname, p in m.named_parameters(recurse=False):
            if getattr(p, "_backward_hooks", None):
                found[f"{name}.{pname}._backward_hooks"] = len(p._backward_hooks)
    from torch.nn.modules import module as mod
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        n = len(getattr(mod, attr, None) or {})
        if n:
            found[f"torch.nn.modules.module.{attr}"] = n
    return found


class RowCounter:
    """Counts the image rows that reach ``module`` (a forward hook), removable."""

    def __init__(self, module: nn.Module):
        self.rows = 0
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.rows += int(inputs[0].shape[0])
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "RowCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@pytest.fixture(scope="session")
def helpers():
    """Small helpers as a namespace (tests never import conftest directly)."""

    class H:
        hooks = staticmethod(module_hooks)
        RowCounter = RowCounter
        images = staticmethod(images_for)
        tiny = staticmethod(build_tiny_backbone)

    return H


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> dict:
    """One user's smoke run, made once per session for the end-to-end modules: a fresh copy
    of the project (``services.workspace``) in which a user's plain shell
    (``services.user_env``, a fresh HOME) ran ``python -m harness run jobs/smoke.yaml`` as the
    README shows it, with the default cache and MLflow store. The user session of
    ``e2e/test_user_commands.py`` goes on in it (its tests check this run), and
    ``e2e/test_readme_cluster.py`` gives its cluster job's copy the heads this run trained,
    so that the same 8 heads of the same spec train once per session, not twice (training
    heads in a ``ray job submit`` job is ``e2e/test_two_nodes.py``'s).

    {"root": the copy, "home": its user's HOME, "proc": the run's CompletedProcess, "heads":
    the head files it trained (``.harness-cache/heads/<backbone>/*.pt``, not the node-local
    copies its shard tasks received), listed before any later command}.
    """
    import subprocess

    from services import user_env, workspace
    root = workspace(tmp_path_factory.mktemp("user"))
    home = root.parent / "home"
    home.mkdir()
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "jobs/smoke.yaml"],
                          cwd=root, env=user_env(home), capture_output=True, text=True,
                          timeout=600)
    heads = [] if proc.returncode else sorted(
        p for p in (root / ".harness-cache" / "heads").glob("*/*.pt")
        if p.parent.name != "received")
    return {"root": root, "home": home, "proc": proc, "heads": heads}
