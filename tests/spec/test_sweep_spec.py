"""The ``sweep`` section of a sweep spec (``load_spec(path, sweep=True)``): its keys, the
search space derived from the train section's fields, the references to the spec's
backbones and methods, the resolved form ``harness tune`` reads, and the fingerprint.

In-process only: no Ray, no MLflow.
"""
from __future__ import annotations

import pathlib

import pytest
import yaml

from harness.spec import SpecError, SweepSection, TrainSection, load_spec
from harness.spec.sweep import SearchSpace, searchable

REPO = pathlib.Path(__file__).resolve().parents[2]
BASE = "schema: 1\nbackbones: [vgg16, resnet50]\nmethods: [gradcam, lcam_img, lcam_fm]\n"


def sweep_spec(tmp_path, sweep: str, overrides=()):
    path = tmp_path / "sweep.yaml"
    path.write_text(BASE + "sweep:\n" + "".join(f"  {line}\n" for line in sweep.splitlines()))
    return load_spec(path, overrides, sweep=True)


def sweep_problems(tmp_path, sweep: str, overrides=()) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        sweep_spec(tmp_path, sweep, overrides)
    return err.value.problems


def test_the_quickstart_sweep_and_its_pinned_fingerprint():
    spec = load_spec(REPO / "jobs" / "sweeps" / "lcam_quickstart.yaml", sweep=True)
    sweep = spec.sweep
    assert isinstance(sweep, SweepSection)
    assert (sweep.backbone, sweep.method, sweep.metric, sweep.mode) == ("tiny_vgg", "lcam_img",
                                                                        "AD_15", "min")
    assert sweep.space == {"lambda1": {"loguniform": [0.001, 0.1]},
                           "lambda2": {"uniform": [0.5, 3.0]}, "lr": {"loguniform": [0.005, 0.2]}}
    assert (sweep.scheduler.name, sweep.scheduler.grace_period) == ("asha", 1)
    # 262a0974c5007160 before the rewrite; a279adc837f84b72 since its metric is AD_15 (issue 13)
    assert spec.fingerprint() == "a279adc837f84b72"


def test_defaults_follow_the_spec(tmp_path):
    sweep = sweep_spec(tmp_path, "space: {lr: {choice: [0.1, 0.2]}}\nmetric: IC_15").sweep
    assert (sweep.backbone, sweep.method) == ("vgg16", "lcam_img")    # first, first learned
    assert sweep.mode == "max" and sweep.fraction() == 0.15           # IC: higher is better
    assert (sweep.num_samples, sweep.validation_images) == (4, 100)
    assert (sweep.cpus_per_trial, sweep.gpus_per_trial) == (1.0, 0.0)
    assert sweep.model_dump()["scheduler"] == {"name": "asha"}        # as written
    assert sweep.scheduler.reduction_factor == 2


def test_the_space_keys_are_the_searchable_train_fields():
    keys = {"lambda1", "lambda2", "lambda3", "lambda4", "lr", "lr_decay", "epochs"}
    assert set(searchable()) == keys == set(SearchSpace.model_fields)
    assert set(searchable()) <= set(TrainSection.model_fields)


def test_distributions(tmp_path):
    sweep = sweep_spec(tmp_path, "space:\n  lr: {loguniform: ['1e-5', 1.0e-2]}\n"
                                 "  lambda1: {uniform: [0, 1]}\n  lambda3: {choice: [1, 1.5]}\n"
                                 "  lr_decay: {grid: [0.5, 0.9]}\n  epochs: {grid: [2, 3]}\n"
                                 "metric: AD_15").sweep
    assert sweep.space == {"epochs": {"grid": [2, 3]}, "lr": {"loguniform": [1e-5, 0.01]},
                           "lr_decay": {"grid": [0.5, 0.9]}, "lambda1": {"uniform": [0.0, 1.0]},
                           "lambda3": {"choice": [1.0, 1.5]}}
    assert isinstance(sweep.space["lambda3"]["choice"][0], float)
    assert isinstance(sweep.space["epochs"]["grid"][0], int)


