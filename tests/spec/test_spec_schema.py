"""The spec schema (``harness.spec``): defaults, strict types, scientific-notation strings,
override notes, file order, method parameters (the same check as ``methods.create``), the
fingerprint pinned against the harness before the schema was rewritten, the ``to_dict``
round trip, and README's spec reference generated from the models.

Everything here loads specs in-process (no Ray, no MLflow, no subprocess).
"""
from __future__ import annotations

import pathlib
import re

import pytest
import yaml

import methods
from harness.spec import (SpecError, TrainSection, load_spec, method_params_rows,
                          spec_reference)
from harness.spec.params import params_model
from methods.base import Param, param_problem

REPO = pathlib.Path(__file__).resolve().parents[2]
BASE = "schema: 1\nbackbones: [vgg16]\nmethods:\n  - name: gradcam\n  - name: rise\n"


def write(tmp_path, text: str, name: str = "spec.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path, text: str, overrides=()) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text), overrides)
    return err.value.problems


# -- defaults --------------------------------------------------------------------------------
DOCUMENTED = {   # the defaults README's spec reference documents (and the harness had before)
    "train": {"epochs": 7, "batch_size": 64, "lr": 1e-4, "lr_decay": 0.75,
              "lr_decay_epochs": None, "lambda1": 0.01,
              "lambda2": 2.0, "lambda3": 1.5, "lambda4": 0.3, "variant": "paper",
              "labels": "model", "workers": 1, "placement": "pack", "use_gpu": False,
              "cpus_per_worker": 1.0, "loader_workers": None,
              "tf32": False, "deterministic": False},
    "data": {"kind": "quickstart", "root": None, "classes": None, "name": None,
             "list_file": None, "random_count": None, "limit": None, "train_limit": None,
             "on_bad_image": "stop"},
    "evaluation": {"keep_fractions": [1.0, 0.5, 0.15], "batch_size": 16, "preset": "paper",
                   "overlays": 8, "autocast": False, "channels_last": False,
                   "metrics": ["ad_ic"], "causal_steps": 224, "causal_canvas": "rise",
                   "causal_batch_size": 64, "tf32": False, "deterministic": False},
    "statistics": {"resamples": 10_000, "confidence": 0.95, "method": "bca", "seed": None,
                   "alpha": 0.05, "half_width": 1.0},
    "sharding": {"images_per_task": 50, "cpus_per_task": 1.0, "gpus_per_task": 0.0,
                 "max_retries": 3, "stall_timeout_s": 21600.0},
    "tracking": {"experiment": "spec", "uri": None, "tags": {}},
    "storage": {"uri": None, "cache": None},
    "ray": {"address": None, "num_cpus": None, "runtime_env": {}},
}


def test_defaults_equal_the_documented_ones(tmp_path):
    spec = load_spec(write(tmp_path, BASE))
    out = spec.to_dict()
    for section, values in DOCUMENTED.items():
        assert out[section] == values, section
    assert (out["schema"], out["name"], out["seed"]) == (1, "spec", 0)
    assert out["methods"][1]["params"] == {"n_masks": None, "cell": 7, "p1": 0.5, "seed": 0,
                                           "fill": "mean", "batch_size": 64}
    assert isinstance(spec.sharding.cpus_per_task, float)


def test_the_reference_documents_every_default():
    text = spec_reference()
    for section, values in DOCUMENTED.items():
        block = text.split(f"\n{section}:", 1)[1]
        for key in values:
            assert re.search(rf"^  {key}: ", block, re.M), f"{section}.{key}"
    assert "  lr: 1.0e-4 " in text and "  keep_fractions: [1.0, 0.5, 0.15]" in text


def test_readme_spec_reference_is_generated_from_the_schema():
    readme = (REPO / "README.md").read_text()
    after = readme.split("## Spec reference", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", after, re.S)
    assert block, "no ```yaml block under '## Spec reference' in README.md"
    assert block.group(1) == spec_reference(), (
        "README.md's spec reference is out of date: paste harness.spec.spec_reference()")
    assert yaml.safe_load(spec_reference())["schema"] == 1            # valid YAML


def test_method_params_rows_cover_every_method():
    rows = {name: (variants, params) for name, variants, params in method_params_rows()}
    assert set(rows) == set(methods.names())
    assert rows["rise"][1].startswith("n_masks=null (int >= 1, or null), cell=7 (int >= 2)")
    assert "p1=0.5 (number in (0, 1))" in rows["rise"][1]
    assert rows["scorecam"] == ("paper, reference, channel_softmax", "batch_size=64 (int >= 1)")
    assert rows["lcam_fm"][1] == "-"          # checkpoint is a method-level key of a spec


# -- strict types ----------------------------------------------------------------------------
@pytest.mark.parametrize("override, where, message", [
    ("train.epochs=true", "train.epochs", "expected an integer, got true (a boolean)."),
    ("train.epochs=2.0", "train.epochs", "expected an integer, got 2.0 (a float). Write 2."),
    ("train.epochs=1e3", "train.epochs",
     "expected an integer, got '1e3' (a string). Write the integer out in digits."),
    ("train.lr=true", "train.lr", "expected a number (int or float), got true (a boolean)."),
    ("train.lr=fast", "train.lr", "expected a number (int or float), got 'fast' (a string)."),
    ("train.lr=.inf", "train.lr", "expected a finite number, got inf"),
    ("train.use_gpu=1", "train.use_gpu", "expected true or false, got 1 (an int)"),
    ("train.variant=3", "train.variant", "expected one of paper, reference, got 3 (an int)"),
    ("train.variant=papr", "train.variant", "'papr' is not one of paper, reference. Did you"),
    ("data.root=5", "data.root", "expected a string, got 5 (an int)"),
    ("train.epochs=null", "train.epochs", "null is not allowed; remove the key for the "
                                          "default (7)"),
    ("evaluation.keep_fractions=[0.5, 0.5]", "evaluation.keep_fractions[1]", "0.5 is listed"),
    ("seed=1.5", "seed", "expected an integer, got 1.5 (a float)."),
    ("sharding.cpus_per_task=0", "sharding.cpus_per_task",
     "0 is out of range: cpus_per_task must be > 0"),
    ("train.lr_decay=1.5", "train.lr_decay", "1.5 is out of range: lr_decay must be in (0, 1]"),
    ("tracking.tags={a: 3}", "tracking.tags.a", "tag values are strings, got 3 (an int)"),
])
def test_strict_types_and_ranges(tmp_path, override, where, message):
    found = problems(tmp_path, BASE, [override])
    assert [w for w, _ in found] == [where], found
    assert found[0][1].startswith(message), found[0][1]
    assert found[0][1].endswith(f" (set by override '{override}')")


def test_float_fields_accept_integers_and_store_floats(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "train: {lr: 1, lambda1: 0}\n"
                                            "sharding: {cpus_per_task: 2}\n"))
    assert spec.train.lr == 1.0 and isinstance(spec.train.lr, float)
    assert isinstance(spec.train.lambda1, float) and isinstance(spec.sharding.cpus_per_task, float)


@pytest.mark.parametrize("written, value", [("1e-4", 1e-4), ("5E-1", 0.5), ("+2.5e-3", 2.5e-3),
                                            ("1.0e-4", 1e-4), ("'3e-2'", 0.03)])
def test_scientific_notation_strings_become_floats(tmp_path, written, value):
    spec = load_spec(write(tmp_path, BASE + f"train: {{lr: {written}}}\n"
                                            f"evaluation: {{keep_fractions: [{written}]}}\n"))
    assert spec.train.lr == value and isinstance(spec.train.lr, float)
    assert spec.evaluation.keep_fractions == [value]


def test_scientific_notation_in_params_and_ranges(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "    params: {p1: 2.5e-1}\n"))
    assert spec.methods[1].params["p1"] == 0.25
    found = problems(tmp_path, BASE + "train: {lr: -1e-2}\n")
    assert found == [("train.lr", "-0.01 is out of range: lr must be > 0")]


