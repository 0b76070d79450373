"""The ``reference`` variants against the L-CAM authors' code, written out here by hand.

- Grad-CAM++: the authors' (yiskw713's) guarded denominator ``where(den != 0, den, 1) + 1e-7``
  on a head that is *not* global average pooling, at the small probability gradients of real
  networks (|g| ~ 1e-4), where it cannot be told apart from the exact division only by luck;
  and float32 powers under bf16 autocast.
- RISE: masks upsampled as scikit-image's ``resize(order=1, mode='reflect')`` (mirror borders),
  against a direct per-pixel interpolation written here (and scikit-image itself when
  installed); the ``paper`` masks are unchanged (clamped, hash pinned).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods
import methods.gradcampp as gradcampp
from backbones.base import SplitBackbone
from methods.base import minmax
from methods.rise import MaskSet, mirror_resize_matrix


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


# -- Grad-CAM++ -------------------------------------------------------------------------------
def flat_head_backbone(k: int = 16, r: int = 100, seed: int = 0, scale: float = 0.01):
    """A frozen CNN whose head is Flatten + Linear over every (k, i, j) of A (4 x 4): the
    gradient of a class varies over the map (unlike global average pooling), and small
    weights over 100 classes give probability gradients |g| ~ 1e-4."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, k, 3, stride=2, padding=1), nn.ReLU())
        fc = nn.Linear(k * 16, r)
        with torch.no_grad():
            fc.weight.mul_(scale / fc.weight.abs().mean())
        tail = nn.Sequential(nn.Flatten(1), fc)
    return SplitBackbone(name="flat_head", body=body, tail=tail, feature_layer="body.3",
                         feature_channels=k, num_classes=r, weights_id="random-init",
                         input_size=(16, 16))


