"""The Table 1 presets (``jobs/table1_*.yaml``): they validate, their plan is the authors'
recipe, the paper's numbers beside each row are those of ``harness.results.table1``, and
``harness report`` of a preset run prints the paper's number and the difference beside ours.
The paper-text jobs (``jobs/paper_text_*.yaml``) do not claim to be Table 1.
"""
from __future__ import annotations

import csv
import io
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness import cli
from harness.pipeline.plan import describe, plan
from harness.results import table1
from harness.results.tracking import Tracker
from harness.spec import load_spec
from services import REPO

PRESETS = {p: REPO / "jobs" / f"table1_{p}.yaml" for p in table1.presets()}
RECIPES = {   # preset -> (epochs, lr, lr_decay, lr_decay_epochs): the authors' scripts
    "vgg16": (8, 0.01, 0.75, None), "vgg16_7x7": (8, 0.01, 0.75, None),
    "resnet50": (26, 1e-4, 0.95, 12)}


@pytest.fixture
def imagenet(tmp_path):
    """An (empty) ImageNet folder and a cluster address: enough for ``validate``."""
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    return [f"data.root={tmp_path / 'imagenet'}", "ray.address=auto"]


def test_there_is_a_preset_per_part_of_table_1():
    assert sorted(PRESETS) == ["resnet50", "vgg16", "vgg16_7x7"]
    assert all(path.is_file() for path in PRESETS.values())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_validates_and_its_plan_is_the_authors_recipe(preset, imagenet):
    spec = load_spec(PRESETS[preset], imagenet)
    assert spec.tracking.tags == {table1.TAG: preset}
    assert spec.data.list_file == "builtin:Evaluation_2000" and spec.evaluation.preset == "paper"
    assert [m.id for m in spec.methods] == list(table1.PAPER[preset])     # Table 1's order
    assert {m.variant for m in spec.methods} == {"reference"}
    p = plan(spec)
    epochs, lr, decay, hold = RECIPES[preset]
    for cell in p.cells:
        assert cell.forward_passes == table1.PAPER[preset][cell.method_id]["FW"], cell.method_id
        if cell.method == "rise":
            assert (cell.params["n_masks"], cell.params["cell"], cell.params["p1"],
                    cell.params["fill"]) == (table1.PAPER[preset]["rise"]["FW"], 7, 0.5, "mean")
        if cell.head is None:
            continue
        cfg = cell.head.config
        assert (cfg.variant, cfg.labels, cfg.epochs, cfg.lr, cfg.lr_decay,
                cfg.lr_decay_epochs) == ("reference", "model", epochs, lr, decay, hold)
        ce_only = cell.method_id.endswith("_ce")
        assert cfg.lambdas == ((0.0, 0.0, 1.0, 0.3) if ce_only else (0.01, 2.0, 1.5, 0.3))
        assert cell.display_name.endswith("*") == ce_only
    assert all(g.batch_size == 64 and g.workers == 1 for g in p.head_groups)
    text = "\n".join(describe(p))
    assert f"SGD Nesterov 0.9, wd 5e-4, lr {lr:g} (bias {2 * lr:g})" in text
    assert f"x{decay:g} per epoch" in text
    assert ("for 12 epoch(s), then held" in text) == (preset == "resnet50")


def _commented_rows(path) -> dict[str, tuple[float, ...]]:
    """The paper's numbers written beside each method entry of a preset: {method id: values}."""
    rows, current = {}, None
    for line in path.read_text().splitlines():
        name = re.match(r"\s+- name: (\w+)\s+#\s*[^\d]*?([\d. ]+)$", line)
        if name:
            current = name.group(1)
            rows[current] = tuple(float(v) for v in name.group(2).split())
        ident = re.match(r"\s+id: (\w+)", line)
        if ident and current:
            rows[ident.group(1)] = rows.pop(current)
            current = None
    return rows


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_numbers_beside_each_row_are_table_1s(preset):
    written = _commented_rows(PRESETS[preset])
    want = {row: tuple(v[c] for c in table1.COLUMNS) for row, v in table1.PAPER[preset].items()}
    assert written == want


def test_no_other_job_claims_to_reproduce_table_1():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        header = " ".join(" ".join(line.lstrip("#").split())
                          for line in path.read_text().splitlines() if line.startswith("#"))
        if path.stem.startswith("table1_"):
            assert (raw.get("tracking") or {}).get("tags", {}).get(table1.TAG), path.name
            continue
        assert table1.TAG not in ((raw.get("tracking") or {}).get("tags") or {}), path.name
        assert "rows of Table 1" not in header, path.name
        if path.stem.startswith("paper_text_"):
            assert "NOT a reproduction of Table 1" in header, path.name


# -- harness report ---------------------------------------------------------------------------
OURS = {"gradcam": {"AD_100": 32.5, "IC_100": 21.0, "FW": 1.0},
        "lcam_img_ce": {"AD_100": 17.0, "IC_100": 38.45, "FW": 1.0}}


@pytest.fixture
def preset_store(tmp_path, monkeypatch):
    """An MLflow store with a (fake) run of the VGG-16 preset: two rows, tagged table1."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    MlflowClient(uri).create_experiment("lcam-table1",
                                        artifact_location=(tmp_path / "art").as_uri())
    tracker = Tracker("lcam-table1", uri)
    tags = {table1.TAG: "vgg16", "git_commit": "abc"}
    parent = tracker.parent_run("table1_vgg16", "feedf00d", tags)
    for mid, metrics in OURS.items():
        run = tracker.child_run(parent, f"vgg16/{mid}", f"vgg16 {mid}", {
            **tags, "backbone": "vgg16", "method": mid.split("_ce")[0], "method_id": mid,
            "display_name": mid, "variant": "reference", "weights_id": "V1"})
        tracker.log(run, metrics=metrics)
        tracker.finish(run)
    tracker.finish(parent)
    return tmp_path


def test_report_of_a_preset_run_prints_the_papers_numbers_beside_ours(preset_store, capsys):
    out = preset_store / "rep"
    assert cli.main(["report", "--experiment", "lcam-table1", "--out", str(out),
                     "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "paper 32.12" in printed and "Δ +0.38" in printed and "paper 37.20" in printed
    assert "Table 1 (preset table1=vgg16)" in " ".join(printed.split())
    md = (out / "table.md").read_text()
    assert "32.50<br>paper 32.12<br>Δ +0.38" in md and "17.00<br>paper 18.01<br>Δ -1.01" in md
    assert "**1**<br>paper 1<br>Δ +0" in md                              # #FW too
    rows = {r["method_id"]: r for r in csv.DictReader(io.StringIO((out / "table.csv").read_text()))}
    assert float(rows["gradcam"]["paper_AD_100"]) == 32.12
    assert float(rows["gradcam"]["diff_AD_100"]) == pytest.approx(0.38)
    assert float(rows["lcam_img_ce"]["diff_IC_100"]) == pytest.approx(1.25)
    assert rows["gradcam"]["AD_100"] == repr(32.5)                       # ours unchanged


def test_rows_without_a_preset_show_no_paper_numbers():
    assert table1.paper_row(None, "gradcam") == {} and table1.paper_row("vgg16", "xgradcam") == {}
    assert table1.paper_row("resnet50", "rise")["FW"] == 8000.0
    assert table1.comparison({"AD_100": 12.0, "IC_100": None}, {"AD_100": 11.09, "IC_100": 43.75}) \
        == {"AD_100": (11.09, pytest.approx(0.91))}
