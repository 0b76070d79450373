"""Every registered explanation method: the output contract, targets, batches, #FW, hooks.

Parametrised over ``methods.names()``, so a newly registered method is tested by these
tests without edits. Each (method, backbone) pair is explained once per session on tiny
random-init inputs (``_run``); the tests then assert one property each on that run.
The second half checks each method's formula against a direct computation on the tiny
backbone of conftest.py (K=6 channels, two of them constant; GAP + linear head).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import methods
from methods.base import minmax
from methods.rise import MaskSet, mask_set

# The smallest inputs giving 2 x 2 feature maps (VGG-16: /16; ResNet-50: 33 -> 17 -> 9 -> 5
# -> 3 -> 2). Non-square inputs are covered on the tiny backbone and in test_oracle.py.
SIZES = {"vgg16": (32, 32), "resnet50": (33, 33)}
# Keep the costly methods small: RISE with few masks (a new method may add its own entry).
FAST_PARAMS = {"rise": {"n_masks": 24, "batch_size": 12}, "scorecam": {"batch_size": 256}}
METHODS = methods.names()


def create(name, backbone, **params):
    """Create with the global seed fixed (a fresh L-CAM head draws from it)."""
    torch.manual_seed(0)
    return methods.create(name, backbone, **{**FAST_PARAMS.get(name, {}), **params})


_RUNS: dict = {}


def _run(name: str, bb_name: str, random_backbone, helpers) -> dict:
    """One image explained for its top-1 and top-2 classes in one batch (mixed targets), then
    the top-2 map again, alone, by a fresh explainer created with the same seed.

    Three explained rows per (method, backbone) keep Score-CAM on ResNet-50 (~1,900 masked
    forwards per row) affordable; distinct images per row are covered on the tiny backbone.
    """
    key = (name, bb_name)
    if key in _RUNS:
        return _RUNS[key]
    bb = random_backbone(bb_name)
    h, w = SIZES[bb_name]
    img = helpers.images(1, h, w, seed=11)
    with torch.no_grad():
        top2 = bb(img).topk(2, dim=1).indices[0]
    hooks_before = helpers.hooks(bb)
    ex = create(name, bb)
    with helpers.RowCounter(bb.first_layer) as counter:
        batch = ex.explain(img.expand(2, -1, -1, -1).clone(), top2)
    out = {"x": img, "targets": top2, "batch": batch, "degenerate": ex.last_degenerate.clone(),
           "rows": counter.rows, "last_fw": ex.last_forward_passes,
           "nominal": ex.forward_passes, "describe": ex.describe(), "hooks_before": hooks_before}
    fresh = create(name, bb)                               # same seed, new instance
    out["single"] = fresh.explain(img, top2[1:])
    out["hooks_after"] = helpers.hooks(bb)
    out["grads"] = [n for n, p in bb.named_parameters() if p.grad is not None or p.requires_grad]
    out["training"] = [n for n, m in bb.named_modules() if m.training]
    _RUNS[key] = out
    return out


# Score-CAM on ResNet-50 (~1,900 masked forwards per row, most of this module's time) runs
# with ``-m full`` only: Score-CAM's code has no backbone-specific path, and on VGG-16 (run
# by default) it covers the same contract, constant channels skipped included (below).
FULL_ONLY = {("scorecam", "resnet50")}


@pytest.fixture(params=[pytest.param((m, b), marks=[pytest.mark.full] if (m, b) in FULL_ONLY
                                     else []) for b in SIZES for m in METHODS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, random_backbone, helpers):
    return _run(*request.param, random_backbone, helpers)


def test_output_contract(run):
    maps = run["batch"]
    h, w = run["x"].shape[-2:]
    assert maps.shape == (2, h, w) and maps.dtype == torch.float32
    assert bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert not maps.requires_grad
    assert run["degenerate"].shape == (2,) and run["degenerate"].dtype == torch.bool
    assert not run["degenerate"].any(), "test inputs should give non-constant maps"
    # min-max normalised (CAM-style maps are normalised before upsampling: max near 1)
    assert float(maps.amax(dim=(1, 2)).min()) > 0.9 and float(maps.amin(dim=(1, 2)).max()) < 0.1
    d = run["describe"]
    assert d["method"] in METHODS and d["variant"] and "version" in d


def test_same_seed_mixed_target_batch_equals_one_by_one(run):
    # a second explainer created with the same seed, the top-2 row alone
    assert torch.allclose(run["single"][0], run["batch"][1], atol=1e-5)


def test_named_class_changes_the_map(run):
    assert run["targets"][0] != run["targets"][1]
    diff = (run["batch"][0] - run["batch"][1]).abs().max()
    assert diff > 1e-3, "the map for the top-2 class equals the top-1 map"


def test_forward_passes_reaching_the_backbone(run):
    measured = run["rows"] / 2                     # rows per image, clean forward included
    nominal, last = run["nominal"], run["last_fw"]
    assert isinstance(nominal, int) and nominal >= 1
    assert measured <= nominal + 1
    if last < nominal:                             # an exact saving: must be what really ran
        assert last == pytest.approx(measured - 1)
    else:
        assert last == nominal and measured >= nominal


def test_no_hooks_grads_or_train_mode_left_on_the_backbone(run):
    assert run["hooks_before"] == {} and run["hooks_after"] == {}
    assert run["grads"] == []
    assert run["training"] == []


# --- method-specific counts on the registered backbones ------------------------------------
def test_scorecam_counts_skipped_constant_channels_exactly(random_backbone, helpers):
    # VGG-16 (K = 512; ResNet-50's K = 2048 is in test_nominal_counts_follow_the_protocol_table)
    r = _run("scorecam", "vgg16", random_backbone, helpers)
    assert r["nominal"] == 512
    measured = r["rows"] / 2 - 1
    assert r["last_fw"] == pytest.approx(measured)
    assert measured < 512                           # random-init ReLU maps: some all-zero


def test_rise_runs_exactly_n_masks_forwards(random_backbone, helpers):
    r = _run("rise", "vgg16", random_backbone, helpers)
    assert r["nominal"] == 24 and r["last_fw"] == 24 and r["rows"] == 2 * (24 + 1)


def test_nominal_counts_follow_the_protocol_table(random_backbone):
    vgg, res = random_backbone("vgg16"), random_backbone("resnet50")
    for name, want in (("gradcam", (1, 1)), ("gradcampp", (1, 1)), ("scorecam", (512, 2048)),
                       ("rise", (4000, 8000)), ("lcam_fm", (1, 1)), ("lcam_img", (1, 1))):
        assert (methods.create(name, vgg).forward_passes,
                methods.create(name, res).forward_passes) == want, name


# --- every method and variant on the tiny backbone -----------------------------------------
def _variants():
    out = []
    for name in METHODS:
        for variant in methods.method_class(name).variants:
            out.append((name, variant))
    return out


@pytest.mark.parametrize("name, variant", _variants(), ids=lambda v: str(v))
def test_every_variant_on_tiny_backbone(name, variant, tiny_backbone, helpers):
    # three different images, non-square (A is 4 x 6), mixed targets
    bb = tiny_backbone
    x = helpers.images(3, 16, 24, seed=2)
    with torch.no_grad():
        top = bb(x).topk(2, dim=1).indices
    targets = torch.stack([top[0, 0], top[1, 1], top[2, 0]])
    ex = create(name, bb, variant=variant)
    assert ex.variant == variant and ex.describe()["variant"] == variant
    maps = ex.explain(x, targets)
    assert maps.shape == (3, 16, 24) and bool(torch.isfinite(maps).all())
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert not ex.last_degenerate.any()
    ex2 = create(name, bb, variant=variant)
    for b in range(3):
        assert torch.allclose(ex2.explain(x[b:b + 1], targets[b:b + 1])[0], maps[b], atol=1e-5)
    # default targets are the top-1 classes; another class gives another map
    assert torch.allclose(ex2.explain(x), ex2.explain(x, top[:, 0]), atol=1e-6)
    assert (ex2.explain(x[:1], [int(top[0, 1])])[0] - maps[0]).abs().max() > 1e-3
    assert helpers.hooks(bb) == {}


# --- formulas against direct computations on the tiny backbone -----------------------------
def _tiny_case(bb, helpers, seed=3):
    x = helpers.images(2, 16, 16, seed=seed)
    targets = torch.tensor([1, 3])
    with torch.no_grad():
        feats = bb.features(x)
    return x, targets, feats


def _cam_style(raw, size=(16, 16)):
    return F.interpolate(minmax(raw)[0][:, None], size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def test_gradcam_closed_form(tiny_backbone, helpers):
    # head = GAP + linear: dlogit_c / dA_k[ij] = W[c, k] / (P Q), so w_k = W[c, k] / (P Q).
    bb = tiny_backbone
    x, t, a = _tiny_case(bb, helpers)
    wfc = bb.tail[-1].weight
    pq = a.shape[2] * a.shape[3]
    raw = torch.relu(torch.einsum("bk,bkpq->bpq", wfc[t] / pq, a))
    got = methods.create("gradcam", bb).explain(x, t)
    assert torch.allclose(got, _cam_style(raw), atol=1e-5)


def test_gradcampp_closed_form_paper_and_reference(tiny_backbone, helpers):
    bb = tiny_backbone
    x, t, a = _tiny_case(bb, helpers)
    wfc = bb.tail[-1].weight
    pq = a.shape[2] * a.shape[3]
    sum_a = a.sum(dim=(2, 3))                                           # (B, K)
    # paper: g = W[c, k] / PQ, constant over the map:
    # alpha = g^2 / (2 g^2 + sum_ab(A) g^3); w_k = PQ * alpha * ReLU(g)
    g = wfc[t] / pq
    alpha = g ** 2 / (2 * g ** 2 + sum_a * g ** 3)
    raw = torch.relu(torch.einsum("bk,bkpq->bpq", pq * alpha * torch.relu(g), a))
    got = methods.create("gradcampp", bb).explain(x, t)
    assert torch.allclose(got, _cam_style(raw), atol=1e-4)
    # reference: g = dp_c/dA = p_c (W[c] - sum_j p_j W[j]) / PQ; denominator sum_ab(A g^3),
    # plus the authors' 1e-7 (no denominator is 0 here)
    with torch.no_grad():
        p = bb(x).softmax(1)
    g = p[torch.arange(2), t][:, None] * (wfc[t] - p @ wfc) / pq
    alpha = g ** 2 / (2 * g ** 2 + sum_a * g ** 3 + 1e-7)
    raw = torch.relu(torch.einsum("bk,bkpq->bpq", pq * alpha * torch.relu(g), a))
    got = methods.create("gradcampp", bb, variant="reference").explain(x, t)
    assert torch.allclose(got, _cam_style(raw), atol=1e-4)


def _scorecam_direct(bb, x, t, a, variant):
    """Score-CAM per docs/protocol.md section 4, one forward per channel, nothing skipped."""
    size = x.shape[-2:]
    maps = []
    for b in range(len(x)):
        c = int(t[b])
        acts = torch.relu(a[b]) if variant == "reference" else a[b]
        up = F.interpolate(acts[None], size=size, mode="bilinear",       # pytorch-grad-cam's
                           align_corners=variant == "channel_softmax")[0]  # masks: True
        acc = torch.zeros(size)
        scores = []
        for k in range(acts.shape[0]):
            lo, hi = up[k].min(), up[k].max()
            if variant == "reference":
                if hi == lo:                          # the original code skips these
                    scores.append(None)
                    continue
                m = up[k] / (hi - lo)
                s = bb.forward_normalized(bb.normalize(x[b:b + 1]) * m).softmax(1)[0, c]
                acc += s * m
                continue
            m = (up[k] - lo) / (hi - lo) if hi > lo else torch.zeros_like(up[k])
            out = bb(x[b:b + 1] * m)
            if variant == "paper":
                acc += out.softmax(1)[0, c] * up[k]
            else:
                scores.append(out[0, c])
        if variant == "channel_softmax":
            w = torch.stack(scores).softmax(0)
            raw = torch.relu(torch.einsum("k,kpq->pq", w, acts))
            maps.append(_cam_style(raw[None], tuple(size))[0])
        else:
            maps.append(minmax(torch.relu(acc)[None])[0][0])
    return torch.stack(maps)


@pytest.mark.parametrize("variant, fw_per_image", [("paper", 5), ("reference", 4),
                                                   ("channel_softmax", 5)])
def test_scorecam_matches_direct_formula_and_counts(variant, fw_per_image, tiny_backbone,
                                                    helpers):
    # Tiny backbone: channels 0-3 vary, 4 is always 0 and 5 always 0.5 (after its ReLU).
    bb = tiny_backbone
    x, t, a = _tiny_case(bb, helpers)
    span = a.flatten(2).amax(2) - a.flatten(2).amin(2)
    assert (span[:, :4] > 0).all() and (span[:, 4:] == 0).all()
    ex = methods.create("scorecam", bb, variant=variant, batch_size=3)
    with helpers.RowCounter(bb.first_layer) as counter, torch.no_grad():
        got = ex.explain(x, t)
    with torch.no_grad():
        want = _scorecam_direct(bb, x, t, a, variant)
    assert torch.allclose(got, want, atol=1e-5)
    # 4 varying channels; the two constant ones share one forward of the black image where
    # they contribute (paper: channel 5 is 0.5 everywhere; channel_softmax: all channels).
    assert ex.forward_passes == 6
    assert ex.last_forward_passes == fw_per_image
    assert counter.rows == 2 * (1 + fw_per_image)


@pytest.mark.parametrize("fill", ["mean", "black"])
def test_rise_matches_direct_formula(fill, tiny_backbone, helpers):
    bb = tiny_backbone
    x, t, _ = _tiny_case(bb, helpers)
    n, p1 = 20, 0.5
    ex = methods.create("rise", bb, n_masks=n, cell=4, p1=p1, seed=7, fill=fill, batch_size=8)
    got = ex.explain(x, t)
    masks = MaskSet(n, 4, p1, (16, 16), 7).batch(0, n)                       # (n, 16, 16)
    want = []
    with torch.no_grad():
        for b in range(2):
            inp = x[b:b + 1] * masks[:, None]
            out = bb(inp) if fill == "black" else bb.forward_normalized(
                bb.normalize(x[b:b + 1]) * masks[:, None])
            pc = out.softmax(1)[:, t[b]]
            want.append((pc[:, None, None] * masks).sum(0) / (n * p1))
    want = minmax(torch.stack(want))[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert ex.last_mask_hash == mask_set(n, 4, p1, (16, 16), 7).hash


def test_rise_mask_set_follows_the_recipe():
    ms = MaskSet(50, 7, 0.5, (224, 224), seed=0)
    masks = ms.batch(0, 50)
    assert masks.shape == (50, 224, 224)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert ms.cell_px == (32, 32)                                 # ceil(224 / 7)
    assert 0.35 < float(ms.grids.mean()) < 0.65
    assert bool((ms.shifts >= 0).all()) and bool((ms.shifts < 32).all())
    # mask i = bilinear upsampling of grid i to (s + 1) * cell, cropped at its shift
    i = 3
    up = F.interpolate(ms.grids[i:i + 1], size=(256, 256), mode="bilinear",
                       align_corners=False)[0, 0]
    dy, dx = ms.shifts[i].tolist()
    assert torch.allclose(masks[i], up[dy:dy + 224, dx:dx + 224])
    # batches are consistent slices; the hash identifies (params, seed)
    assert torch.equal(ms.batch(10, 20), masks[10:20])
    assert ms.hash == MaskSet(50, 7, 0.5, (224, 224), seed=0).hash
    assert ms.hash != MaskSet(50, 7, 0.5, (224, 224), seed=1).hash
    assert ms.hash != MaskSet(51, 7, 0.5, (224, 224), seed=0).hash
    assert torch.allclose(MaskSet(4, 7, 1.0, (32, 32), 0).batch(0, 4), torch.ones(4, 32, 32))


def test_rise_seed_changes_the_map(tiny_backbone, helpers):
    bb = tiny_backbone
    x, t, _ = _tiny_case(bb, helpers)
    m0 = methods.create("rise", bb, n_masks=16, seed=0).explain(x, t)
    m0b = methods.create("rise", bb, n_masks=16, seed=0).explain(x, t)
    m1 = methods.create("rise", bb, n_masks=16, seed=1).explain(x, t)
    assert torch.equal(m0, m0b)
    assert (m0 - m1).abs().max() > 1e-2


def test_minmax_degenerate_maps_become_zeros():
    maps = torch.stack([torch.full((3, 3), 2.0), torch.arange(9.0).view(3, 3),
                        torch.tensor([[0, 1, float("nan")], [0, 0, 0], [0, 0, 0]])])
    out, degenerate = minmax(maps)
    assert degenerate.tolist() == [True, False, True]
    assert torch.equal(out[0], torch.zeros(3, 3)) and torch.equal(out[2], torch.zeros(3, 3))
    assert torch.allclose(out[1], torch.arange(9.0).view(3, 3) / 8)


@pytest.mark.parametrize("name", [n for n in METHODS
                                  if methods.REGISTRY.get(n).meta.get("family") == "gradient"])
def test_gradient_methods_leave_no_grads_even_on_trainable_parameters(name, helpers):
    # Gradients are taken with torch.autograd.grad w.r.t. A only: nothing accumulates in
    # .grad, even if a caller un-froze the backbone.
    bb = helpers.tiny(seed=5)
    bb.requires_grad_(True)
    x = helpers.images(2, 16, 16, seed=9)
    maps = methods.create(name, bb).explain(x)
    assert maps.shape == (2, 16, 16)
    assert all(p.grad is None for p in bb.parameters())