def test_problems_are_in_file_order_and_say_which_override_set_them(tmp_path):
    text = ("schema: 1\ndata: {limit: 0}\nbackbones: [vgg16]\ntrain: {workers: 0, epochs: x}\n"
            "methods:\n  - name: rise\n    params: {cell: 0, p1: 2}\n")
    found = problems(tmp_path, text, ["methods[0].params.p1=3", "train={epochs: 0}"])
    assert [w for w, _ in found] == ["data.limit", "train.epochs", "methods[0].params.cell",
                                     "methods[0].params.p1"]
    notes = {w: m.endswith(")") and "(set by override" in m for w, m in found}
    assert notes == {"data.limit": False, "train.epochs": True,
                     "methods[0].params.cell": False, "methods[0].params.p1": True}
    assert found[3][1] == ("3 is out of range: p1 must be in (0, 1) "
                           "(set by override 'methods[0].params.p1=3')")


def test_a_bad_key_does_not_hide_the_rules_of_its_section(tmp_path):
    (tmp_path / "list.txt").write_text("a.png 1\n")
    found = problems(tmp_path, BASE + "data: {list_file: list.txt, random_count: 3, limit: x}\n")
    assert [w for w, _ in found] == ["data.random_count", "data.limit"]
    assert "conflicts with data.list_file" in found[0][1]


