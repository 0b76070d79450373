"""The AD/IC protocol (docs/protocol.md section 2): golden counts, the tie rule, AD/IC by hand."""
from __future__ import annotations

import math

import pytest
import torch

from harness.metrics import protocol
from harness.metrics.protocol import (PAPER, Evaluator, ProtocolPreset, apply_mask, average_drop,
                              fraction_key, increase_in_confidence, keep_top, kept_count)


# --- kept_count: n = ceil(nu * H * W), exact ------------------------------------------------
def test_golden_kept_counts_at_224():
    assert kept_count(0.5, 224 * 224) == 25_088
    assert kept_count(0.15, 224 * 224) == 7_527          # ceil(7526.4)
    assert kept_count(1.0, 224 * 224) == 50_176
    assert protocol.PAPER_FRACTIONS == (1.0, 0.5, 0.15)


@pytest.mark.parametrize("fraction, pixels, expected", [
    (0.15, 100, 15),        # 0.15 * 100 == 15.000000000000002 in floats: must not round up
    (0.07, 100, 7),         # 7.000000000000001 in floats
    (0.15, 20, 3),
    (0.5, 3, 2),
    (0.3, 10, 3),
    (0.29, 100, 29),
    (1, 7, 7),
])
def test_kept_count_is_exact_decimal_ceil(fraction, pixels, expected):
    assert kept_count(fraction, pixels) == expected


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 15, 85, float("nan")])
def test_kept_count_rejects_fractions_outside_0_1(bad):
    with pytest.raises(ValueError, match="fraction") as err:
        kept_count(bad, 100)
    assert "0.15" in str(err.value)        # the hint: write 0.15 for the top 15%


# --- keep_top (phi_nu) ---------------------------------------------------------------------
def test_keep_top_continuous_map_at_224_keeps_golden_counts_with_soft_values():
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(1, 224, 224, generator=gen)
    for fraction, n in ((0.5, 25_088), (0.15, 7_527)):
        kept = keep_top(v, fraction)
        nz = kept != 0
        assert int(nz.sum()) == n
        assert torch.equal(kept[nz], v[nz])                      # soft values kept as they are
        threshold = torch.sort(v.flatten(), descending=True).values[n - 1]
        assert bool((v[nz] >= threshold).all())                  # exactly the top n
        assert bool((v[~nz] <= threshold).all())
    assert torch.equal(keep_top(v, 1.0), v)


def test_keep_top_tie_rule_constant_map_at_224_drops_first_pixels_in_raster_order():
    v = torch.full((1, 224, 224), 0.5)
    half = keep_top(v, 0.5)[0]
    assert int((half > 0).sum()) == 25_088
    assert bool((half[:112] == 0).all()) and bool((half[112:] == 0.5).all())   # bottom half kept
    top15 = keep_top(v, 0.15)[0]
    # 7,527 = 33 full rows + 135 pixels: rows 191..223 and the last 135 pixels of row 190.
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[191:] = True
    expected[190, 224 - 135:] = True
    assert torch.equal(top15 > 0, expected)


def test_keep_top_tie_rule_on_quantised_map_hand_example():
    v = torch.tensor([[[0.2, 1.0, 0.6, 0.6],
                       [0.6, 0.0, 0.6, 0.6],
                       [1.0, 0.6, 0.3, 0.6]]])                    # 12 pixels
    # 50% -> n = 6: the two 1.0 are kept; 4 of the seven tied 0.6 are kept, the first
    # three in raster order ((0,2), (0,3), (1,0)) are dropped.
    expected = torch.tensor([[[0, 1.0, 0, 0],
                              [0, 0, 0.6, 0.6],
                              [1.0, 0.6, 0, 0.6]]])
    assert torch.equal(keep_top(v, 0.5), expected)
    # 25% -> n = 3: both 1.0 and the last 0.6 in raster order.
    expected = torch.zeros_like(v)
    expected[0, 0, 1] = expected[0, 2, 0] = 1.0
    expected[0, 2, 3] = 0.6
    assert torch.equal(keep_top(v, 0.25), expected)


