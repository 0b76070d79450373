"""Deletion and insertion (harness.metrics.causal, docs/protocol.md 9.5).

A toy backbone whose class-0 probability is a known function of the pixels present gives
hand-computed curves and AUCs (uniform and uneven steps, the raster tie rule); the order of
pixels is checked against ``keep_top``; batching, forward counts, canvases and bad input are
checked; and, where Quantus (an independent implementation of the same perturbation curve,
its ``PixelFlipping``) is installed, the curves agree with it on the same maps.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from harness.metrics import causal
from harness.metrics.protocol import keep_top


class Counting(nn.Module):
    """p(class 0) = (s + 1) / (s + 2) with s = the sum of channel 0 over the image:
    logits (log(s + 1), 0). Counts the images it scores and the largest batch."""

    def __init__(self):
        super().__init__()
        self.images, self.largest = 0, 0

    def forward(self, x):
        self.images += len(x)
        self.largest = max(self.largest, len(x))
        s = x[:, 0].sum(dim=(1, 2))
        return torch.stack([torch.log(s + 1), torch.zeros_like(s)], dim=1)


# channel 0 of a 2 x 2 image holds 1, 2, 3, 4 in raster order; the map ranks pixel 1 first,
# then pixels 2 and 3 tied (the later one, 3, ranks higher), then pixel 0.
IMAGE = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 3, 2, 2).clone()
MAP = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])


def p(s: int) -> Fraction:
    return Fraction(s + 1, s + 2)


def trapezoid(xs, ps) -> float:
    return float(sum((xs[i + 1] - xs[i]) * (ps[i] + ps[i + 1]) / 2 for i in range(len(xs) - 1)))


def test_deletion_by_hand():
    """Removal order: pixel 1 (2), pixel 3 (4), pixel 2 (3), pixel 0 (1); the sums left are
    10, 8, 4, 1, 0."""
    model = Counting()
    curve = causal.probability_curves(model, IMAGE, MAP, torch.tensor([0]), 4, "deletion",
                                      "black")
    want = [p(s) for s in (10, 8, 4, 1, 0)]
    assert curve[0].tolist() == pytest.approx([float(v) for v in want], abs=1e-6)
    auc = causal.deletion(model, IMAGE, MAP, torch.tensor([0]), 4, "black")
    assert auc.tolist() == pytest.approx([trapezoid([Fraction(k, 4) for k in range(5)], want)],
                                         abs=1e-6)
    assert model.images == 2 * 5 == 2 * causal.forward_passes(4)


def test_insertion_by_hand_with_uneven_steps():
    """3 steps on 4 pixels: n_k = ceil(4k / 3) = 0, 2, 3, 4, so x = 0, 1/2, 3/4, 1; inserted
    sums 0, 2 + 4, + 3, + 1."""
    assert causal.step_counts(4, 3) == [0, 2, 3, 4]
    want = [p(s) for s in (0, 6, 9, 10)]
    auc = causal.insertion(Counting(), IMAGE, MAP, torch.tensor([0]), 3, "black")
    xs = [Fraction(0), Fraction(1, 2), Fraction(3, 4), Fraction(1)]
    assert auc.tolist() == pytest.approx([trapezoid(xs, want)], abs=1e-6)


def test_uniform_steps_equal_rise_normalised_auc():
    """When T divides P, x_k = k / T and the area is RISE's (sum - ends / 2) / T."""
    rng = torch.Generator().manual_seed(0)
    curves = torch.rand(3, 9, generator=rng, dtype=torch.float64)
    rise = (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / 8
    assert torch.allclose(causal.area(curves, 64, 8), rise)


def test_order_is_keep_top_s_with_its_tie_rule():
    """The n highest pixels (rank >= P - n) are exactly the pixels phi_nu keeps."""
    g = torch.Generator().manual_seed(1)
    maps = (torch.randint(1, 4, (5, 4, 4), generator=g).float() / 4)    # many ties
    ranks = causal.pixel_ranks(maps)
    for fraction, n in ((0.25, 4), (0.5, 8), (0.75, 12)):
        kept = keep_top(maps, fraction).flatten(1) > 0
        assert torch.equal(ranks >= 16 - n, kept)


def test_batches_are_bounded_and_do_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    images, maps = torch.rand(3, 3, 4, 4, generator=g), torch.rand(3, 4, 4, generator=g)
    results = []
    for batch in (1, 7, 1000):
        model = Counting()
        results.append(causal.deletion(model, images, maps, torch.zeros(3), 5, "blur", batch))
        assert model.largest == min(batch, 3 * 6) and model.images == 3 * 6
    assert torch.allclose(results[0], results[1]) and torch.allclose(results[0], results[2])


def test_canvases():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 20, 20, generator=g)
    flat = torch.full((1, 3, 20, 20), 0.3)
    assert torch.allclose(causal.blur(flat), flat)                      # taps sum to 1
    blurred = causal.blur(images)
    assert blurred.std() < images.std() / 3                             # sigma 5 smooths
    # RISE's insertion substrate is its own gkern(11, 5) blur (tests/metrics/test_rise_canvas.py)
    mean_colour = causal.IMAGENET_MEAN
    assert torch.equal(causal.canvas("insertion", "rise", images),
                       causal.rise_blur(images, mean_colour))
    assert not torch.equal(causal.canvas("insertion", "rise", images), blurred)
    mean = causal.canvas("deletion", "rise", images)
    assert torch.allclose(mean[0, :, 0, 0], torch.tensor(causal.IMAGENET_MEAN))
    assert torch.equal(causal.canvas("deletion", "black", images), torch.zeros_like(images))
    assert torch.equal(causal.canvas("deletion", "blur", images), blurred)
    with pytest.raises(ValueError, match="canvas must be one of"):
        causal.canvas("deletion", "white", images)


