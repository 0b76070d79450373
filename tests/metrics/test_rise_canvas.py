"""``causal_canvas: rise`` is RISE's evaluation code, exactly (harness.metrics.causal,
docs/protocol.md 9.5).

RISE's ``gkern(11, 5)`` taps are checked against scipy's ``gaussian_filter`` of a delta
(where scipy is installed) and against its printed values; deletion and insertion AUCs are
checked against an oracle written here from RISE's published ``CausalMetric.single_run``
(eclique/RISE, evaluation.py), step for step, on a small random backbone: the image is
normalised first, the substrate computed on the normalised tensor (zeros for deletion,
``conv2d(x, gkern, padding=5)`` for insertion), pixels copied in decreasing saliency order
``step`` at a time and ``(sum - ends / 2) / n_steps`` taken of the softmax scores. The
``blur`` canvas keeps the numbers it gave before RISE's blur was implemented (pinned).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.metrics import causal

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Tiny(nn.Module):
    """A random CNN on [0, 1] images that normalises inside its forward (as the harness's
    backbones do); ``net`` alone takes the normalised tensor, as RISE's model does. The
    logits are scaled so that the probabilities move with the pixels."""

    def __init__(self, seed: int = 0, gain: float = 8.0):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))
        self.gain = gain

    def normalised(self, x):
        return self.gain * self.net(x)

    def forward(self, x):
        return self.normalised((x - self.mean) / self.std)


# -- RISE's code, re-written from its published algorithm ------------------------------------
def gkern(klen: int, nsig: float) -> torch.Tensor:
    """RISE's kernel: a (3, 3, klen, klen) float32 conv2d weight with scipy's
    gaussian_filter of a centred delta on the diagonal channels (ours where scipy is
    missing: its taps are then checked against the printed values only)."""
    try:
        from scipy.ndimage import gaussian_filter
    except ImportError:                                                 # pragma: no cover
        k = causal.rise_kernel(klen, nsig).numpy()
    else:
        inp = np.zeros((klen, klen))
        inp[klen // 2, klen // 2] = 1
        k = gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen))
    for c in range(3):
        kern[c, c] = k
    return torch.from_numpy(kern.astype("float32"))


def rise_auc(arr: np.ndarray) -> float:
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


@torch.no_grad()
def rise_single_run(model: nn.Module, mode: str, step: int, img_tensor: torch.Tensor,
                    explanation: np.ndarray) -> float:
    """``CausalMetric(model, mode, step, substrate_fn).single_run(img_tensor, explanation)``
    with RISE's substrates (deletion: ``torch.zeros_like``, insertion: the gkern(11, 5)
    blur), on the CPU, returning the AUC of its scores. ``model`` ends in a softmax and
    takes the normalised (1, 3, H, W) ``img_tensor``."""
    hw = img_tensor.shape[-2] * img_tensor.shape[-1]
    klen, kern = 11, gkern(11, 5)
    substrate_fn = torch.zeros_like if mode == "del" else \
        (lambda x: nn.functional.conv2d(x, kern, padding=klen // 2))
    pred = model(img_tensor)
    _, c = torch.max(pred, 1)
    c = c.numpy()[0]
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = img_tensor.clone(), substrate_fn(img_tensor)
    else:
        start, finish = substrate_fn(img_tensor), img_tensor.clone()
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        pred = model(start)
        scores[i] = pred[0, c]
        if i < n_steps:
            coords = salient_order[:, step * i:step * (i + 1)]
            start.numpy().reshape(1, 3, hw)[0, :, coords] = \
                finish.numpy().reshape(1, 3, hw)[0, :, coords]
    return rise_auc(scores)


class RiseModel(nn.Module):
    """RISE's ``nn.Sequential(model, nn.Softmax(dim=1))`` on the normalised tensor."""

    def __init__(self, backbone: Tiny):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.normalised(x).softmax(dim=1)


def oracle(backbone: Tiny, mode: str, images: torch.Tensor, maps: torch.Tensor,
           steps: int) -> list[float]:
    """RISE's AUC of each image, ``hw // steps`` pixels a step."""
    model = RiseModel(backbone)
    hw = images.shape[-2] * images.shape[-1]
    return [rise_single_run(model, mode, hw // steps, ((x - backbone.mean) / backbone.std)
                            .contiguous(), m.numpy()) for x, m in zip(images[:, None], maps)]


# -- the taps --------------------------------------------------------------------------------
def test_rise_kernel_taps():
    """scipy's gaussian_filter(delta_11x11, 5): nearly a box (centre 0.00883, corner
    0.00774), summing to 1, symmetric; ours (the blur canvas) is a plain Gaussian."""
    k = causal.rise_kernel()
    assert k.shape == (11, 11) and k.dtype == torch.float64
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0)) and torch.allclose(k, k.flip(1))
    assert round(k[5, 5].item(), 5) == 0.00883 and round(k[0, 0].item(), 5) == 0.00774
    assert k[5, 5].item() == k.max().item() and k[0, 0].item() == k.min().item()
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-r ** 2 / 50)
    g = g / g.sum()
    assert round((g[5] ** 2).item(), 5) == 0.01196 and round((g[0] ** 2).item(), 5) == 0.00440


