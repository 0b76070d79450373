"""L-CAM: loss terms by hand (both variants), the training forward, Eq. 9, training and heads."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import lcam_train
from methods.base import ExplainerInputError
from methods.lcam import (CE_ONLY_LAMBDAS, PAPER_LAMBDAS, AttentionHead, area_loss, lcam_loss,
                          load_head, select_maps, training_forward, tv_loss)
from methods.lcam_train import (TrainConfig, head_meta, run_epoch, save_head, seed_epoch,
                                train_head, train_step)


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


# --- the loss terms on hand-computed tensors ------------------------------------------------
def test_tv_paper_hand_computed():
    s = torch.tensor([[[0.0, 1.0, 0.0],
                       [1.0, 1.0, 1.0]],
                      [[0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0]]])
    # map 0: right diffs (1 + 1) + (0 + 0) = 2, down diffs 1 + 0 + 1 = 2 -> 4; map 1: 0
    assert float(tv_loss(s, "paper")) == pytest.approx(4 / 2)
    one = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # right: 1 + 1, down: 4 + 4
    assert float(tv_loss(one, "paper")) == pytest.approx(10.0)


def test_tv_reference_hand_computed_with_border_and_2B():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])[None]         # (B=1, M=1, 2, 2)
    # right 1 + 1 = 2, down 4 + 4 = 8, border (top 1+4) + (bottom 9+16) + (left 1+9)
    # + (right 4+16) = 60 -> 0.3 * 60 = 18; (2 + 8 + 18) / (2 * 1) = 14
    assert float(tv_loss(s, "reference")) == pytest.approx(14.0)
    s2 = torch.cat([s, torch.zeros_like(s)], dim=0)            # B = 2: divides by 4
    assert float(tv_loss(s2, "reference")) == pytest.approx(28.0 / 4)


def test_area_terms_hand_computed():
    s = torch.tensor([[[0.25, 1.0], [0.0, 0.04]]])
    assert float(area_loss(s, 0.5, "paper")) == pytest.approx((0.5 + 1.0 + 0.0 + 0.2) / 4)
    p = 0.3
    want = sum(v ** p for v in (0.25, 1.0, 0.0, 0.04)) / 4
    assert float(area_loss(s, p, "paper")) == pytest.approx(want, rel=1e-6)
    want_ref = sum((v + 0.0005) ** p for v in (0.25, 1.0, 0.0, 0.04)) / 4
    assert float(area_loss(s, p, "reference")) == pytest.approx(want_ref, rel=1e-6)
    assert want_ref > want


def _two_image_case():
    """B=2, R=2, maps 1x2. Image 0: class 0 [.5 .5], class 1 [.1 .9];
    image 1: class 0 [.2 .6], class 1 [.5 .5]. Labels (1, 0): each image's own map is
    the non-flat one."""
    s = torch.tensor([[[[0.5, 0.5]], [[0.1, 0.9]]],
                      [[[0.2, 0.6]], [[0.5, 0.5]]]], dtype=torch.float64)
    cams = logit(s)
    labels = torch.tensor([1, 0])
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    return cams, labels, logits


def test_select_maps_picks_each_images_own_label():
    cams, labels, _ = _two_image_case()
    sel = torch.sigmoid(select_maps(cams, labels))
    assert torch.allclose(sel, torch.tensor([[[0.1, 0.9]], [[0.2, 0.6]]], dtype=torch.float64))


def assert_terms(t: dict, tv: float, av: float, ce: float) -> None:
    """Each loss term equals its hand-computed value, and the loss the paper's weighted sum."""
    assert float(t["tv"]) == pytest.approx(tv, rel=1e-9)
    assert float(t["area"]) == pytest.approx(av, rel=1e-9)
    assert float(t["ce"]) == pytest.approx(ce, rel=1e-9)
    assert float(t["loss"]) == pytest.approx(0.01 * tv + 2 * av + 1.5 * ce, rel=1e-9)


def test_lcam_loss_paper_variant_hand_computed():
    cams, labels, logits = _two_image_case()
    t = lcam_loss(cams, labels, logits, PAPER_LAMBDAS, "paper")
    tv = (0.8 ** 2 + 0.4 ** 2) / 2                                      # 0.4
    av = sum(v ** 0.3 for v in (0.1, 0.9, 0.2, 0.6)) / 4
    ce = (-math.log(3 / 4) + math.log(2)) / 2                           # p = 3/4 and 1/2
    assert_terms(t, tv, av, ce)


