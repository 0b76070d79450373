"""ROAD (harness.metrics.road) against pytorch-grad-cam's ROAD as an independent oracle.

pytorch-grad-cam 1.5.7 (``pytorch_grad_cam.metrics.road``; its imputer is the authors'
road_evaluation code) is used here as a test oracle only, never by the product. Its
conventions, read from its source:

- ``RemoveMostRelevantFirst(p)`` removes the pixels with V >= np.percentile(V, p), i.e. a
  share 1 - p/100 (``RemoveLeastRelevantFirst`` does the same on 1 - V): our share q is
  its percentile p = 100 (1 - q), in both orderings;
- its count is P - ceil(p/100 (P - 1)) for distinct map values, ours ceil(q P): equal at the
  shares used for the exact comparisons below (checked first), one pixel fewer there at 70%
  and 90% of 16 x 16 (``test_counts_differ_by_one_pixel_where_documented``);
- ``NoisyLinearImputer`` adds its noise to the model's input tensor with the global RNG:
  ``noise=0`` on both sides for the comparisons;
- ``PerturbationConfidenceMetric`` returns score changes against the clean image by default
  (``return_diff=False``: the scores themselves); ``ROADCombined`` = (LeRF - MoRF) / 2 of the
  changes, where the clean score cancels.

Maps are permutations of k / P (distinct, exact in float32, as are 1 - k / P: no ties on
either side). The model is the conformance kit's tiny CNN (16 x 16 input, normalisation
inside), fed the same [0, 1] tensors on both sides.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from harness.metrics import registry
from harness.metrics.base import Batch, declaration_problems
from harness.metrics.road import ROAD, ROADSettings, impute, removed_pixels, road_scores
from harness.testing import tiny_backbone

gradcam_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
from pytorch_grad_cam.metrics.perturbation_confidence import (  # noqa: E402
    PerturbationConfidenceMetric, RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget, ClassifierOutputTarget)

NoisyLinearImputer = gradcam_road.NoisyLinearImputer
REMOVERS = {"morf": RemoveMostRelevantFirst, "lerf": RemoveLeastRelevantFirst}
#: shares whose removed counts are the same under both rules at 16 x 16 (256 pixels)
EXACT_16 = (0.1, 0.2, 0.3, 0.5, 0.8)
#: ... at 32 x 32 (1024 pixels)
EXACT_32 = (0.1, 0.2, 0.4, 0.5, 0.7)


def percentile(share: float) -> int:
    """pytorch-grad-cam's percentile for our removed share (an integer, as it is written)."""
    return round(100 * (1 - share))


def distinct_maps(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(h * w, generator=g).float().view(h, w) / (h * w)
                        for _ in range(b)])