def test_keep_top_quantised_224_map_levels_and_raster_ties():
    # 8-level quantised map: the kept set is all pixels above the threshold level plus the
    # *last* tied pixels in raster order.
    gen = torch.Generator().manual_seed(3)
    v = (torch.randint(0, 8, (2, 224, 224), generator=gen).float() / 7)
    for fraction, n in ((0.5, 25_088), (0.15, 7_527)):
        kept = keep_top(v, fraction)
        for b in range(2):
            flat, kflat = v[b].flatten(), kept[b].flatten()
            assert int((kflat > 0).sum()) == n
            t = torch.sort(flat, descending=True).values[n - 1]
            above = flat > t
            tied = torch.nonzero(flat == t).flatten()
            n_tied_kept = n - int(above.sum())
            want = above.clone()
            want[tied[len(tied) - n_tied_kept:]] = True
            assert torch.equal(kflat > 0, want)


def test_keep_top_zero_pixels_are_not_kept_when_fewer_positives_than_n():
    v = torch.zeros(1, 10, 10)
    v[0, 3, 4], v[0, 7, 7], v[0, 0, 0] = 0.9, 0.4, 0.1               # 3 positive pixels
    kept = keep_top(v, 0.5)                                          # n = 50
    assert int((kept > 0).sum()) == 3
    assert torch.equal(kept, v)
    assert int((keep_top(torch.zeros(1, 8, 8), 0.15) > 0).sum()) == 0


def test_keep_top_is_per_sample_in_a_batch():
    gen = torch.Generator().manual_seed(1)
    low = torch.rand(1, 32, 32, generator=gen) * 0.1                # all below ...
    high = 0.5 + torch.rand(1, 32, 32, generator=gen) * 0.5         # ... every pixel of this
    batch = torch.cat([low, high, low.flip(-1)])
    for fraction in (0.5, 0.15):
        kept = keep_top(batch, fraction)
        n = kept_count(fraction, 32 * 32)
        assert [int((k > 0).sum()) for k in kept] == [n, n, n]
        for b in range(3):
            assert torch.equal(kept[b:b + 1], keep_top(batch[b:b + 1], fraction))


def test_keep_top_rejects_wrong_rank():
    with pytest.raises(ValueError, match="saliency"):
        keep_top(torch.rand(1, 1, 8, 8), 0.5)


# --- AD / IC by hand ------------------------------------------------------------------------
def test_average_drop_and_increase_in_confidence_hand_computed():
    y = torch.tensor([0.5, 0.2, 0.0, 0.4, 0.8])
    o = torch.tensor([0.25, 0.3, 0.1, 0.4, 0.0])
    # drops: 0.25/0.5 = 0.5; O > Y -> 0; Y = 0 -> 0; equal -> 0; 0.8/0.8 = 1  => 1.5 / 5
    assert average_drop(y, o) == pytest.approx(100 * 1.5 / 5)
    # strict >: only (0.2 -> 0.3) and (0.0 -> 0.1); the equal pair does not count
    assert increase_in_confidence(y, o) == pytest.approx(100 * 2 / 5)


def test_ic_is_strict_and_ad_is_zero_for_identical_scores():
    y = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    assert increase_in_confidence(y, y.clone()) == 0.0
    assert average_drop(y, y.clone()) == 0.0
    assert increase_in_confidence(y, y + 1e-9) == 100.0


def test_ad_with_all_zero_clean_scores_is_zero_not_nan():
    y = torch.zeros(3)
    o = torch.tensor([0.0, 0.5, 0.0])
    assert average_drop(y, o) == 0.0
    assert increase_in_confidence(y, o) == pytest.approx(100 / 3)