def test_lcam_loss_reference_variant_hand_computed():
    cams, labels, logits = _two_image_case()
    t = lcam_loss(cams, labels, logits, PAPER_LAMBDAS, "reference")
    # cams[:, labels] -> (B, B, 1, 2): every image with the maps of every label in the batch:
    # image 0: [.1 .9], [.5 .5]; image 1: [.5 .5], [.2 .6].
    maps = [(0.1, 0.9), (0.5, 0.5), (0.5, 0.5), (0.2, 0.6)]
    diffs = sum((b - a) ** 2 for a, b in maps)                          # 0.64 + 0.16
    # 1-row maps: top and bottom line are the row itself, left and right one pixel each.
    border = sum(2 * (a * a + b * b) + a * a + b * b for a, b in maps)  # 6.66
    tv = (diffs + 0.3 * border) / (2 * 2)
    av = sum((v + 0.0005) ** 0.3 for m in maps for v in m) / 8
    ce = (-math.log(3 / 4) + math.log(2)) / 2
    assert float(t["tv"]) == pytest.approx(0.6995, rel=1e-9)
    assert_terms(t, tv, av, ce)


def test_ce_only_lambdas_leave_only_the_cross_entropy():
    cams, labels, logits = _two_image_case()
    t = lcam_loss(cams, labels, logits, CE_ONLY_LAMBDAS, "paper")
    assert CE_ONLY_LAMBDAS[:2] == (0.0, 0.0)
    assert float(t["loss"]) == pytest.approx(1.5 * float(t["ce"]), rel=1e-12)


# --- the training forward -------------------------------------------------------------------
def test_training_forward_fm_and_img(tiny_backbone, make_images):
    bb = tiny_backbone
    torch.manual_seed(0)
    head = AttentionHead(bb.feature_channels, bb.num_classes)
    x = make_images(2, 16, 16, seed=1)
    labels = torch.tensor([3, 1])
    with torch.no_grad():
        feats = bb.features(x)
        cams = head(feats)
        s = torch.sigmoid(cams[torch.arange(2), labels])[:, None]          # (2, 1, 4, 4)
        fm_want = bb.head(feats * s)
        img_want = bb(x * F.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False))
        cams_fm, logits_fm = training_forward(bb, head, "fm", x, labels)
        cams_img, logits_img = training_forward(bb, head, "img", x, labels, feats)
    assert cams_fm.shape == (2, bb.num_classes, 4, 4)
    assert torch.allclose(cams_fm, cams) and torch.allclose(cams_img, cams)
    assert torch.allclose(logits_fm, fm_want, atol=1e-6)
    assert torch.allclose(logits_img, img_want, atol=1e-6)
    assert not torch.allclose(logits_fm, bb(x), atol=1e-3)               # the mask matters
    with pytest.raises(ValueError, match="mode"):
        training_forward(bb, head, "feature", x, labels)


def test_training_step_trains_only_the_head(tiny_backbone, make_images):
    bb = tiny_backbone
    torch.manual_seed(0)
    head = AttentionHead(bb.feature_channels, bb.num_classes).train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    x = make_images(4, 16, 16, seed=2)
    for mode in ("fm", "img"):
        out = train_step(bb, head, x, torch.zeros(4, dtype=torch.long),
                         TrainConfig(mode=mode, epochs=1), opt)
        assert set(out) >= {"loss", "tv", "area", "ce", "n"} and out["n"] == 4
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(mode="feature")
    with pytest.raises(ValueError, match="variant"):
        TrainConfig(variant="authors")
    with pytest.raises(ValueError, match="labels"):
        TrainConfig(labels="gt")
    with pytest.raises(ValueError, match="lambdas"):
        TrainConfig(lambdas=(1, 2, 3))