def authors_gradcampp(bb, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """yiskw713's GradCAMpp on the network ending in a Softmax, per image (as the authors
    ran it), then CAM-style normalisation; exp(p_c) is a per-image constant (min-max)."""
    maps = []
    for b in range(len(x)):
        with torch.enable_grad():
            a = bb.features(x[b:b + 1]).detach().requires_grad_(True)
            p = bb.head(a).softmax(dim=1)[0, int(targets[b])]
            (g,) = torch.autograd.grad(p, a)
        numerator = g ** 2
        denominator = 2 * g ** 2 + (a.detach() * g ** 3).sum(dim=(2, 3), keepdim=True)
        denominator = torch.where(denominator != 0.0, denominator, torch.ones_like(denominator))
        alpha = numerator / (denominator + 1e-7)
        weights = (alpha * F.relu(p.detach().exp() * g)).sum(dim=(2, 3), keepdim=True)
        maps.append(F.relu((weights * a.detach()).sum(dim=1))[0])
    raw = torch.stack(maps)
    return F.interpolate(minmax(raw)[0][:, None], size=x.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0].clamp(0, 1)


def test_gradcampp_reference_is_the_authors_formula_at_small_gradients(helpers):
    bb = flat_head_backbone()
    x = helpers.images(3, 16, 16, seed=31)
    with torch.no_grad():
        targets = bb(x).argmax(1)
    g = gradcampp.head_gradients(bb, bb.features(x), targets, "prob")
    assert 1e-5 < float(g.abs().mean()) < 1e-3                  # |g| ~ 1e-4, as on ImageNet
    ours = methods.create("gradcampp", bb, variant="reference").explain(x, targets)
    want = authors_gradcampp(bb, x, targets)
    assert torch.allclose(ours, want, atol=1e-5)
    # the test can tell: the exact division (no 1e-7) gives other maps here
    feats = bb.features(x)
    g2, g3 = gradcampp.powers(g)
    exact = torch.where(g2 != 0, g2 / (2 * g2 + (feats * g3).sum(dim=(2, 3), keepdim=True)), 0)
    raw = torch.relu(((exact * torch.relu(g)).sum(dim=(2, 3), keepdim=True) * feats).sum(1))
    exact_maps = F.interpolate(minmax(raw)[0][:, None], size=(16, 16), mode="bilinear",
                               align_corners=False)[:, 0]
    assert min(corr(exact_maps[b], ours[b]) for b in range(3)) < 0.999


def test_gradcampp_reference_alpha_by_hand():
    g = torch.tensor([0.0, 1e-4, -2e-4, 3.0]).view(1, 4, 1, 1)
    a = torch.tensor([1.0, 2.0, 0.5, 1.0]).view(1, 4, 1, 1)
    g2, g3 = gradcampp.powers(g)
    got = gradcampp.alpha_reference(g2, g3, a).flatten().tolist()
    # g = 0: den 0 -> 1, alpha 0; else g^2 / (2 g^2 + a g^3 + 1e-7)
    want = [0.0] + [v * v / (2 * v * v + w * v ** 3 + 1e-7)
                    for v, w in ((1e-4, 2.0), (-2e-4, 0.5), (3.0, 1.0))]
    assert got == pytest.approx(want, rel=1e-5)
    assert got[1] == pytest.approx(1e-8 / (2e-8 + 2e-12 + 1e-7), rel=1e-5)     # ~0.083, not 1/2


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_gradcampp_powers_are_float32_under_bf16_autocast(variant, helpers, monkeypatch):
    bb = flat_head_backbone()
    x = helpers.images(3, 16, 16, seed=32)
    seen = []
    real = gradcampp.powers

    def spy(g):
        g2, g3 = real(g)
        seen.append((g.dtype, g2.dtype, g3.dtype))
        return g2, g3

    monkeypatch.setattr(gradcampp, "powers", spy)
    targets = bb(x).argmax(1)          # the same classes (near-tied logits may swap in bf16)
    low = methods.create("gradcampp", bb.with_autocast(torch.bfloat16), variant=variant)
    maps_low = low.explain(x, targets)
    maps = methods.create("gradcampp", bb, variant=variant).explain(x, targets)
    assert seen and all(d == (torch.float32,) * 3 for d in seen), seen
    assert maps_low.dtype == torch.float32
    assert min(corr(maps_low[b], maps[b]) for b in range(3)) >= 0.99
    # a float16 gradient of these sizes would lose g^3 entirely: why the powers are float32
    g = gradcampp.head_gradients(bb, bb.features(x), targets, "prob")
    assert float((g.half() ** 3).abs().max()) == 0.0 and float((real(g.half())[1]).abs().max()) > 0


# -- RISE ---------------------------------------------------------------------------------------
def mirror_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """scikit-image's resize(order=1, mode='reflect') written out pixel by pixel: sample the
    input at ((i + 0.5) * in / out - 0.5, ...), reflect an outside coordinate about the edge
    cell, interpolate linearly between the two neighbouring cells on each axis."""
    def source(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        x = (i + 0.5) * n_in / n_out - 0.5
        if x < 0:
            x = -x
        if x > n_in - 1:
            x = 2 * (n_in - 1) - x
        lo = int(math.floor(x))
        return lo, min(lo + 1, n_in - 1), x - lo

    h, w = grid.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y0, y1, fy = source(i, h, out_h)
        for j in range(out_w):
            x0, x1, fx = source(j, w, out_w)
            top = (1 - fx) * grid[y0, x0] + fx * grid[y0, x1]
            bottom = (1 - fx) * grid[y1, x0] + fx * grid[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def test_rise_reference_masks_are_mirror_mode_bilinear():
    ms = MaskSet(6, 7, 0.5, (224, 224), seed=0, upsample="mirror")
    up = ms.upsampled(0, 6)
    masks = ms.batch(0, 6)
    assert up.shape == (6, 256, 256)
    for i in range(6):
        want = mirror_bilinear(ms.grids[i, 0].numpy(), 256, 256)
        assert np.abs(up[i].numpy() - want).max() < 1e-5
        dy, dx = ms.shifts[i].tolist()
        assert torch.equal(masks[i], up[i, dy:dy + 224, dx:dx + 224])
    # the paper masks (clamped) agree inside and differ in the outer half cell (0-17, 238-255)
    paper = MaskSet(6, 7, 0.5, (224, 224), seed=0)
    clamped = paper.upsampled(0, 6)
    assert torch.equal(paper.grids, ms.grids) and torch.equal(paper.shifts, ms.shifts)
    diff = (clamped - up).abs()
    assert float(diff[:, 18:238, 18:238].max()) < 1e-6
    assert float(diff[:, :18].max()) > 0.1 and float(diff[:, :, 238:].max()) > 0.1
    assert ms.hash != paper.hash


@pytest.mark.parametrize("n_in, n_out", [(7, 256), (4, 9), (2, 7), (5, 5), (3, 40)])
def test_mirror_resize_matrix_by_hand_and_against_scikit_image(n_in, n_out):
    grid = np.random.default_rng(n_in * 100 + n_out).random((n_in, n_in)).astype(np.float32)
    w = mirror_resize_matrix(n_in, n_out)
    assert torch.allclose(w.sum(1), torch.ones(n_out))           # rows are interpolation weights
    ours = (w @ torch.from_numpy(grid) @ w.T).numpy()
    assert np.abs(ours - mirror_bilinear(grid, n_out, n_out)).max() < 1e-5
    transform = pytest.importorskip("skimage.transform")
    theirs = transform.resize(grid, (n_out, n_out), order=1, mode="reflect", anti_aliasing=False)
    assert np.abs(ours - theirs).max() < 1e-5


def test_rise_paper_masks_and_hash_unchanged():
    ms = MaskSet(20, 7, 0.5, (224, 224), seed=0)
    assert ms.hash == "3caab9c7c4072cc8"                      # the value before this variant
    i = 5
    up = F.interpolate(ms.grids[i:i + 1], size=(256, 256), mode="bilinear",
                       align_corners=False)[0, 0]
    dy, dx = ms.shifts[i].tolist()
    assert torch.equal(ms.batch(i, i + 1)[0], up[dy:dy + 224, dx:dx + 224])


def test_rise_variants_use_their_masks(tiny_backbone, helpers):
    bb = tiny_backbone
    x = helpers.images(2, 16, 16, seed=3)
    t = torch.tensor([1, 3])
    for variant, mode in (("paper", "clamp"), ("reference", "mirror")):
        ex = methods.create("rise", bb, variant=variant, n_masks=12, cell=4, seed=2,
                            batch_size=5)
        got = ex.explain(x, t)
        masks = MaskSet(12, 4, 0.5, (16, 16), 2, mode).batch(0, 12)
        with torch.no_grad():
            want = [(bb.forward_normalized(bb.normalize(x[b:b + 1]) * masks[:, None])
                     .softmax(1)[:, t[b], None, None] * masks).sum(0) / 6 for b in range(2)]
        assert torch.allclose(got, minmax(torch.stack(want))[0], atol=1e-5), variant
        assert ex.describe()["rise_mask_hash"] == MaskSet(12, 4, 0.5, (16, 16), 2, mode).hash
