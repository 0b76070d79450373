"""Localisation (energy-based pointing game, VOC boxes under the eval transform), the
model-parameter randomisation test and the analysis figures, on tiny synthetic inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import methods
from harness.metrics import localisation, sanity
from harness.results import analysis
from harness.data.images import make_transform


# -- the energy share -------------------------------------------------------------------------
def test_energy_share_on_off_and_half_the_box():
    size = (20, 30)
    box = localisation.box_mask((5, 4, 15, 12), size)            # x0, y0, x1, y1 (exclusive)
    assert int(box.sum()) == 10 * 8
    on = box.double() * 0.7
    off = (~box).double()
    half = box.double() / box.sum() + (~box).double() / (~box).sum()   # equal energy in/out
    scores = localisation.energy_share(torch.stack([on, off, half]), box.expand(3, *size))
    assert scores.tolist()[:2] == [1.0, 0.0]
    assert scores[2].item() == pytest.approx(0.5, abs=1e-12)


def test_energy_share_zero_map_scores_zero_and_negatives_are_clamped():
    box = localisation.box_mask((0, 0, 2, 2), (4, 4))
    v = torch.zeros(4, 4)
    assert localisation.energy_share(v, box).tolist() == [0.0]       # 0/0 := 0
    v[0, 0], v[3, 3] = 1.0, -5.0
    assert localisation.energy_share(v, box).tolist() == [1.0]


def test_pointing_game_accumulates_and_shortcut_shares():
    size = (8, 8)
    cue = localisation.box_mask((0, 0, 2, 2), size)
    obj = localisation.box_mask((4, 4, 8, 8), size)
    v = cue.double() * 3 + obj.double()                  # 12 on the cue, 16 on the object
    c, o = localisation.shortcut_shares(v[None], cue[None], obj[None])
    assert c.item() == pytest.approx(12 / 28) and o.item() == pytest.approx(16 / 28)
    game = localisation.EnergyPointingGame()
    game.update(v[None], obj[None])
    game.update(obj.double()[None], obj[None])
    assert game.compute() == pytest.approx((16 / 28 + 1) / 2)
    assert localisation.EnergyPointingGame().compute() != localisation.EnergyPointingGame().compute()


def test_energy_metrics_ignore_nan_rows():
    import pyarrow as pa
    cols = {"energy_box": [0.5, math.nan, 1.0], "energy_mask": [math.nan] * 3,
            "energy_cue": [0.2, math.nan, math.nan], "energy_cue_object": [0.4, math.nan, math.nan]}
    expected = {"localisation_energy": 0.75, "localisation_cue_energy": 0.2,
                "localisation_cue_object_energy": 0.4, "localisation_images": 2.0}
    assert localisation.energy_metrics(cols) == expected
    assert localisation.energy_metrics(pa.table({"Y": [0.1] * 3, **cols})) == expected
    assert localisation.energy_metrics(pa.table({"Y": [0.1]})) == {}


# -- VOC boxes under the eval transform -------------------------------------------------------
VOC = """<annotation><folder>val</folder><filename>ILSVRC2012_val_00000001</filename>
<size><width>300</width><height>200</height><depth>3</depth></size>
<object><name>n01751748</name><bndbox><xmin>51</xmin><ymin>41</ymin><xmax>150</xmax>
<ymax>120</ymax></bndbox></object>
<object><name>n00000000</name><bndbox><xmin>281</xmin><ymin>181</ymin><xmax>300</xmax>
<ymax>200</ymax></bndbox></object></annotation>"""


def test_voc_parse_and_box_under_resize_and_center_crop(tmp_path):
    xml = tmp_path / "ILSVRC2012_val_00000001.xml"
    xml.write_text(VOC)
    ann = localisation.parse_voc(xml)
    assert (ann.width, ann.height) == (300, 200)
    assert ann.boxes("n01751748") == [(50.0, 40.0, 150.0, 120.0)]    # 1-based inclusive -> [)
    # input 64 (ImageNet recipe): shorter side 200 -> 73, longer 300 -> int(73 * 1.5) = 109;
    # center crop 64: top = round(4.5) = 4, left = round(22.5) = 22.
    geo = localisation.EvalGeometry.of((200, 300), 64, "imagenet")
    assert geo.resized == (73, 109) and geo.offset == (4, 22) and geo.crop == (64, 64)
    x0, y0, x1, y1 = geo.box(ann.boxes("n01751748")[0])
    assert x0 == 0.0                                        # clipped at the crop's left edge
    assert x1 == pytest.approx(150 * 109 / 300 - 22)
    assert y0 == pytest.approx(40 * 73 / 200 - 4) and y1 == pytest.approx(120 * 73 / 200 - 4)
    assert geo.box(ann.boxes("n00000000")[0])[0] == 64.0    # entirely cropped away: empty
    # Raster check: the same box painted into an image and sent through the data transform.
    img = np.zeros((200, 300, 3), np.uint8)
    img[40:120, 50:150] = 255
    moved = make_transform(64, train=False, kind="imagenet")(Image.fromarray(img))[0] > 0.5
    mine = localisation.box_mask((x0, y0, x1, y1), (64, 64))
    iou = (moved & mine).sum().item() / (moved | mine).sum().item()
    assert iou > 0.93, iou
    reg = localisation.voc_regions(xml, 64, "imagenet", name="n01751748")
    assert torch.equal(reg.box, mine)


def test_box_transform_when_the_crop_pads():
    geo = localisation.EvalGeometry.of((10, 10), (20, 20), "quickstart")   # resize 20: no pad
    assert geo.offset == (0, 0)
    geo = localisation.EvalGeometry.of((30, 10), (16, 16), "quickstart", resize=8)
    assert geo.resized == (24, 8) and geo.offset == (4, -4)


@pytest.fixture(scope="module")
def quickstart_val(tmp_path_factory):
    import os
    from harness.data.images import build_dataset
    from harness.data.quickstart import ensure_quickstart
    old = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        root = ensure_quickstart(n_train=1, n_val=5)
        yield build_dataset("quickstart", "val", 64, root=root, list_file=root / "val_list.txt")
    finally:
        if old is None:
            os.environ.pop("HARNESS_CACHE_DIR", None)
        else:
            os.environ["HARNESS_CACHE_DIR"] = old


def test_quickstart_regions_and_energy_columns(quickstart_val):
    from harness.data.quickstart import CLASSES, SHORTCUT_CLASS, annotation
    ds = quickstart_val
    star = [i for i, (_, y, _) in enumerate(ds.items) if CLASSES[y] == SHORTCUT_CLASS]
    with_cue = [i for i in star if annotation(ds.path_of(i))["cue_box"]]
    assert with_cue, "the quickstart val split has a cue image of the shortcut class"
    reg = localisation.regions_for(ds.path_of(with_cue[0]), (64, 64), "quickstart")
    ann = annotation(ds.path_of(with_cue[0]))
    assert torch.equal(reg.mask, torch.from_numpy(ann["mask"]))      # identity transform
    assert int(reg.cue.sum()) == 36 and (reg.mask & reg.box).sum() == reg.mask.sum()
    idx = [with_cue[0], star[-1]]
    maps = torch.stack([reg.cue.double(), reg.box.double()]).float()
    cols = localisation.energy_columns(ds, idx, maps)
    assert cols["energy_cue"][0] == 1.0 and cols["energy_cue_object"][0] == 0.0
    assert math.isnan(cols["energy_cue"][1]) and cols["energy_box"][1] > 0


# -- the randomisation test -------------------------------------------------------------------
def test_randomisation_test_cascade(helpers):
    bb = helpers.tiny()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    images = helpers.images(3, 16, 16, seed=1)
    ex = methods.create("gradcam", bb)
    assert [n for n, _ in sanity.parameterised_layers(bb)] == ["tail.2", "body.2", "body.0"]
    none = sanity.randomisation_test(ex, images, steps=0)
    assert [s.layer for s in none.steps] == ["none"]
    assert none.steps[0].spearman == [1.0] * 3 and none.steps[0].ssim == [1.0] * 3
    res = sanity.randomisation_test(ex, images, seed=0)
    assert [s.layer for s in res.steps] == ["none", "tail.2", "body.2", "body.0"]
    assert res.steps[0].mean_spearman == 1.0
    assert all(s.mean_spearman < 1.0 for s in res.steps[1:])
    assert res.steps[-1].mean_spearman < 0.9 and res.steps[-1].mean_ssim < 1.0
    m = res.as_metrics()
    assert m["sanity_spearman_none"] == 1.0 and set(m) >= {"sanity_spearman_tail.2",
                                                           "sanity_ssim_body.0"}
    for k, v in bb.state_dict().items():                      # the original is untouched
        assert torch.equal(v, before[k]), k
    again = sanity.randomisation_test(ex, images, seed=0)     # seeded: reproducible
    assert again.as_metrics() == m


def test_randomisation_of_lcam_touches_maps_only_below_a(helpers):
    bb = helpers.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ex = methods.create("lcam_fm", bb)                   # a fresh (random) head
    images = helpers.images(2, 16, 16, seed=2)
    res = sanity.randomisation_test(ex, images, steps=2, include_explainer_head=True)
    by = {s.layer: s.mean_spearman for s in res.steps}
    assert by["none"] == 1.0 and by["explainer_head"] < 1.0
    ex_only_tail = sanity.randomisation_test(ex, images, steps=1)
    assert ex_only_tail.steps[1].layer == "tail.2" and ex_only_tail.steps[1].mean_spearman == 1.0


def test_spearman_matches_definition_with_ties():
    a = torch.tensor([[[1.0, 2.0], [2.0, 4.0]]])
    b = torch.tensor([[[4.0, 3.0], [3.0, 1.0]]])
    assert sanity.spearman(a, b).item() == pytest.approx(-1.0)
    assert sanity.spearman(a, torch.zeros_like(a)).item() == 0.0        # constant: 0
    assert sanity.spearman(torch.zeros_like(a), torch.zeros_like(a)).item() == 1.0


# -- the analysis figures ---------------------------------------------------------------------
def test_analyse_writes_figures_and_numbers(quickstart_val, tmp_path):
    import backbones
    bb = backbones.load("tiny_vgg", weights=None, seed=0)
    ex = methods.create("gradcam", bb)
    out = analysis.analyse(bb, ex, quickstart_val, tmp_path / "analysis", figure_images=3,
                           localisation_images=20, sanity_images=2, sanity_steps=1)
    names = {p.name for p in out["paths"]}
    assert {"errors.png", "gallery-star.png", "shortcut.png"} <= names, names
    for p in out["paths"]:
        assert p.stat().st_size > 0 and Image.open(p).size[0] > 0
    m = out["metrics"]
    for key in ("error_images", "error_gt_pred_spearman", "gallery_accuracy",
                "shortcut_cue_energy", "shortcut_object_energy", "localisation_energy",
                "localisation_energy_mask", "sanity_spearman_none"):
        assert key in m and math.isfinite(m[key]), (key, m)
    randomised = [k for k in m if k.startswith("sanity_spearman_tail.")]
    assert len(randomised) == 1 and math.isfinite(m[randomised[0]]), m   # one step: the top layer
    assert 0.0 <= m["shortcut_cue_energy"] <= 1.0 and m["localisation_images"] == 20


def test_gallery_reads_the_labels_once_not_per_image():
    """``Prepared.items`` builds its list on each access; the gallery class and its members
    read it once (indexing it per image made a 50,000-image analysis run for hours)."""
    from harness.results.analysis import _gallery_class, labels_of

    class Items:
        info = {"kind": "imagenet"}
        reads = 0

        @property
        def items(self):
            Items.reads += 1
            return [(f"{i}.jpg", i % 3, str(i)) for i in range(3000)]

        def __len__(self):
            return 3000

    data = Items()
    assert _gallery_class(data, errors=[1, 4, 7, 2]) == 1 and Items.reads == 1
    assert labels_of(data)[:4] == [0, 1, 2, 0] and Items.reads == 2
