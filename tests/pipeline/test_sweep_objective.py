"""What a sweep may optimise: a measure of the explanations, never a loss its search can lower
by changing the loss's own weights (``harness.spec.sweep``, docs/protocol.md section 4.6).

``val_loss`` = lambda1 TV + lambda2 AV + lambda3 CE with AV = mean(S^lambda4): searching any of
lambda1-4 lets a trial lower it without better maps; ``val_ce`` is lowest without the TV and
area terms (lambda1, lambda2 -> 0) or with a heavy CE (lambda3). Such sweeps are refused
(exit 2, at ``sweep.metric``); every shipped sweep optimises AD or IC on held-out images.
"""
from __future__ import annotations

import pytest
import yaml

from harness import cli
from harness.spec import SpecError, load_spec
from services import REPO

BASE = "schema: 1\nbackbones: [vgg16]\nmethods: [lcam_img]\n"


def sweep_file(tmp_path, space: str, metric: str | None = None):
    path = tmp_path / "sweep.yaml"
    path.write_text(BASE + f"sweep:\n  space: {space}\n" + (f"  metric: {metric}\n" if metric
                                                            else ""))
    return path


@pytest.mark.parametrize("metric, space, searched", [
    (None, "{lambda1: {uniform: [0.001, 0.1]}}", "lambda1"),               # val_loss by default
    ("val_loss", "{lambda2: {choice: [1.0, 2.0]}, lr: {choice: [0.1]}}", "lambda2"),
    ("val_loss", "{lambda3: {choice: [1.0, 2.0]}, lambda4: {choice: [0.3, 0.5]}}",
     "lambda3, lambda4"),
    ("val_ce", "{lambda1: {uniform: [0.0, 0.1]}, lambda2: {choice: [1.0, 2.0]}}",
     "lambda1, lambda2"),
    ("val_ce", "{lambda3: {choice: [1.0, 2.0]}}", "lambda3"),
])
def test_a_loss_metric_with_its_weights_searched_is_refused(tmp_path, metric, space, searched):
    with pytest.raises(SpecError) as err:
        load_spec(sweep_file(tmp_path, space, metric), sweep=True)
    [(where, message)] = err.value.problems
    shown = metric or "val_loss"
    assert where == "sweep.metric"
    assert message.startswith(f"{shown} is ") and f"searching {searched} would lower it" in message
    assert "e.g. AD_15" in message


def test_the_refusal_is_exit_2_before_anything_starts(tmp_path, capsys):
    path = sweep_file(tmp_path, "{lambda1: {uniform: [0.001, 0.1]}}", "val_loss")
    assert cli.main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sweep.metric: val_loss is the training loss" in err and "Traceback" not in err


@pytest.mark.parametrize("metric, space", [
    ("AD_15", "{lambda1: {uniform: [0.001, 0.1]}, lambda3: {choice: [1.0, 2.0]}}"),
    ("IC_50", "{lambda4: {uniform: [0.2, 0.5]}}"),
    ("val_loss", "{lr: {loguniform: [1.0e-3, 1.0e-1]}, epochs: {grid: [2, 3]}}"),
    ("val_ce", "{lambda4: {uniform: [0.2, 0.5]}, lr_decay: {choice: [0.9]}}"),
])
def test_other_objectives_are_accepted(tmp_path, metric, space):
    assert load_spec(sweep_file(tmp_path, space, metric), sweep=True).sweep.metric == metric


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_measures_the_explanations(path):
    raw = yaml.safe_load(path.read_text())
    metric = raw["sweep"]["metric"]
    assert metric.startswith(("AD_", "IC_")), metric
    assert raw["sweep"].get("mode") == ("max" if metric.startswith("IC_") else "min")
    assert raw["sweep"]["validation_images"] >= 1         # held out of the training split