def test_degenerate_maps_and_bad_input():
    model = Counting()
    nan_map = torch.full((1, 2, 2), float("nan"))
    zeros = causal.deletion(model, IMAGE, torch.zeros(1, 2, 2), torch.tensor([0]), 4, "black")
    assert torch.equal(causal.deletion(model, IMAGE, nan_map, torch.tensor([0]), 4, "black"), zeros)
    with pytest.raises(ValueError, match="steps must be in"):
        causal.deletion(model, IMAGE, MAP, torch.tensor([0]), 5, "black")
    with pytest.raises(ValueError, match="saliency: expected"):
        causal.deletion(model, IMAGE, MAP[:, :1], torch.tensor([0]), 4, "black")


def test_shard_columns():
    out = causal.shard_columns(Counting(), IMAGE, MAP, torch.tensor([0]), ("insertion",), 4,
                               "black", 64)
    assert set(out) == {"insertion_auc", "insertion_forward_passes"}
    assert out["insertion_forward_passes"] == [5.0]
    assert causal.columns_for(("insertion", "deletion")) == (
        "deletion_auc", "deletion_forward_passes", "insertion_auc", "insertion_forward_passes")


# -- an independent implementation ------------------------------------------------------------
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).eval()


def test_curves_agree_with_quantus_pixel_flipping():
    """Quantus's PixelFlipping replaces, step by step, the most relevant features by a
    baseline and records the class probability after each step: with baseline 0 (black),
    3 features a step (the three channels of one pixel: the maps have distinct values) it is
    our deletion curve p_1..p_T with T = P. On the reversed map (1 - map: Quantus refuses
    negative maps) it removes the least salient pixels first, which is insertion read
    backwards: its step s is our insertion step P - s."""
    quantus = pytest.importorskip("quantus")
    model = small_cnn()
    g = torch.Generator().manual_seed(4)
    images = torch.rand(4, 3, 6, 6, generator=g)
    maps = torch.rand(4, 6, 6, generator=g)
    targets = model(images).argmax(1)
    flip = quantus.PixelFlipping(features_in_step=3, normalise=False, abs=False,
                                 perturb_baseline=0.0, disable_warnings=True)

    def theirs(a) -> np.ndarray:
        return np.asarray(flip(model=model, x_batch=images.numpy(), y_batch=targets.numpy(),
                               a_batch=a[:, None].numpy(), channel_first=True, softmax=True,
                               device="cpu"))

    deletion = causal.probability_curves(model, images, maps, targets, 36, "deletion", "black")
    assert np.allclose(deletion[:, 1:].numpy(), theirs(maps), atol=1e-5)
    insertion = causal.probability_curves(model, images, maps, targets, 36, "insertion", "black")
    assert np.allclose(insertion[:, :-1].flip(1).numpy(), theirs(1 - maps), atol=1e-5)