@pytest.mark.parametrize("space, where, message", [
    ("{lamda1: {choice: [1]}}", "sweep.space.lamda1",
     "unknown key 'lamda1'. Did you mean 'lambda1'"),
    ("{batch_size: {choice: [8]}}", "sweep.space.batch_size", "unknown key 'batch_size'."),
    ("{lr: {normal: [0, 1]}}", "sweep.space.lr.normal",
     "unknown distribution 'normal'. Did you mean 'uniform'?"),
    ("{epochs: {uniform: [1, 3]}}", "sweep.space.epochs.uniform",
     "epochs takes choice or grid (integers)"),
    ("{epochs: {choice: [2.5]}}", "sweep.space.epochs.choice[0]",
     "expected an integer, got 2.5 (a float)."),
    ("{epochs: {grid: [0, 2]}}", "sweep.space.epochs.grid[0]",
     "0 is out of range: epochs must be >= 1"),
    ("{lr: {choice: [0.1, 0]}}", "sweep.space.lr.choice[1]", "0 is out of range: lr must be > 0"),
    ("{lr_decay: {uniform: [0.5, 1.5]}}", "sweep.space.lr_decay.uniform[1]",
     "1.5 is out of range: lr_decay must be in (0, 1]"),
    ("{lambda2: {uniform: [-1, 2]}}", "sweep.space.lambda2.uniform[0]",
     "-1 is out of range: lambda2 must be >= 0"),
    ("{lambda1: {loguniform: [0, 0.1]}}", "sweep.space.lambda1.loguniform",
     "loguniform needs low > 0"),
    ("{lambda1: {uniform: [0.2, 0.1]}}", "sweep.space.lambda1.uniform",
     "expected [low, high] with low < high"),
    ("{lambda1: {uniform: [0.1, 0.2, 0.3]}}", "sweep.space.lambda1.uniform",
     "expected [low, high] with low < high"),
    ("{lr: {choice: [0.1], grid: [0.2]}}", "sweep.space.lr", "expected exactly one of"),
    ("{lr: {choice: []}}", "sweep.space.lr.choice", "expected a non-empty list"),
    ("{lr: [0.1, 0.2]}", "sweep.space.lr", "expected a mapping such as {loguniform: [low, "),
    ("{lr: {choice: [fast]}}", "sweep.space.lr.choice[0]", "expected a number"),
    ("{}", "sweep.space", "expected a non-empty mapping of parameters to distributions"),
])
def test_bad_search_spaces(tmp_path, space, where, message):
    found = sweep_problems(tmp_path, f"space: {space}")
    assert [w for w, _ in found] == [where], found
    assert found[0][1].startswith(message), found[0][1]


@pytest.mark.parametrize("metric, message", [
    ("AD_15.0", "'AD_15.0' is not the name the trials report: write AD_15"),
    ("IC_015", "'IC_015' is not the name the trials report: write IC_15"),
    ("AD_0", "'AD_0': the percent kept must be in (0, 100]"),
    ("AD_150", "'AD_150': the percent kept must be in (0, 100]"),
])
def test_the_metric_is_named_as_the_trials_report_it(tmp_path, metric, message):
    """Tune ranks by the name the trials report (AD_15, IC_2.5): another spelling would
    never be found."""
    found = sweep_problems(tmp_path, f"space: {{lr: {{choice: [0.1]}}}}\nmetric: {metric}")
    assert found == [("sweep.metric", message)]
    assert sweep_spec(tmp_path, "space: {lr: {choice: [0.1]}}\nmetric: IC_2.5").sweep.metric \
        == "IC_2.5"


def test_every_problem_of_the_section_at_once(tmp_path):
    found = sweep_problems(tmp_path, "backbone: vgg19\nmethod: gradcam\nspace: {lr: {choice: "
                                     "[0]}}\nmetric: AD\nmode: up\nscheduler: {name: hyperband, "
                                     "grace: 1}\nnum_samples: 0\ncpus_per_trial: 0")
    assert found == [
        ("sweep.backbone", "'vgg19' is not a backbone of this spec; choose one of: vgg16, "
                           "resnet50"),
        ("sweep.method", "'gradcam' is not a learned method id of this spec; choose one of: "
                         "lcam_img, lcam_fm"),
        ("sweep.space.lr.choice[0]", "0 is out of range: lr must be > 0"),
        ("sweep.metric", "'AD' is not val_loss, val_ce, AD_<percent> or IC_<percent> (e.g. "
                         "AD_15)"),
        ("sweep.mode", "'up' is not one of min, max."),
        ("sweep.scheduler.name", "'hyperband' is not one of asha, none."),
        ("sweep.scheduler.grace", "unknown key 'grace'. Accepted here: name, grace_period, "
                                  "reduction_factor"),
        ("sweep.num_samples", "0 is out of range: num_samples must be >= 1"),
        ("sweep.cpus_per_trial", "0 is out of range: cpus_per_trial must be > 0"),
    ]


def test_the_section_is_required_and_needs_a_learned_method(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(BASE)
    with pytest.raises(SpecError) as err:
        load_spec(path, sweep=True)
    assert err.value.problems == [("sweep", "required in a sweep spec: add a 'sweep:' section "
                                            "with a search 'space' (see "
                                            "jobs/sweeps/lcam_quickstart.yaml)")]
    path.write_text("schema: 1\nbackbones: [vgg16]\nmethods: [gradcam]\n"
                    "sweep: {space: {lr: {choice: [0.1]}}}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path, sweep=True)
    assert err.value.problems == [("sweep.method", "the spec has no learned method (lcam_fm, "
                                                   "lcam_img) to tune")]


def test_overrides_reach_the_section(tmp_path):
    found = sweep_problems(tmp_path, "space: {lr: {choice: [0.1]}}", ["sweep.num_samples=0"])
    assert found == [("sweep.num_samples", "0 is out of range: num_samples must be >= 1 (set "
                                           "by override 'sweep.num_samples=0')")]


def test_to_dict_round_trips_with_the_sweep(tmp_path):
    spec = sweep_spec(tmp_path, "space: {epochs: {choice: [2, 3]}, lr: {uniform: [0.1, 0.2]}}\n"
                                "scheduler: {name: none}\nmetric: AD_15")
    out = spec.to_dict()
    assert out["sweep"]["scheduler"] == {"name": "none"} and out["sweep"]["mode"] == "min"
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(yaml.safe_dump(out, sort_keys=False))
    again = load_spec(dumped, sweep=True)
    assert again.to_dict() == out and again.fingerprint() == spec.fingerprint()
    assert "sweep" not in load_spec(REPO / "jobs" / "smoke.yaml").to_dict()