def test_top_level_sections_may_be_null_and_sweep_is_refused(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "train: null\ntracking: {tags: null}\n"))
    assert spec.train == TrainSection() and spec.tracking.tags == {}
    found = problems(tmp_path, BASE + "sweep: {space: {lr: {choice: [0.1]}}}\n")
    assert found == [("sweep", "'sweep' belongs in a sweep spec: run it with "
                               "'python -m harness tune SPEC'")]


# -- method parameters -----------------------------------------------------------------------
BAD_PARAMS = [
    ("rise", "p1", 2), ("rise", "p1", 0), ("rise", "p1", 1), ("rise", "p1", "half"),
    ("rise", "n_masks", -5), ("rise", "n_masks", 0), ("rise", "n_masks", True),
    ("rise", "n_masks", 10.5), ("rise", "cell", 0), ("rise", "cell", 1), ("rise", "seed", -1),
    ("rise", "fill", "white"), ("rise", "fill", "Black"), ("rise", "batch_size", 0),
    ("rise", "batch_size", -3), ("rise", "batch_size", None), ("scorecam", "batch_size", 0),
    ("scorecam", "batch_size", -3), ("scorecam", "batch_size", "64"),
]


@pytest.mark.parametrize("name, key, value", BAD_PARAMS)
def test_create_refuses_what_the_spec_refuses_in_the_same_words(tmp_path, tiny_backbone,
                                                                name, key, value):
    entry = yaml.safe_dump([{"name": name, "params": {key: value}}], default_flow_style=True)
    found = problems(tmp_path, f"schema: 1\nbackbones: [vgg16]\nmethods: {entry}")
    assert [w for w, _ in found] == [f"methods[0].params.{key}"]
    with pytest.raises(methods.ExplainerInputError) as err:
        methods.create(name, tiny_backbone, **{key: value})
    assert str(err.value) == f"{name}: {key}: {found[0][1]}"


def test_unknown_parameter_is_refused_by_both(tmp_path, tiny_backbone):
    found = problems(tmp_path, BASE + "    params: {n_mask: 10}\n")
    assert found == [("methods[1].params.n_mask", "unknown parameter 'n_mask' of rise. Did you "
                      "mean 'n_masks'? Accepted: n_masks, cell, p1, seed, fill, batch_size")]
    with pytest.raises(methods.ExplainerInputError, match="Did you mean 'n_masks'"):
        methods.create("rise", tiny_backbone, n_mask=10)


@pytest.mark.parametrize("name", methods.names())
def test_every_declared_default_is_accepted(name):
    cls = methods.method_class(name)
    for key, param in cls.params.items():
        assert isinstance(param, Param) and param.help, f"{name}.{key}: no help text"
        assert param_problem(key, param, param.default) is None, f"{name}.{key}"
    model = params_model(cls)
    assert model is params_model(cls)                                # cached per class
    assert model.model_validate({}).model_dump() == {
        k: p.default for k, p in cls.params.items()
        if not (cls.family == "learned" and k == "checkpoint")}


def test_param_problem_words():
    p1 = Param((int, float), 0.5, "keep", gt=0, lt=1)
    assert param_problem("p1", p1, 0.25) is None and param_problem("p1", p1, 1e-9) is None
    assert param_problem("p1", p1, 1.0) == "1.0 is out of range: p1 must be in (0, 1)"
    assert param_problem("p1", p1, float("nan")) == "expected a finite number, got nan"
    assert param_problem("p1", p1, None) == "null is not allowed; remove the key for the " \
                                            "default (0.5)"
    n = Param(int, None, "masks", ge=1)
    assert param_problem("n", n, None) is None
    assert param_problem("n", n, 2.0) == "expected an integer, got 2.0 (a float). Write 2."
    fill = Param(str, "mean", "fill", choices=("mean", "black"))
    assert param_problem("fill", fill, True) == "expected one of mean, black, got true " \
                                                "(a boolean)"