def test_reference_training_turns_dropout_on_only_during_the_step(random_backbone, make_images):
    bb = random_backbone("vgg16")
    drops = [m for m in bb.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and not any(m.training for m in drops)
    seen = []
    handle = drops[0].register_forward_pre_hook(lambda m, i: seen.append(m.training))
    try:
        torch.manual_seed(0)
        head = AttentionHead(bb.feature_channels, bb.num_classes).train()
        opt = torch.optim.SGD(head.parameters(), lr=1e-3)
        x = make_images(2, 32, 32, seed=3)
        train_step(bb, head, x, torch.zeros(2, dtype=torch.long),
                   TrainConfig(mode="fm", variant="reference"), opt)
    finally:
        handle.remove()
    assert True in seen                                 # active in the training forward
    assert not any(m.training for m in drops)           # and off again afterwards


# --- inference (Eq. 9) ----------------------------------------------------------------------
def test_lcam_inference_is_minmax_then_upsample_of_the_pre_sigmoid_map(tiny_backbone, make_images):
    bb = tiny_backbone
    torch.manual_seed(0)
    ex = methods.create("lcam_fm", bb)
    x = make_images(2, 16, 16, seed=4)
    targets = torch.tensor([2, 4])
    got = ex.explain(x, targets)
    with torch.no_grad():
        raw = ex.head(bb.features(x))[torch.arange(2), targets]           # (2, 4, 4)
    lo = raw.flatten(1).min(1).values[:, None, None]
    hi = raw.flatten(1).max(1).values[:, None, None]
    want = F.interpolate(((raw - lo) / (hi - lo))[:, None], size=(16, 16), mode="bilinear",
                         align_corners=False)[:, 0]
    assert torch.allclose(got, want, atol=1e-5)
    assert ex.forward_passes == 1


# --- a tiny training run, checkpoints ------------------------------------------------------
def _loader(x, batch=4):
    labels = torch.zeros(len(x), dtype=torch.long)
    ds = torch.utils.data.TensorDataset(x, labels)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def test_train_head_smoke_writes_a_checkpoint_that_lcam_img_loads(random_backbone, make_images,
                                                                  tmp_path):
    bb = random_backbone("resnet50")
    x = make_images(6, 33, 33, seed=10)                 # A is 2 x 2
    loader = _loader(x, batch=3)
    cfg = TrainConfig(mode="img", epochs=2, lr=0.05, lr_decay=0.5, seed=0)
    torch.manual_seed(cfg.seed)
    init = AttentionHead(bb.feature_channels, bb.num_classes).eval()     # train_head's start
    before = run_epoch(bb, init, loader, cfg)
    epochs = []
    path = tmp_path / "heads" / "resnet50_img.pt"
    head = train_head(bb, loader, cfg, checkpoint=path, on_epoch=lambda e, m: epochs.append(m))
    after = run_epoch(bb, head, loader, cfg)
    assert [round(m["lr"], 6) for m in epochs] == [0.05, 0.025]
    assert all(math.isfinite(m["loss"]) and m["images"] == 6 for m in epochs)
    assert after["loss"] < before["loss"]
    assert path.is_file() and not list(path.parent.glob(".*"))        # no temp file left
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["meta"]["mode"] == "img" and ckpt["meta"]["backbone"] == "resnet50"
    assert (ckpt["meta"]["in_channels"], ckpt["meta"]["num_classes"]) == (2048, 1000)

    trained = methods.create("lcam_img", bb, checkpoint=str(path))
    assert torch.equal(trained.head.conv.weight, head.conv.weight)
    assert not torch.equal(trained.head.conv.weight, init.conv.weight)
    torch.manual_seed(0)
    fresh = methods.create("lcam_img", bb)
    probe = make_images(2, 33, 65, seed=11)              # A is 2 x 3
    m_trained, m_fresh = trained.explain(probe), fresh.explain(probe)
    assert m_trained.shape == (2, 33, 65)
    assert (m_trained - m_fresh).abs().max() > 1e-3
    # L-CAM-Fm refuses a head trained as L-CAM-Img
    with pytest.raises(ExplainerInputError, match="checkpoint.*Img"):
        methods.create("lcam_fm", bb, checkpoint=str(path))


def test_head_for_the_wrong_backbone_fails_clearly(random_backbone, tiny_backbone, helpers,
                                                   tmp_path):
    bb = tiny_backbone
    torch.manual_seed(0)
    head = AttentionHead(bb.feature_channels, bb.num_classes)
    cfg = TrainConfig(mode="fm", epochs=1)
    path = save_head(tmp_path / "tiny_fm.pt", head, head_meta(bb, cfg))
    assert torch.equal(load_head(path, bb, "fm")[0].conv.weight, head.conv.weight)
    # different K and R: the message names both shapes and the backbones
    with pytest.raises(ExplainerInputError) as err:
        methods.create("lcam_fm", random_backbone("resnet50"), checkpoint=str(path))
    msg = str(err.value)
    assert "checkpoint" in msg and "K=6" in msg and "K=2048" in msg and "tiny" in msg
    # same K and R but another backbone (as vgg16 vs vgg16_7x7): refused too
    other = helpers.tiny(name="tiny_other", seed=1)
    with pytest.raises(ExplainerInputError) as err:
        methods.create("lcam_fm", other, checkpoint=str(path))
    assert "tiny_other" in str(err.value) and "'tiny'" in str(err.value)
    with pytest.raises(ExplainerInputError, match="does not exist"):
        methods.create("lcam_fm", bb, checkpoint=str(tmp_path / "missing.pt"))


def test_seed_epoch_makes_an_epoch_depend_on_seed_and_epoch_only():
    """A run resumed at epoch 2 sees the batches (order and augmentation) of an unbroken run."""
    from torch.utils.data import DataLoader, Dataset

    class Augmented(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((2,), float(i)) + torch.rand(2), i    # augmentation: global RNG

    def epoch_batches(loader, gen, epoch, seed=7):
        seed_epoch(seed, epoch, gen)
        return [b[0].clone() for b in loader]

    gen = torch.Generator()
    loader = DataLoader(Augmented(), batch_size=4, shuffle=True, generator=gen)
    unbroken = [epoch_batches(loader, gen, e) for e in range(3)]
    gen2 = torch.Generator().manual_seed(123)                        # a fresh process
    torch.manual_seed(999)
    loader2 = DataLoader(Augmented(), batch_size=4, shuffle=True, generator=gen2)
    resumed = epoch_batches(loader2, gen2, 2)
    assert all(torch.equal(a, b) for a, b in zip(unbroken[2], resumed))
    assert not torch.equal(unbroken[1][0], unbroken[2][0])           # epochs still differ
    gen3 = torch.Generator()
    loader3 = DataLoader(Augmented(), batch_size=4, shuffle=True, generator=gen3)
    assert not torch.equal(epoch_batches(loader3, gen3, 2, seed=8)[0], resumed[0])


# --- the reference CE-only models, the schedule, the batch across workers -------------------
def test_reference_ce_only_is_plain_cross_entropy_with_weight_1():
    cams, labels, logits = _two_image_case()
    ce = (-math.log(3 / 4) + math.log(2)) / 2
    ref = lcam_loss(cams, labels, logits, CE_ONLY_LAMBDAS, "reference")
    assert float(ref["loss"]) == pytest.approx(ce, rel=1e-12)         # not 1.5 * CE
    assert float(ref["loss"]) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)
    paper = lcam_loss(cams, labels, logits, CE_ONLY_LAMBDAS, "paper")
    assert float(paper["loss"]) == pytest.approx(1.5 * ce, rel=1e-12)  # the paper keeps 1.5
    # the full reference loss keeps the authors' ce_coef 1.5
    full = lcam_loss(cams, labels, logits, PAPER_LAMBDAS, "reference")
    assert float(full["loss"]) == pytest.approx(
        0.01 * float(full["tv"]) + 2 * float(full["area"]) + 1.5 * ce, rel=1e-12)
    # the configuration says so (the plan, the head's cache name and metadata show it)
    assert TrainConfig(variant="reference", lambdas=(0, 0, 1.5, 0.3)).lambdas == (0, 0, 1.0, 0.3)
    assert TrainConfig(variant="paper", lambdas=(0, 0, 1.5, 0.3)).lambdas == (0, 0, 1.5, 0.3)
    assert TrainConfig(variant="reference").lambdas == PAPER_LAMBDAS


def test_reference_ce_only_gradients_are_those_of_cross_entropy(tiny_backbone, make_images):
    bb = tiny_backbone
    x = make_images(4, 16, 16, seed=21)
    grads = []
    for loss_of in ("train_step", "plain_ce"):
        torch.manual_seed(0)
        head = AttentionHead(bb.feature_channels, bb.num_classes).train()
        labels = torch.tensor([0, 1, 2, 3])
        cfg = TrainConfig(mode="fm", variant="reference", lambdas=(0, 0, 1.5, 0.3))
        if loss_of == "train_step":
            opt = torch.optim.SGD(head.parameters(), lr=0.0)      # a step that moves nothing
            train_step(bb, head, x, labels, cfg, opt, model_labels=labels,
                       feats=bb.features(x).detach())
        else:
            _, logits = training_forward(bb, head, "fm", x, labels)
            F.cross_entropy(logits, labels).backward()
        grads.append([p.grad.clone() for p in head.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads))


def _lrs(cfg: TrainConfig, epochs: int, resume_at: int | None = None) -> list[float]:
    """The learning rate each epoch trains at (scheduler stepped after every epoch); with
    ``resume_at``, a fresh optimiser and scheduler are loaded from the state at that epoch."""
    head = AttentionHead(4, 3)
    opt, sched = lcam_train.make_optimizer(head, cfg)
    out = []
    for epoch in range(epochs):
        if epoch == resume_at:
            state = (opt.state_dict(), sched.state_dict())
            opt, sched = lcam_train.make_optimizer(AttentionHead(4, 3), cfg)
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_decays_for_n_epochs_then_holds():
    cfg = TrainConfig(lr=1e-4, lr_decay=0.95, epochs=26, lr_decay_epochs=12)
    lrs = _lrs(cfg, 26)
    assert lrs[0] == 1e-4
    assert lrs[:13] == pytest.approx([1e-4 * 0.95 ** e for e in range(13)], rel=1e-12)
    assert lrs[12:] == [lrs[12]] * 14                               # held from epoch 12 on
    assert lrs[12] == pytest.approx(1e-4 * 0.95 ** 12, rel=1e-12)
    assert _lrs(cfg, 26, resume_at=15) == lrs and _lrs(cfg, 26, resume_at=7) == lrs
    # the reference optimiser's bias group follows the same schedule at twice the rate
    ref = dataclasses.replace(cfg, variant="reference")
    opt, sched = lcam_train.make_optimizer(AttentionHead(4, 3), ref)
    for _ in range(20):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [1e-4 * 0.95 ** 12, 2e-4 * 0.95 ** 12], rel=1e-12)


