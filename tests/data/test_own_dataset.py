"""Your own data set (issue 22): a folder with its classes, a classifier with its own number
of classes, identities by content. On the worked example's generated 3-class folder
(``examples/own-dataset/shapes3.py``), small: no Ray, no training of a backbone."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import backbones
from harness.data.folders import DataError
from harness.data.images import build_dataset

REPO = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location(
        "shapes3", REPO / "examples" / "own-dataset" / "shapes3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes3(tmp_path_factory):
    return _example().make(tmp_path_factory.mktemp("own") / "shapes3", train_per_class=4,
                           val_per_class=3)


def test_labels_follow_the_class_list_and_names_are_shown(shapes3, tmp_path):
    ds = build_dataset("folder", "val", 64, root=shapes3)
    assert ds.classes == ["house", "sun", "tree"] and ds.name == "shapes3"
    assert [i.split("/")[0] for i in ds.ids] == ["house"] * 3 + ["sun"] * 3 + ["tree"] * 3
    # a class list in another order than the folders' names: the labels follow the list
    order = tmp_path / "order.txt"
    order.write_text("tree\nhouse\nsun\n")
    again = build_dataset("folder", "val", 64, root=shapes3, classes=order, name="mine")
    assert dict(zip(again.ids, again.labels))["tree/tree_0000.png"] == 0
    assert again.classes == ["tree", "house", "sun"] and again.name == "mine"
    # a folder the list does not name is refused, naming it
    order.write_text("house\nsun\n")
    with pytest.raises(DataError, match="class folder 'tree' is not in the class list"):
        build_dataset("folder", "val", 64, root=shapes3, classes=order)


def test_limit_takes_every_class(shapes3):
    ds = build_dataset("folder", "val", 64, root=shapes3, limit=3)
    assert sorted(ds.labels) == [0, 1, 2]


def test_a_backbone_of_other_classes_is_refused_naming_both(shapes3):
    from harness.pipeline.inputs import InputRefused, check_classes
    ds = build_dataset("folder", "val", 64, root=shapes3)
    with pytest.raises(InputRefused, match=r"tiny_vgg has 10 output classes, but the data set "
                                           r"'shapes3' has 3"):
        check_classes("tiny_vgg", 10, ds)
    check_classes("tiny_vgg", 3, ds)


@pytest.mark.parametrize("name", ["resnet18", "tiny_vgg"])
def test_a_state_dict_of_three_classes_gives_a_three_class_backbone(name, tmp_path):
    from backbones.embedded import ARCHS
    import torchvision
    model = ARCHS[name](num_classes=3) if name in ARCHS else torchvision.models.resnet18(
        num_classes=3)
    path = tmp_path / "three.pt"
    torch.save(model.state_dict(), path)
    bb = backbones.load(name, weights=str(path))
    size = bb.input_size
    assert bb.num_classes == 3 and bb(torch.rand(1, 3, *size)).shape == (1, 3)
    torch.save({"not": "weights"}, path)                     # the wrong file: named, whole
    with pytest.raises(backbones.WeightsError, match=f"{path}' holds no {name} parameters "
                                                     r"\(its keys: 'not'\)"):
        backbones.load(name, weights=str(path))
    path.write_text("junk")
    with pytest.raises(backbones.WeightsError, match=f"{path}.*not a readable state_dict"):
        backbones.load(name, weights=str(path))


def test_a_changed_image_under_the_same_name_changes_the_listing(shapes3):
    before = build_dataset("folder", "val", 64, root=shapes3).info["files"]
    image = shapes3 / "val" / "sun" / "sun_0001.png"
    data, stat = image.read_bytes(), image.stat()
    try:
        image.write_bytes(data + b"\0")
        assert build_dataset("folder", "val", 64, root=shapes3).info["files"] != before
    finally:
        image.write_bytes(data)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_dataset("folder", "val", 64, root=shapes3).info["files"] == before


def test_boxes_and_masks_of_a_folder_give_the_localisation_regions(shapes3):
    from harness.metrics.localisation import folder_regions
    image = shapes3 / "val" / "house" / "house_0002.png"
    box = json.loads((shapes3 / "val" / "annotations.json").read_text())[
        "house/house_0002.png"]["box"]
    reg = folder_regions(image, (64, 64), "folder")
    assert reg is not None and reg.mask is not None and reg.cue is None
    # 64 x 64 images: resized to 73 then centre-cropped to 64 (the ImageNet rule)
    assert reg.box.sum() > 0 and (reg.mask & ~reg.box).sum() <= reg.mask.sum() * 0.1
    assert box[2] > box[0] and box[3] > box[1]
    assert folder_regions(shapes3 / "train" / "house" / "house_0000.png", (64, 64)) is None