@pytest.mark.parametrize("taps, sigma", [(11, 5.0), (3, 1.0), (7, 2.0), (4, 3.0), (5, 10.0)])
def test_rise_kernel_is_scipys_gaussian_filter_of_a_delta(taps, sigma):
    """Also where the radius (4 sigma) far exceeds the window: repeated reflection."""
    ndimage = pytest.importorskip("scipy.ndimage")
    delta = np.zeros((taps, taps))
    delta[taps // 2, taps // 2] = 1
    assert np.abs(causal.rise_kernel(taps, sigma).numpy()
                  - ndimage.gaussian_filter(delta, sigma)).max() < 1e-15


def test_rise_blur_is_the_normalised_tensor_zero_padded():
    """mean + conv(X - mean) in pixels = RISE's conv2d(gkern) of the normalised tensor."""
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 20, 20, generator=g)
    model = Tiny()
    normalised = (images - model.mean) / model.std
    theirs = nn.functional.conv2d(normalised, gkern(11, 5), padding=5) * model.std + model.mean
    ours = causal.canvas("insertion", "rise", images, model)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(ours, causal.rise_blur(images, MEAN))
    flat = torch.full((1, 3, 20, 20), 0.3)                  # the border fades to the mean
    blurred = causal.rise_blur(flat, MEAN)
    assert torch.allclose(blurred[..., 8:12, 8:12], flat[..., 8:12, 8:12], atol=1e-6)
    corner = 0.3 + (torch.tensor(MEAN) - 0.3) * (1 - causal.rise_kernel()[5:, 5:].sum())
    assert torch.allclose(blurred[0, :, 0, 0], corner.float(), atol=1e-6)
    assert torch.equal(causal.canvas("deletion", "rise", images, model),
                       model.mean.expand_as(images))


# -- the AUCs against the oracle -------------------------------------------------------------
@pytest.mark.parametrize("size, steps, seed", [(64, 64, 0), (64, 32, 1), (32, 16, 2),
                                               (224, 224, 3)])
def test_auc_equals_rises_causal_metric(size, steps, seed):
    """Insertion and deletion AUCs under ``causal_canvas: rise`` equal RISE's code's, image
    by image (distinct map values: RISE's unstable argsort order is then the same)."""
    g = torch.Generator().manual_seed(seed)
    count = 1 if size == 224 else 3
    images = torch.rand(count, 3, size, size, generator=g)
    maps = torch.rand(count, size, size, generator=g)
    model = Tiny(seed).eval()
    targets = model(images).argmax(1)
    for metric, mode in (("insertion", "ins"), ("deletion", "del")):
        ours = getattr(causal, metric)(model, images, maps, targets, steps, "rise")
        theirs = oracle(model, mode, images, maps, steps)
        assert ours.tolist() == pytest.approx(theirs, abs=1e-6), metric


def test_blur_canvas_keeps_its_numbers():
    """Pinned before RISE's blur was implemented: the ``blur`` canvas (our Gaussian,
    replicate padding) is unchanged, and under ``rise`` only insertion moved."""
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 16, 16, generator=g)
    maps = torch.rand(2, 16, 16, generator=g)
    model = Tiny().eval()
    targets = model(images).argmax(1)
    assert targets.tolist() == [5, 8]
    blurred = causal.blur(images)
    assert blurred[0, 0, 0, :4].tolist() == pytest.approx(
        [0.63667709, 0.60632026, 0.59899241, 0.56912684], abs=1e-7)
    assert blurred[1, 2, 7, 7].item() == pytest.approx(0.49272665, abs=1e-7)
    assert blurred.double().sum().item() == pytest.approx(735.953335, abs=1e-4)
    pinned = {("blur", "insertion"): [0.2970685465, 0.2072120451],
              ("blur", "deletion"): [0.2231739089, 0.1507146016],
              ("rise", "deletion"): [0.1840989199, 0.1432779722]}
    for (kind, metric), want in pinned.items():
        got = getattr(causal, metric)(model, images, maps, targets, 16, kind)
        assert got.tolist() == pytest.approx(want, abs=1e-6), (kind, metric)
    # before: rise insertion was the blur canvas's (0.29707, 0.20721)
    rise = causal.insertion(model, images, maps, targets, 16, "rise")
    assert rise.tolist() == pytest.approx(oracle(model, "ins", images, maps, 16), abs=1e-6)
    assert (rise - torch.tensor(pinned[("blur", "insertion")])).abs().min() > 5e-3