def test_ad_ic_accept_lists_and_empty_gives_nan():
    assert average_drop([1.0, 0.5], [0.5, 0.5]) == pytest.approx(25.0)
    assert math.isnan(average_drop([], []))
    assert math.isnan(increase_in_confidence([], []))


def test_fraction_keys():
    assert [fraction_key(f) for f in (1.0, 0.5, 0.15, 0.025)] == ["100", "50", "15", "2.5"]


def test_preset_rejects_unknown_fill_and_score():
    with pytest.raises(ValueError, match="fill"):
        ProtocolPreset(fill="grey")
    with pytest.raises(ValueError, match="score"):
        ProtocolPreset(score="softmax")
    assert PAPER.as_dict() == {"name": "paper", "soft": True, "fill": "black", "score": "prob"}


# --- masking --------------------------------------------------------------------------------
class SpyBackbone(torch.nn.Module):
    """Records what it is fed; logits = per-channel mean of the (normalised) input."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.25, 0.75]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.5, 0.5, 0.25]).view(1, 3, 1, 1))
        self.seen = []

    def normalize(self, x):
        return (x - self.mean) / self.std

    def forward_normalized(self, z):
        self.seen.append(z.clone())
        return z.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_normalized(self.normalize(x))


def test_apply_mask_black_fill_soft_values_in_pixel_space():
    bb = SpyBackbone()
    x = torch.rand(2, 3, 4, 4)
    kept = torch.zeros(2, 4, 4)
    kept[0, 0, 0], kept[1, 3, 3] = 0.5, 1.0
    apply_mask(bb, x, kept, PAPER)
    pix = bb.seen[-1] * bb.std + bb.mean                     # back to pixel space
    assert torch.allclose(pix, x * kept[:, None], atol=1e-6)  # removed pixels are black (0)
    assert torch.allclose(pix[0, :, 0, 0], 0.5 * x[0, :, 0, 0], atol=1e-6)


def test_apply_mask_binary_and_mean_fill_presets():
    bb = SpyBackbone()
    x = torch.rand(1, 3, 4, 4)
    kept = torch.zeros(1, 4, 4)
    kept[0, 1, 2] = 0.25
    apply_mask(bb, x, kept, ProtocolPreset(name="binary", soft=False))
    pix = bb.seen[-1] * bb.std + bb.mean
    assert torch.allclose(pix, x * (kept > 0).float()[:, None], atol=1e-6)
    apply_mask(bb, x, kept, ProtocolPreset(name="mean", fill="mean"))
    z = bb.seen[-1]
    assert torch.allclose(z, bb.normalize(x) * kept[:, None], atol=1e-6)
    assert float(z[0, :, 0, 0].abs().max()) == 0.0           # removed = the mean colour


# --- the Evaluator on a real (tiny) backbone -----------------------------------------------
def test_evaluator_scores_match_hand_computation(tiny_backbone, make_images):
    bb = tiny_backbone
    x = make_images(3, 16, 16, seed=5)
    gen = torch.Generator().manual_seed(2)
    sal = torch.rand(3, 16, 16, generator=gen)
    targets = torch.tensor([0, 3, 1])
    ev = Evaluator(bb)
    res = ev.evaluate(x, sal, targets)
    with torch.no_grad():
        y = bb(x).softmax(1)[torch.arange(3), targets]
        o15 = bb(x * keep_top(sal, 0.15)[:, None]).softmax(1)[torch.arange(3), targets]
        o100 = bb(x * sal[:, None]).softmax(1)[torch.arange(3), targets]
    assert res.o.shape == (3, 3) and res.fractions == (1.0, 0.5, 0.15)
    assert torch.allclose(res.y, y, atol=1e-6)
    assert torch.allclose(res.o[:, 0], o100, atol=1e-6)
    assert torch.allclose(res.o[:, 2], o15, atol=1e-6)
    assert res.degenerate.tolist() == [False, False, False]
    summary = Evaluator.summarise(res.y, res.o, res.fractions)
    assert set(summary) == {"AD_100", "IC_100", "AD_50", "IC_50", "AD_15", "IC_15"}
    assert summary["AD_15"] == pytest.approx(average_drop(y, o15), abs=1e-4)
    assert summary["IC_15"] == pytest.approx(increase_in_confidence(y, o15))


def test_evaluator_batch_equals_one_by_one_and_defaults_to_top1(tiny_backbone, make_images):
    bb = tiny_backbone
    x = make_images(4, 16, 16, seed=6)
    sal = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(4))
    ev = Evaluator(bb, fractions=(0.5, 0.15))
    res = ev.evaluate(x, sal)
    assert torch.equal(res.targets, bb(x).argmax(1))
    for b in range(4):
        one = ev.evaluate(x[b:b + 1], sal[b:b + 1])
        assert torch.allclose(one.o, res.o[b:b + 1], atol=1e-6)
        assert torch.allclose(one.y, res.y[b:b + 1], atol=1e-6)


def test_evaluator_degenerate_maps_are_zeros_and_counted(tiny_backbone, make_images):
    bb = tiny_backbone
    x = make_images(3, 16, 16, seed=7)
    sal = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    sal[1] = 0.7                                           # constant
    sal[2, 0, 0] = float("nan")                            # non-finite
    res = Evaluator(bb).evaluate(x, sal, torch.tensor([1, 1, 1]))
    assert res.degenerate.tolist() == [False, True, True]
    with torch.no_grad():
        black = bb(torch.zeros(1, 3, 16, 16)).softmax(1)[0, 1]
    assert torch.allclose(res.o[1:], black.expand(2, 3), atol=1e-6)   # all zeros -> black image
    assert len(res.y) == 3                                            # never dropped


def test_evaluator_rejects_bad_saliency_shape_and_fraction(tiny_backbone):
    with pytest.raises(ValueError, match="saliency"):
        Evaluator(tiny_backbone).evaluate(torch.rand(2, 3, 16, 16), torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="0.15"):
        Evaluator(tiny_backbone, fractions=(1.0, 15))


def test_evaluate_explainer_merges_the_explainers_degenerate_flags(tiny_backbone, make_images):
    class Fake:
        last_degenerate = torch.tensor([False, True])

        def explain(self, images, targets=None):
            # Both maps vary, so the evaluator alone flags neither: the True can only come
            # from the explainer's own flag (e.g. a map it normalised from NaN or a constant).
            return torch.rand(len(images), *images.shape[-2:],
                              generator=torch.Generator().manual_seed(0))

    x = make_images(2, 16, 16, seed=8)
    assert Evaluator(tiny_backbone).evaluate(x, Fake().explain(x)).degenerate.tolist() == \
        [False, False]
    res = Evaluator(tiny_backbone).evaluate_explainer(Fake(), x, torch.tensor([0, 2]))
    assert res.degenerate.tolist() == [False, True]
    assert res.targets.tolist() == [0, 2]


def test_evaluate_explainer_scores_y_on_the_explainers_clean_pass(tiny_backbone, make_images,
                                                                   helpers):
    """Same numbers as a fresh clean pass, one backbone pass fewer per image: explain (1) +
    the masked images (one per fraction), no second clean pass."""
    import methods
    x = make_images(3, 16, 16, seed=9)
    explainer = methods.create("gradcam", tiny_backbone)
    ev = Evaluator(tiny_backbone)
    with helpers.RowCounter(tiny_backbone.body) as rows:
        reused = ev.evaluate_explainer(explainer, x)
    assert rows.rows == 3 * (1 + len(ev.fractions))
    fresh = ev.evaluate(x, explainer.explain(x))
    for k in ("targets", "y", "o", "degenerate"):
        assert torch.equal(getattr(reused, k), getattr(fresh, k)), k
