"""``evaluation.autocast`` and ``evaluation.channels_last``: the maps stay float32 and close to
the default path (the metric itself is always scored in float32)."""
from __future__ import annotations

import torch

import backbones
import methods
from harness.pipeline.shards import explain_batch
from harness.spec import load_spec
from services import REPO


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_autocast_and_channels_last_keep_maps_close():
    torch.manual_seed(0)
    bb = backbones.load("resnet50", weights=None)
    x = torch.rand(2, 3, 64, 64)
    for name in ("gradcam", "lcam_fm"):
        ex = methods.create(name, bb)
        ref = explain_batch(ex, x, autocast=False)
        low = explain_batch(ex, x, autocast=True)
        assert low.dtype == torch.float32 and low.shape == ref.shape
        assert _corr(low, ref) > 0.95, name
    cl = backbones.load("resnet50", weights=None).to(memory_format=torch.channels_last)
    ex = methods.create("gradcam", cl)
    maps = ex.explain(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(maps, methods.create("gradcam", bb).explain(x), atol=1e-4)


def test_spec_accepts_the_options_and_they_change_the_fingerprint():
    base = load_spec(REPO / "jobs" / "smoke.yaml")
    fast = load_spec(REPO / "jobs" / "smoke.yaml", ["evaluation.autocast=true",
                                                    "evaluation.channels_last=true"])
    assert fast.evaluation.autocast and fast.evaluation.channels_last
    assert not base.evaluation.autocast
    assert base.fingerprint() != fast.fingerprint()