def test_schedule_without_a_limit_is_exactly_the_exponential_decay():
    cfg = TrainConfig(lr=0.05, lr_decay=0.9)
    head = AttentionHead(4, 3)
    opt, sched = lcam_train.make_optimizer(head, cfg)
    assert type(sched) is torch.optim.lr_scheduler.ExponentialLR        # paper runs unchanged
    held = _lrs(dataclasses.replace(cfg, lr_decay_epochs=100), 8)
    assert held == _lrs(cfg, 8)                                         # bit for bit
    assert _lrs(dataclasses.replace(cfg, lr_decay_epochs=1), 4) == [0.05, 0.05 * 0.9] * 1 + \
        [0.05 * 0.9] * 2
    with pytest.raises(ValueError, match="lr_decay_epochs"):
        TrainConfig(lr_decay_epochs=0)


def _grads(head, loss) -> list[torch.Tensor]:
    head.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("mode", ["fm", "img"])
def test_reference_loss_split_over_workers_equals_one_worker(mode, tiny_backbone, make_images):
    """Two data-parallel workers, each with half the batch and every worker's labels: the mean
    of their losses is the one-worker loss, and the mean of their gradients (what DDP
    averages) the one-worker gradient. Without the other worker's labels, they are not."""
    bb = tiny_backbone
    x = make_images(8, 16, 16, seed=22)
    labels = torch.tensor([0, 3, 1, 1, 4, 2, 0, 3])
    torch.manual_seed(0)
    head = AttentionHead(bb.feature_channels, bb.num_classes)

    def loss(idx, batch_labels):
        cams, logits = training_forward(bb, head, mode, x[idx], labels[idx])
        return lcam_loss(cams, labels[idx], logits, PAPER_LAMBDAS, "reference", batch_labels)

    whole = loss(slice(0, 8), None)
    one = _grads(head, whole["loss"])
    halves = [loss(idx, labels) for idx in (slice(0, 4), slice(4, 8))]
    for key in ("loss", "tv", "area", "ce"):
        assert float((halves[0][key].detach() + halves[1][key].detach()) / 2) == pytest.approx(
            float(whole[key].detach()), rel=1e-5), key
    two = [(a + b) / 2 for a, b in zip(*(_grads(head, h["loss"]) for h in halves))]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(one, two))
    alone = [loss(idx, None) for idx in (slice(0, 4), slice(4, 8))]    # each its own labels
    assert float((alone[0]["tv"].detach() + alone[1]["tv"].detach()) / 2) \
        < 0.8 * float(whole["tv"].detach())
