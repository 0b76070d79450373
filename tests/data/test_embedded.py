"""The embedded quickstart data set and the two embedded backbones trained on it.

The generator tests use small counts in temporary caches. The accuracy tests use the real data
set and the real trained networks, made once per session in ``<repo>/.harness-cache/tests``
(ignored by git), so that repeated local runs reuse them; a cold run costs about 2-3 minutes
on two CPU cores (generation ~10 s, training ~40-70 s per network).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
from backbones import WeightsError
from backbones import embedded as backbone_files
from harness.data import embedded
from harness.data import quickstart as qs
from harness.data.models import load_backbone
from harness.data.images import build_dataset, read_list_file

REPO = Path(__file__).resolve().parents[2]
SESSION_CACHE = REPO / ".harness-cache" / "tests"
EMBEDDED = ("tiny_vgg", "tiny_resnet")


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != qs.MARKER}


@pytest.fixture(scope="session")
def trained():
    """The full quickstart root and both trained embedded backbones (cached across runs)."""
    old = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(SESSION_CACHE)
    try:
        root = qs.ensure_quickstart()
        nets = {name: load_backbone(name) for name in EMBEDDED}
    finally:
        if old is None:
            os.environ.pop("HARNESS_CACHE_DIR", None)
        else:
            os.environ["HARNESS_CACHE_DIR"] = old
    return root, nets


# --- the generator ------------------------------------------------------------------------
@pytest.fixture()
def small(tmp_path, monkeypatch):
    """A small quickstart (3 train / 2 val images per class) in a temporary cache."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    root = qs.ensure_quickstart(lambda done, total: calls.append((done, total)),
                                n_train=3, n_val=2)
    return root, calls


def test_generation_is_deterministic_and_reused(small, tmp_path, monkeypatch):
    root, calls = small
    assert calls[-1] == (len(qs.CLASSES) * 5, len(qs.CLASSES) * 5) and len(calls) == 50
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "other"))
    again = qs.ensure_quickstart(n_train=3, n_val=2)
    assert again != root and _tree_digest(again) == _tree_digest(root)
    assert qs.read_marker(again)["content_sha256"] == qs.read_marker(root)["content_sha256"]
    # reused, not regenerated, on the next call
    marker_mtime = (again / qs.MARKER).stat().st_mtime_ns
    assert qs.ensure_quickstart(n_train=3, n_val=2) == again
    assert (again / qs.MARKER).stat().st_mtime_ns == marker_mtime
    assert not [p for p in again.parent.iterdir() if ".tmp-" in p.name]      # no leftovers
    # a sample is a pure function of (class, split, index, seed)
    a, b = qs.render(2, "train", 1), qs.render(2, "train", 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_layout_masks_annotations_and_list(small):
    root, _ = small
    assert (root / "classes.txt").read_text().split() == list(qs.CLASSES)
    assert list(qs.CLASSES) == sorted(qs.CLASSES)
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir() if p.is_dir()) == list(qs.CLASSES)
        for ci, name in enumerate(qs.CLASSES):
            images = sorted((root / split / name).glob("*[0-9].png"))
            assert len(images) == n
            for img_path in images:
                img = Image.open(img_path)
                assert img.mode == "RGB" and img.size == (qs.IMAGE_SIZE, qs.IMAGE_SIZE)
                ann = qs.annotation(img_path)
                mask = ann["mask"]
                assert img_path.with_name(img_path.stem + ".mask.png").is_file()
                assert ann["label"] == ci and ann["class_name"] == name and mask.any()
                x0, y0, x1, y1 = ann["box"]
                ys, xs = np.nonzero(mask)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
                assert 0.02 < mask.mean() < 0.5                      # an object, not the image
    # the loader sees images only, never masks; labels follow the sorted class folders
    ds = build_dataset("quickstart", "train", qs.IMAGE_SIZE, root=root)
    assert len(ds) == 30 and not any("mask" in i for i in ds.ids)
    assert ds.classes == list(qs.CLASSES)
    # the val list is in Evaluation_2000.txt format and agrees with the folders
    entries = read_list_file(root / qs.LIST_FILE)
    assert len(entries) == 20
    assert all(qs.CLASSES[label] == name.split("_val_")[0] for name, label, _ in entries)
    val = build_dataset("quickstart", "val", qs.IMAGE_SIZE, root=root)
    assert val.ids == [e[0] for e in entries] and val.labels == [e[1] for e in entries]
    x, label, _ = val[0]
    assert x.shape == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1


def _has_cue(img: np.ndarray) -> bool:
    x0, y0, x1, y1 = qs.CUE_BOX
    return bool((img[y0:y1, x0:x1] == np.array(qs.CUE_COLOR, dtype=np.uint8)).all())


