"""``include:`` (harness.spec.includes): a spec over its bases, and the Table 1 presets built
on ``jobs/presets/table1.yaml``."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.spec import SpecError, load_spec
from harness.spec.includes import merge

REPO = Path(__file__).resolve().parents[2]
SPEC = """schema: 1
name: inc
backbones: [tiny_vgg]
methods: [gradcam, scorecam]
"""


def test_mappings_merge_key_by_key_and_everything_else_replaces():
    base = {"train": {"epochs": 3, "lr": 0.1}, "methods": ["a", "b"], "seed": 1}
    over = {"train": {"epochs": 1}, "methods": ["c"], "seed": None}
    assert merge(base, over) == {"train": {"epochs": 1, "lr": 0.1}, "methods": ["c"],
                                 "seed": None}
    assert base == {"train": {"epochs": 3, "lr": 0.1}, "methods": ["a", "b"], "seed": 1}


def test_a_spec_takes_its_bases_values_under_its_own_and_overrides_last(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "first.yaml").write_text(
        "include: second.yaml\ntrain: {epochs: 3, lr: 0.02}\nevaluation: {overlays: 0}\n")
    (tmp_path / "bases" / "second.yaml").write_text("train: {epochs: 5, batch_size: 4}\nseed: 7\n")
    (tmp_path / "other.yaml").write_text("seed: 9\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: [bases/first.yaml, other.yaml]\n" + SPEC + "train: {epochs: 1}\n")
    spec = load_spec(top, ["train.lr=0.03"])
    assert (spec.train.epochs, spec.train.lr, spec.train.batch_size) == (1, 0.03, 4)
    assert spec.seed == 9 and spec.evaluation.overlays == 0     # the later base wins
    assert [m.name for m in spec.methods] == ["gradcam", "scorecam"]


def test_a_problem_in_a_base_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("include: gone.yaml\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: base.yaml\n" + SPEC)
    with pytest.raises(SpecError) as err:
        load_spec(top)
    assert f"in {tmp_path / 'base.yaml'}: gone.yaml is not a file" in str(err.value)
    (tmp_path / "base.yaml").write_text("train: {epochs: [\n")          # broken YAML
    with pytest.raises(SpecError) as err:
        load_spec(top)
    assert str(tmp_path / "base.yaml") in str(err.value)


def test_a_value_of_the_base_is_validated_as_the_spec_s_own(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: -2}\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: base.yaml\n" + SPEC)
    with pytest.raises(SpecError, match=r"train\.epochs"):
        load_spec(top)


def test_includes_deeper_than_the_limit_are_refused(tmp_path):
    for i in range(10):
        (tmp_path / f"b{i}.yaml").write_text(f"include: b{i + 1}.yaml\n" if i < 9 else "seed: 1\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: b0.yaml\n" + SPEC)
    with pytest.raises(SpecError, match="more than 8 files deep"):
        load_spec(top)


@pytest.mark.parametrize("name, backbone, epochs, lr, per_task", [
    ("table1_vgg16", "vgg16", 8, 0.01, 50), ("table1_resnet50", "resnet50", 26, 1e-4, 50),
    ("table1_vgg16_7x7", "vgg16_7x7", 8, 0.01, 100)])
def test_the_table1_presets_share_their_base(tmp_path, name, backbone, epochs, lr, per_task):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    text = (REPO / "jobs" / f"{name}.yaml").read_text()
    assert "include: presets/table1.yaml" in text and "lambda3" not in text
    spec = load_spec(REPO / "jobs" / f"{name}.yaml",
                     [f"data.root={tmp_path}", "ray.address=ray://head:10001"])
    assert spec.name == name and [b.name for b in spec.backbones] == [backbone]
    assert (spec.train.epochs, spec.train.lr, spec.train.batch_size) == (epochs, lr, 64)
    assert (spec.train.lambda1, spec.train.lambda2, spec.train.lambda3,
            spec.train.lambda4) == (0.01, 2.0, 1.5, 0.3)
    assert spec.train.variant == "reference" and spec.data.list_file == "builtin:Evaluation_2000"
    assert spec.sharding.images_per_task == per_task and spec.sharding.max_retries == 3
    assert spec.tracking.experiment == "lcam-table1"
    assert spec.tracking.tags == {"table1": backbone}