def images_for(b: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


class Spy:
    """A noise-free ``NoisyLinearImputer`` that keeps the masks it is given (1 = kept)."""

    def __init__(self):
        self.imputer, self.masks = NoisyLinearImputer(noise=0), []

    def __call__(self, img, mask):
        self.masks.append(mask.clone())
        return self.imputer(img, mask)


def their_removed(maps: torch.Tensor, share: float, ordering: str) -> torch.Tensor:
    """(B, H, W) bool: the pixels pytorch-grad-cam removes at our ``share``."""
    out = []
    for m in maps:
        spy = Spy()
        REMOVERS[ordering](percentile(share), spy)(torch.zeros(3, *m.shape), m)
        out.append(spy.masks[0] == 0)
    return torch.stack(out)


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(seed=0)


# -- (a) the imputed images ------------------------------------------------------------------
@pytest.mark.parametrize("size, shares", [(16, EXACT_16), (32, EXACT_32)])
@pytest.mark.parametrize("ordering", ["morf", "lerf"])
def test_imputed_images_equal_noisy_linear_imputer(size, shares, ordering):
    """The same removed pixels, and the same imputed values (float32 rounding apart), as
    pytorch-grad-cam's noise-free ``NoisyLinearImputer`` at every share; kept pixels are
    returned bit for bit."""
    images, maps = images_for(2, size, size), distinct_maps(2, size, size)
    for share in shares:
        ours = removed_pixels(maps, share, ordering)
        assert ours.sum(dim=(1, 2)).tolist() == [math.ceil(share * size * size)] * 2
        assert torch.equal(ours, their_removed(maps, share, ordering))
        for i in range(2):
            mine = impute(images[i], ours[i])
            theirs = NoisyLinearImputer(noise=0)(images[i], (~ours[i]).float())
            assert mine.dtype == torch.float32
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
            kept = ~ours[i].expand_as(mine)
            assert torch.equal(mine[kept], images[i][kept])
            assert not torch.allclose(mine[~kept], images[i][~kept])   # something changed


def test_imputation_of_hand_made_masks_equals_the_oracle():
    """Masks that touch every border and corner, a lone pixel, a large blob (unknown
    neighbours on all sides) and a one-pixel-wide line."""
    image = images_for(1, 8, 8, seed=5)[0]
    masks = [torch.zeros(8, 8, dtype=torch.bool) for _ in range(4)]
    masks[0][[0, 0, 7, 7], [0, 7, 0, 7]] = True                 # the four corners
    masks[1][3, 4] = True                                       # one interior pixel
    masks[2][1:7, 1:6] = True                                   # a 6 x 5 blob
    masks[3][:, 2] = True                                       # a full column
    for removed in masks:
        theirs = NoisyLinearImputer(noise=0)(image, (~removed).float())
        torch.testing.assert_close(impute(image, removed), theirs, rtol=0, atol=1e-6)
    # one interior pixel: the weighted mean of its 8 neighbours (1/6 edge, 1/12 diagonal)
    near = image[:, 2:5, 3:6]
    weights = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
    want = (near * weights).sum(dim=(1, 2))
    torch.testing.assert_close(impute(image, masks[1])[:, 3, 4], want, rtol=0, atol=1e-6)


def test_imputation_commutes_with_the_normalisation():
    """pytorch-grad-cam imputes the normalised tensor, we impute [0, 1] pixels: the linear
    part is the same (a per-channel affine map commutes with the weighted mean)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    image, maps = images_for(1, 16, 16)[0], distinct_maps(1, 16, 16)
    removed = removed_pixels(maps, 0.5, "morf")[0]
    theirs = NoisyLinearImputer(noise=0)((image - mean) / std, (~removed).float())
    torch.testing.assert_close((impute(image, removed) - mean) / std, theirs, rtol=0,
                               atol=1e-5)


# -- the removed counts ----------------------------------------------------------------------
def test_counts_differ_by_one_pixel_where_documented():
    """road.py's docstring: ceil(q P) here, P - ceil(p/100 (P - 1)) there; at 16 x 16 equal
    at 10..60% and 80%, one pixel more here at 70% and 90% (the next pixel in the order)."""
    maps = distinct_maps(2, 16, 16)
    for share in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        for ordering in ("morf", "lerf"):
            ours, theirs = removed_pixels(maps, share, ordering), \
                their_removed(maps, share, ordering)
            extra = 1 if share in (0.7, 0.9) else 0
            assert (ours.sum(dim=(1, 2)) - theirs.sum(dim=(1, 2))).tolist() == [extra] * 2
            assert not (theirs & ~ours).any()                   # theirs is a subset of ours


def test_counts_are_exact_for_decimal_shares():
    """n = ceil(q P) of the decimal q: 7% of 10 x 10 is 7 pixels (0.07 * 100 is
    7.000000000000001 in floats), 28% of 5 x 5 is 7, 7% of 300 x 300 is 6300."""
    for (h, w), share, n in (((10, 10), 0.07, 7), ((5, 5), 0.28, 7), ((300, 300), 0.07, 6300)):
        maps = torch.rand(1, h, w, generator=torch.Generator().manual_seed(0))
        for ordering in ("morf", "lerf"):
            assert int(removed_pixels(maps, share, ordering).sum()) == n


def test_morf_removes_the_highest_and_lerf_the_lowest():
    maps = distinct_maps(1, 4, 4)
    flat = maps.flatten()
    morf, lerf = removed_pixels(maps, 0.25, "morf").flatten(), \
        removed_pixels(maps, 0.25, "lerf").flatten()
    assert set(torch.nonzero(morf)[:, 0].tolist()) == set(flat.argsort()[-4:].tolist())
    assert set(torch.nonzero(lerf)[:, 0].tolist()) == set(flat.argsort()[:4].tolist())
    with pytest.raises(ValueError, match="ordering must be one of morf, lerf"):
        removed_pixels(maps, 0.25, "random")


# -- (b) the scores --------------------------------------------------------------------------
@pytest.mark.parametrize("score, target", [("prob", ClassifierOutputSoftmaxTarget),
                                           ("logit", ClassifierOutputTarget)])
def test_scores_equal_pytorch_grad_cam_per_image_and_share(backbone, score, target):
    images, maps = images_for(3, 16, 16), distinct_maps(3, 16, 16)
    classes = [1, 4, 2]
    ours = road_scores(backbone, images, maps, classes, EXACT_16, noise=0.0, score=score,
                       batch_size=7)
    targets = [target(c) for c in classes]
    for ordering in ("morf", "lerf"):
        for s, share in enumerate(EXACT_16):
            oracle = PerturbationConfidenceMetric(REMOVERS[ordering](
                percentile(share), NoisyLinearImputer(noise=0)))
            theirs = oracle(images, maps.numpy(), targets, backbone, return_diff=False)
            np.testing.assert_allclose(ours[ordering][:, s].numpy(), theirs, rtol=0,
                                       atol=1e-5)
    # the scores do move with the share (the comparison is not between constants)
    assert float((ours["morf"][:, 0] - ours["morf"][:, -1]).abs().max()) > 1e-3


def test_metric_columns_equal_road_combined(backbone, monkeypatch):
    """ROAD.score's road_morf / road_lerf are pytorch-grad-cam's averages over the
    percentiles (of scores, ``return_diff=False``); road_combined is its ``ROADCombined``
    (of score changes: the clean score cancels), all noise-free."""
    class NoiseFree(NoisyLinearImputer):          # what ROADCombined builds, without noise
        def __init__(self, noise=0.01):
            super().__init__(noise=0.0)

    monkeypatch.setattr(gradcam_road, "NoisyLinearImputer", NoiseFree)
    images, maps, classes = images_for(3, 16, 16), distinct_maps(3, 16, 16), [0, 3, 1]
    metric = ROAD({"percentages": list(EXACT_16), "noise": 0.0})
    got = metric.score(Batch(backbone, images, maps, torch.tensor(classes),
                             indices=(5, 6, 7)))
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    pcts = [percentile(q) for q in EXACT_16]
    for ordering, column in (("morf", "road_morf"), ("lerf", "road_lerf")):
        per = [PerturbationConfidenceMetric(REMOVERS[ordering](p, NoisyLinearImputer(noise=0)))(
            images, maps.numpy(), targets, backbone, return_diff=False) for p in pcts]
        np.testing.assert_allclose(got[column], np.mean(per, axis=0), rtol=0, atol=1e-5)
    combined = gradcam_road.ROADCombined(percentiles=pcts)(images, maps.numpy(), targets,
                                                           backbone)
    np.testing.assert_allclose(got["road_combined"], combined, rtol=0, atol=1e-5)
    assert got["road_forward_passes"] == [2.0 * len(EXACT_16)] * 3


# -- the seeded noise ------------------------------------------------------------------------
def test_noise_is_seeded_per_image_whatever_the_batch(backbone):
    """The same numbers for an image scored alone or in a batch, in any order, at any
    batch_size (the shard layout), from (seed, its position in the data set)."""
    images, maps = images_for(4, 16, 16), distinct_maps(4, 16, 16)
    classes, positions = torch.tensor([0, 1, 2, 3]), (7, 3, 12, 40)
    metric = ROAD({"percentages": [0.2, 0.6], "noise": 0.05, "seed": 3, "batch_size": 64})
    together = metric.score(Batch(backbone, images, maps, classes, indices=positions))
    small = ROAD({"percentages": [0.2, 0.6], "noise": 0.05, "seed": 3, "batch_size": 3})
    order = [2, 0, 3, 1]
    shuffled = small.score(Batch(backbone, images[order], maps[order], classes[order],
                                 indices=tuple(positions[i] for i in order)))
    for i in range(4):
        alone = metric.score(Batch(backbone, images[i:i + 1], maps[i:i + 1],
                                   classes[i:i + 1], indices=(positions[i],)))
        for column in ("road_morf", "road_lerf", "road_combined"):
            assert alone[column][0] == pytest.approx(together[column][i], abs=1e-6)
            assert shuffled[column][order.index(i)] == pytest.approx(together[column][i],
                                                                     abs=1e-6)
    # the noise is there and the seed matters: another seed, other numbers
    other = ROAD({"percentages": [0.2, 0.6], "noise": 0.05, "seed": 4}).score(
        Batch(backbone, images, maps, classes, indices=positions))
    assert max(abs(a - b) for a, b in zip(other["road_morf"], together["road_morf"])) > 1e-4


def test_noise_depends_on_the_image_position_and_has_the_declared_size():
    """Two positions, two noise draws; the noise is N(0, noise^2) in [0, 1] pixel units on
    the removed pixels only."""
    image, maps = images_for(1, 32, 32)[0], distinct_maps(1, 32, 32)
    removed = removed_pixels(maps, 0.5, "morf")[0]
    clean = impute(image, removed)
    noisy = [impute(image, removed, 0.05, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    delta = (noisy[0] - clean)[removed.expand_as(clean)]
    assert torch.equal((noisy[0] - clean)[~removed.expand_as(clean)],
                       torch.zeros(int((~removed).sum()) * 3))
    assert float(delta.std()) == pytest.approx(0.05, rel=0.1)
    assert abs(float(delta.mean())) < 0.01
    # the same image at two positions of the data set gets two draws
    two = road_scores(tiny_backbone(seed=0), image.expand(2, 3, 32, 32).clone(),
                      maps.expand(2, 32, 32).clone(), [0, 0], [0.5], noise=0.05,
                      positions=[0, 1])
    assert float((two["morf"][0] - two["morf"][1]).abs().max()) > 1e-5


# -- settings, declarations, forwards, directions --------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"percentages": [0.0, 0.5]}, "0 is not a share in (0, 1) (write 0.1 for 10%)"),
    ({"percentages": [0.5, 1.0]}, "1 is not a share in (0, 1)"),
    ({"percentages": [10, 20]}, "10 is not a share in (0, 1) (write 0.1 for 10%)"),
    ({"percentages": ["0.1"]}, "Input should be a valid number"),
    ({"percentages": [50.0]}, "50 is not a share in (0, 1) (write 0.1 for 10%)"),
    ({"percentages": [-0.2]}, "-0.2 is not a share in (0, 1)"),
    ({"percentages": [0.3, 0.3]}, "0.3 is listed twice"),
    ({"percentages": []}, "at least 1 item"),
    ({"noise": -0.01}, "greater than or equal to 0"),
    ({"noise": 1.5}, "less than or equal to 1"),
    ({"noise": float("nan")}, "finite number"),
    ({"score": "softmax"}, "'prob' or 'logit'"),
    ({"seed": -1}, "greater than or equal to 0"),
    ({"batch_size": 0}, "greater than or equal to 1"),
    ({"steps": 5}, "Extra inputs are not permitted"),
])
def test_settings_refuse_bad_values_with_a_message(settings, message):
    with pytest.raises(ValidationError) as err:
        registry.create("road", settings)
    assert message in str(err.value)


def test_settings_accept_a_yaml_list_and_keep_the_defaults():
    metric = registry.create("road", {"percentages": [0.25, 0.75], "noise": 0})
    assert metric.settings.percentages == (0.25, 0.75) and metric.settings.noise == 0
    default = ROADSettings()
    assert default.percentages == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert (default.noise, default.score, default.seed) == (0.01, "prob", 0)
    assert metric.identity() == {"version": ROAD.version, "percentages": [0.25, 0.75],
                                 "noise": 0, "score": "prob", "seed": 0, "batch_size": 64}


def test_a_spec_reports_bad_road_settings_at_their_field(tmp_path):
    from harness.spec import SpecError, load_spec
    path = tmp_path / "spec.yaml"
    path.write_text("schema: 1\nbackbones: [tiny_vgg]\nmethods: [gradcam]\nevaluation:\n"
                    "  metrics: [ad_ic, {name: road, percentages: [0.5, 1.5], noise: -0.1}]\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert dict(err.value.problems) == {
        "evaluation.metrics[1].percentages[1]": "1.5 is not a share in (0, 1) (write 0.1 "
                                                "for 10%)",
        "evaluation.metrics[1].noise": "-0.1 is out of range: noise must be in [0, 1]"}
    path.write_text(path.read_text().replace("[0.5, 1.5], noise: -0.1", "[0.5]"))
    spec = load_spec(path)
    assert spec.evaluation.metric_names() == ["ad_ic", "road"]


def test_a_spec_lists_the_accepted_road_settings_for_an_unknown_key(tmp_path):
    from harness.spec import SpecError, load_spec
    path = tmp_path / "spec.yaml"
    path.write_text("schema: 1\nbackbones: [tiny_vgg]\nmethods: [gradcam]\nevaluation:\n"
                    "  metrics: [ad_ic, {name: road, percentage: [0.5]}]\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "percentages" in dict(err.value.problems)["evaluation.metrics[1].percentage"]


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.images, self.largest = inner, 0, 0

    def forward(self, x):
        self.images += len(x)
        self.largest = max(self.largest, len(x))
        return self.inner(x)


@pytest.mark.parametrize("shares", [(0.5,), (0.1, 0.3, 0.9), tuple(i / 10 for i in range(1, 10))])
def test_forward_passes_are_two_per_share(shares):
    metric = ROAD({"percentages": list(shares), "batch_size": 4})
    assert metric.forward_passes() == metric.forward_passes((224, 224)) == 2 * len(shares)
    assert metric.forward_column == "road_forward_passes"
    counting = Counting(tiny_backbone(seed=0))
    got = metric.score(Batch(counting, images_for(3, 16, 16), distinct_maps(3, 16, 16),
                             torch.tensor([0, 1, 2])))
    assert counting.images == 3 * 2 * len(shares) and counting.largest <= 4
    assert got["road_forward_passes"] == [float(2 * len(shares))] * 3
    assert set(got) == set(metric.columns())


def test_declarations_and_directions():
    assert declaration_problems(ROAD) == []
    assert registry.metric_class("road") is ROAD
    assert registry.direction("road_morf") == "lower"
    assert registry.direction("road_lerf") == "higher"
    assert registry.direction("road_combined") == "higher"
    assert registry.direction("FW_road") == "lower"
    assert registry.header("road_morf") == "ROAD-MoRF↓"
    assert registry.header("road_lerf") == "ROAD-LeRF↑"
    assert {"road_morf", "road_lerf"} <= set(registry.table_columns())
    assert "road_combined" not in registry.table_columns()
    assert registry.digits("road_morf") == 3


def test_a_good_map_beats_its_inverse():
    """Behaviour, not just agreement: a map that ranks the pixels the class depends on
    first gives a lower MoRF and a higher LeRF than the same map upside down. The class
    score of this model is the mean of channel 0 over the left half."""

    class LeftHalf(torch.nn.Module):
        def forward(self, x):
            s = x[:, 0, :, : x.shape[-1] // 2].mean(dim=(1, 2))
            return torch.stack([4 * s, torch.zeros_like(s)], dim=1)

    images = torch.zeros(2, 3, 16, 16)
    images[:, 0, :, :8] = 1.0                       # the left half bright, the right dark
    rank = torch.arange(256, dtype=torch.float32).view(16, 16) / 256
    good = torch.where(torch.arange(16) < 8, 0.5 + rank / 2, rank / 2).expand(2, 16, 16)
    bad = 1 - good
    metric = ROAD({"noise": 0.0})
    g = metric.score(Batch(LeftHalf(), images, good, torch.tensor([0, 0])))
    b = metric.score(Batch(LeftHalf(), images, bad.clone(), torch.tensor([0, 0])))
    assert all(x < y for x, y in zip(g["road_morf"], b["road_morf"]))
    assert all(x > y for x, y in zip(g["road_lerf"], b["road_lerf"]))
    assert all(x > y for x, y in zip(g["road_combined"], b["road_combined"]))