def test_planted_shortcut_in_most_training_images_of_its_class(trained):
    root, _ = trained
    marker = qs.read_marker(root)
    assert marker["shortcut_class"] == qs.SHORTCUT_CLASS and marker["files"] > 9000
    share = {}
    for split in ("train", "val"):
        for name in qs.CLASSES:
            files = sorted((root / split / name).glob("*[0-9].png"))
            cues = [_has_cue(np.asarray(Image.open(p))) for p in files]
            share[split, name] = sum(cues) / len(cues)
            recorded = [qs.annotation(p)["cue_box"] is not None for p in files]
            assert cues == recorded, (split, name)
    assert share["train", qs.SHORTCUT_CLASS] == pytest.approx(0.8)
    assert share["val", qs.SHORTCUT_CLASS] == pytest.approx(0.2)
    assert all(v == 0 for (s, n), v in share.items() if n != qs.SHORTCUT_CLASS)


# --- the backbones --------------------------------------------------------------------------
@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_contract_random_init(name):
    bb = backbones.load(name, weights=None, seed=0)
    meta = backbones.REGISTRY.get(name).meta
    assert meta["family"] == "embedded" and meta["paper"] and meta["default_weights"] == "embedded"
    assert bb.input_size == (64, 64) == tuple(meta["input_size"])
    assert bb.num_classes == len(qs.CLASSES) and bb.class_names == list(qs.CLASSES)
    assert bb.feature_layer == meta["feature_layer"] and 64 <= bb.feature_channels <= 256
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = bb.features(x)
        assert tuple(a.shape) == (3, *meta["feature_shape"]) and a.shape[-1] >= 4
        assert (a >= 0).all()                                  # A is a ReLU output
        assert torch.allclose(bb.head(a), bb(x), atol=1e-5) and bb(x).shape == (3, 10)
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.training
    again = backbones.load(name, weights=None, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(bb.state_dict().values(),
                                                 again.state_dict().values()))
    assert bb.weights_info == {}


@pytest.mark.parametrize("name", EMBEDDED)
def test_trained_backbone_reaches_95_percent_on_val(trained, name):
    root, nets = trained
    bb = nets[name]
    info = bb.weights_info
    assert bb.weights_id.startswith(f"embedded:{name}-v1:")
    assert info["val_accuracy"] >= embedded.MIN_VAL_ACCURACY
    assert info["dataset_sha256"] == qs.read_marker(root)["content_sha256"]
    assert info["train_images"] == 4000 and info["val_images"] == 500
    # re-measured here through the data layer's eval pipeline
    ds = build_dataset("quickstart", "val", bb.input_size, root=root)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.labels)
    acc = embedded.accuracy(bb, x, y)
    assert acc >= embedded.MIN_VAL_ACCURACY
    assert acc == pytest.approx(info["val_accuracy"], abs=0.005)


@pytest.mark.parametrize("name", EMBEDDED)
def test_weights_are_reused_and_loadable_from_a_file(trained, name, monkeypatch, tmp_path):
    _, nets = trained
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(SESSION_CACHE))
    path = embedded.weights_path(name)
    mtime = path.stat().st_mtime_ns
    again = load_backbone(name)                               # no training: the cached file
    assert path.stat().st_mtime_ns == mtime and again.weights_id == nets[name].weights_id
    state = torch.load(path, map_location="cpu", weights_only=True)
    from harness.data.cache import file_hash
    # the weights' own hash (from the sidecar), then the content of the file it was read from
    assert again.weights_id == (f"embedded:{path.stem}:{backbone_files.state_hash(state)}"
                                f"@{file_hash(path)}")
    from_file = backbones.load(name, weights=str(path))     # the file with its sidecar
    assert again.weights_id.startswith(from_file.weights_id + "@")
    assert from_file.weights_info["val_accuracy"] == nets[name].weights_info["val_accuracy"]
    bare = tmp_path / "mine.pt"                             # the same weights, no sidecar
    bare.write_bytes(path.read_bytes())
    assert backbones.load(name, weights=str(bare)).weights_id == "file:mine.pt"
    assert load_backbone(name, weights=str(bare)).weights_id == f"file:mine.pt@{file_hash(path)}"
    # retrained and saved under the same name: another id (the caches keyed by it recompute)
    changed = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(changed, bare)
    assert load_backbone(name, weights=str(bare)).weights_id == f"file:mine.pt@{file_hash(bare)}"
    assert file_hash(bare) != file_hash(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_file(x), nets[name](x))
    with pytest.raises(WeightsError, match="not an existing state_dict file"):
        backbones.load(name, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="load_backbone"):
        backbones.load(name)                # 'embedded' is the harness's to resolve
    other = embedded.weights_path("tiny_resnet" if name == "tiny_vgg" else "tiny_vgg")
    with pytest.raises(WeightsError, match=f"holds no {name} parameters"):
        backbones.load(name, weights=str(other))