# -- fingerprint and round trip --------------------------------------------------------------
# The values of the harness before the schema was rewritten (same resolved specs): results,
# caches and sweeps keyed by them stay valid. ImageNet jobs: data.root=/data/imagenet.
PINNED = {"quickstart": "dbb59fc1030b84e0", "smoke": "0e2db6d9ad1bf412",
          "paper_text_vgg16": "1374a72f932c1793", "paper_text_resnet50": "384f7536a8e134b7",
          "paper_text_vgg16_7x7": "f088bef14dcb1103"}
# The paper-text jobs were renamed from <backbone>_imagenet (issue 13): under their old
# name they give the old fingerprints, i.e. only the name changed.
RENAMED = {"paper_text_vgg16": ("vgg16_imagenet", "f830cdc01454dc67"),
           "paper_text_resnet50": ("resnet50_imagenet", "3213ea59156db87b"),
           "paper_text_vgg16_7x7": ("vgg16_7x7_imagenet", "ca66d584e37d25fe")}


@pytest.fixture
def fake_imagenet(monkeypatch):
    """/data/imagenet (with train/ and val/) exists, for these tests only."""
    real = pathlib.Path.is_dir
    monkeypatch.setattr(pathlib.Path, "is_dir",
                        lambda self: str(self).startswith("/data/imagenet") or real(self))
    return ["data.root=/data/imagenet", "ray.address=auto"]


@pytest.mark.parametrize("job", sorted(PINNED))
def test_fingerprint_is_pinned(job, fake_imagenet):
    overrides = fake_imagenet if job in RENAMED else []
    spec = load_spec(REPO / "jobs" / f"{job}.yaml", overrides)
    assert spec.fingerprint() == PINNED[job]
    if job in RENAMED:
        old, pinned = RENAMED[job]
        assert load_spec(REPO / "jobs" / f"{job}.yaml",
                         [*overrides, f"name={old}"]).fingerprint() == pinned


def test_fingerprint_ignores_where_results_go(tmp_path):
    spec = load_spec(REPO / "jobs" / "smoke.yaml")
    moved = load_spec(REPO / "jobs" / "smoke.yaml", ["tracking.experiment=x", "ray.num_cpus=2",
                                                     f"storage.uri={tmp_path}"])
    assert moved.fingerprint() == spec.fingerprint()
    assert load_spec(REPO / "jobs" / "smoke.yaml", ["methods[3].params.p1=0.25"]).fingerprint() \
        != spec.fingerprint()


def test_to_dict_round_trips(tmp_path):
    (tmp_path / "head.pt").write_text("x")
    text = ("schema: 1\nname: rt\nseed: 4\nbackbones:\n  - {name: vgg16, weights: null, "
            "train: {lr: 0.5}, methods: [rise, lcam_img]}\n  - resnet50\nmethods:\n"
            "  - {name: rise, params: {n_masks: 10, p1: 0.25, fill: black}, variant: reference}\n"
            "  - {name: lcam_img, checkpoint: head.pt}\n  - {name: lcam_fm, id: ce, "
            "train: {lambda1: 0, lambda2: 0}}\nevaluation: {preset: {fill: mean}, "
            "keep_fractions: [0.5]}\ntracking: {tags: {a: b}}\nstorage: {uri: cache}\n")
    spec = load_spec(write(tmp_path, text))
    dumped = write(tmp_path, yaml.safe_dump(spec.to_dict(), sort_keys=False), "dumped.yaml")
    again = load_spec(dumped)
    assert again.to_dict() == spec.to_dict() and again.fingerprint() == spec.fingerprint()
    assert again == spec.model_copy(update={"path": str(dumped)})
    assert spec.evaluation.preset == {"soft": True, "fill": "mean", "score": "prob"}
    assert spec.storage.uri == str(tmp_path / "cache")
    assert spec.method("ce").display_name == "L-CAM-Fm*" and spec.method("ce").learned
    assert [m.id for _, m in spec.pairs()] == ["rise", "lcam_img", "rise", "lcam_img", "ce"]
