"""The data layer on a tiny fake ImageNet tree: layout, preprocessing, subsets, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data.images import (PAPER_LIST, DataError, build_dataset, list_hash, load_image,
                          read_list_file, sizes_for)


def _save(path: Path, mode: str = "RGB", size=(300, 200), fmt="JPEG", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, fmt)
    return path


@pytest.fixture()
def tree(tmp_path):
    """root/{train,val}/<wnid>/... with an RGB, a grayscale, a CMYK and a truncated JPEG."""
    root = tmp_path / "imagenet"
    val = root / "val"
    _save(val / "n02" / "ILSVRC2012_val_00000001.JPEG", seed=1)
    _save(val / "n01" / "ILSVRC2012_val_00000002.JPEG", "L", seed=2)
    _save(val / "n01" / "ILSVRC2012_val_00000003.JPEG", "CMYK", size=(200, 300), seed=3)
    bad = _save(val / "n03" / "ILSVRC2012_val_00000004.JPEG", seed=4)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])      # truncated
    _save(val / "n03" / "ILSVRC2012_val_00000005.png", fmt="PNG", size=(64, 64), seed=5)
    _save(val / "n03" / "ILSVRC2012_val_00000005.mask.png", "L", fmt="PNG", size=(64, 64))
    for i, wnid in enumerate(("n01", "n02", "n03")):
        _save(root / "train" / wnid / f"{wnid}_{i}.JPEG", seed=10 + i)
    return root


def _list(tmp_path, text: str) -> Path:
    p = tmp_path / "list.txt"
    p.write_text(text)
    return p


def test_sizes_follow_the_backbone_input():
    assert sizes_for(224) == (256, (224, 224))
    assert sizes_for(64) == (73, (64, 64))
    assert sizes_for((64, 64), "quickstart") == (64, (64, 64))


def test_folder_layout_classes_ids_and_mask_files(tree):
    ds = build_dataset("imagenet", "val", 224, root=tree, on_bad_image="skip")
    assert ds.classes == ["n01", "n02", "n03"]                 # sorted wnids, as ImageFolder
    assert ds.ids == ["n01/ILSVRC2012_val_00000002.JPEG", "n01/ILSVRC2012_val_00000003.JPEG",
                      "n02/ILSVRC2012_val_00000001.JPEG", "n03/ILSVRC2012_val_00000005.png"]
    assert ds.labels == [0, 0, 1, 2]
    assert ds.skipped == 1 and "00000004" in str(ds.bad[0][0])     # the truncated JPEG
    assert not any("mask" in i for i in ds.ids)


def test_eval_preprocessing_is_resize_center_crop_in_unit_range(tree):
    ds = build_dataset("imagenet", "val", 224, root=tree, on_bad_image="skip")
    for x, label, image_id in ds:
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert isinstance(label, int) and isinstance(image_id, str)
    # the reference pipeline: shorter side 256 (bilinear), center crop 224, no normalisation
    img = Image.open(tree / "val" / "n02" / "ILSVRC2012_val_00000001.JPEG").convert("RGB")
    img = img.resize((384, 256), Image.Resampling.BILINEAR)
    ref = torch.from_numpy(np.asarray(img.crop((80, 16, 304, 240)), dtype=np.float32) / 255)
    got = ds[2][0].permute(1, 2, 0)
    assert torch.allclose(got, ref, atol=1 / 255 + 1e-6)


def test_grayscale_and_cmyk_become_rgb(tree):
    gray = load_image(tree / "val" / "n01" / "ILSVRC2012_val_00000002.JPEG")
    cmyk = load_image(tree / "val" / "n01" / "ILSVRC2012_val_00000003.JPEG")
    assert gray.mode == cmyk.mode == "RGB"
    arr = np.asarray(gray)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_train_transform_random_crop_and_flip(tree):
    ds = build_dataset("imagenet", "train", 224, root=tree, train=True)
    torch.manual_seed(0)
    a = ds[0][0]
    torch.manual_seed(1)
    b = ds[0][0]
    assert a.shape == b.shape == (3, 224, 224)
    assert not torch.equal(a, b)


def test_truncated_image_stop_names_the_file(tree):
    ds = build_dataset("imagenet", "val", 224, root=tree)           # "stop": lazy decoding
    i = ds.ids.index("n03/ILSVRC2012_val_00000004.JPEG")
    with pytest.raises(DataError, match="ILSVRC2012_val_00000004.JPEG"):
        ds[i]
    with pytest.raises(DataError, match="00000004"):
        ds.verify()


def test_list_file_nested_and_flat_with_missing_file(tree, tmp_path):
    text = ("ILSVRC2012_val_00000001.JPEG 1 \n\n# a comment\n"
            "ILSVRC2012_val_00000002.JPEG 0\nILSVRC2012_val_00000099.JPEG 2\n")
    lst = _list(tmp_path, text)
    with pytest.raises(DataError, match=r"list\.txt:5: 'ILSVRC2012_val_00000099.JPEG' not found"):
        build_dataset("imagenet", "val", 224, root=tree, list_file=lst)
    ds = build_dataset("imagenet", "val", 224, root=tree, list_file=lst, on_bad_image="skip")
    assert ds.ids == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert ds.labels == [1, 0] and ds.skipped == 1 and "list.txt:5" in ds.bad[0][1]
    # a flat folder: root/val/<file>
    flat = tmp_path / "flat"
    _save(flat / "val" / "ILSVRC2012_val_00000001.JPEG", seed=1)
    _save(flat / "val" / "ILSVRC2012_val_00000002.JPEG", seed=2)
    ds2 = build_dataset("imagenet", "val", 224, root=flat, list_file=lst, on_bad_image="skip")
    assert ds2.ids == ds.ids and torch.equal(ds2[0][0], ds[0][0])
    assert ds2.list_hash == ds.list_hash


@pytest.mark.parametrize("line, what", [
    ("ILSVRC2012_val_00000001.JPEG", "expected '<file name> <label>'"),
    ("ILSVRC2012_val_00000001.JPEG seven", "label 'seven' is not an integer"),
    ("a.JPEG 1 2", "expected '<file name> <label>'"),
    ("a.JPEG -1", "negative"),
])
def test_malformed_list_line_reports_file_and_line(tmp_path, line, what):
    lst = _list(tmp_path, f"ILSVRC2012_val_00000002.JPEG 0\n{line}\n")
    with pytest.raises(DataError) as err:
        read_list_file(lst)
    assert f"{lst}:2:" in str(err.value) and what in str(err.value)


def test_label_out_of_range_for_class_folders(tree, tmp_path):
    lst = _list(tmp_path, "ILSVRC2012_val_00000001.JPEG 7\n")
    with pytest.raises(DataError, match=r"list\.txt:1: label 7 is out of range"):
        build_dataset("imagenet", "val", 224, root=tree, list_file=lst)


def test_missing_root_split_and_bad_arguments(tree, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("imagenet", "val", 224, root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs a root"):
        build_dataset("imagenet", "val", 224)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/train does not exist"):
        build_dataset("imagenet", "train", 224, root=tmp_path / "empty")
    with pytest.raises(DataError, match="kind"):
        build_dataset("coco", "val", 224, root=tree)
    with pytest.raises(DataError, match="on_bad_image"):
        build_dataset("imagenet", "val", 224, root=tree, on_bad_image="ignore")
    with pytest.raises(DataError, match="cannot read list file"):
        build_dataset("imagenet", "val", 224, root=tree, list_file=tmp_path / "nope.txt")


def test_seeded_random_draw_and_limit(tree):
    full = build_dataset("imagenet", "val", 224, root=tree)
    a = build_dataset("imagenet", "val", 224, root=tree, random_count=3, seed=5)
    b = build_dataset("imagenet", "val", 224, root=tree, random_count=3, seed=5)
    assert a.ids == b.ids and len(a) == 3 and set(a.ids) <= set(full.ids)
    assert a.ids == [i for i in full.ids if i in a.ids]               # list order kept
    draws = {tuple(build_dataset("imagenet", "val", 224, root=tree, random_count=2,
                                 seed=s).ids) for s in range(8)}
    assert len(draws) > 1
    # limit spreads over the classes: the first image of each class (a class-sorted folder's
    # first two images would both be n01's)
    firsts = [next(i for i in full.ids if i.startswith(c)) for c in ("n01/", "n02/")]
    assert build_dataset("imagenet", "val", 224, root=tree, limit=2).ids == firsts
    with pytest.raises(DataError, match="random_count 9 exceeds the 5 images"):
        build_dataset("imagenet", "val", 224, root=tree, random_count=9)


def test_list_hash_is_stable_and_sensitive():
    h = list_hash([("a.JPEG", 1), ("b.JPEG", 2)])
    assert h == list_hash([("a.JPEG", 1), ("b.JPEG", 2)]) and len(h) == 16
    assert h != list_hash([("b.JPEG", 2), ("a.JPEG", 1)])
    assert h != list_hash([("a.JPEG", 1), ("b.JPEG", 3)])


def test_paper_list_is_shipped_and_pinned():
    entries = read_list_file(PAPER_LIST)
    assert len(entries) == 2000 and len({e[0] for e in entries}) == 2000
    assert entries[0][:2] == ("ILSVRC2012_val_00010011.JPEG", 248)
    assert all(0 <= label < 1000 for _, label, _ in entries)
    assert list_hash((n, label) for n, label, _ in entries) == PAPER_LIST_HASH


PAPER_LIST_HASH = "69e510cc608124e1"


def test_a_training_set_is_not_decoded_up_front_and_skips_a_bad_image_when_read(tree):
    bad = tree / "train" / "n02" / "n02_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])                                # corrupt
    ds = build_dataset("imagenet", "train", 224, root=tree, train=True, on_bad_image="skip")
    assert len(ds) == 3 and ds.skipped == 0                               # nothing decoded yet
    with pytest.warns(UserWarning, match="n02_1.JPEG"):
        _, label, image_id = ds[1]
    assert (label, image_id) == (2, "n03/n03_2.JPEG")                     # the next good one
    stop = build_dataset("imagenet", "train", 224, root=tree, train=True, on_bad_image="stop")
    with pytest.raises(DataError, match="n02_1.JPEG"):
        stop[1]


def test_limit_spreads_over_the_classes_in_list_order():
    from harness.data.images import spread
    labels = [0, 0, 0, 1, 1, 2, 0, 2]
    assert spread(labels, 3) == [0, 3, 5]              # one of each class
    assert spread(labels, 5) == [0, 1, 3, 4, 5]        # then the second of each
    assert spread(labels, 20) == list(range(8))
    assert spread([5, 1, 5, 1], 2) == [0, 1]           # classes in order of appearance
