"""``python -m harness report`` against a fake benchmark in a temporary sqlite MLflow store, and
``python -m harness explain`` on a random-init embedded backbone and quickstart images.

Each fake method run also carries a ``per_image.parquet`` of 300 generated images, from which
the report recomputes the paired tests: on tiny_vgg the methods are far apart (L-CAM-Img
significantly best), on tiny_resnet RISE's rows are Grad-CAM's but for two images (no mark)."""
from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from harness import cli
from harness.results.tracking import Tracker

# (backbone, method id, display name, FW, AD_100 ...): awkward floats on purpose (0.1 + 0.2).
FAKE = {
    "tiny_vgg": [("gradcam", "Grad-CAM", 1.0, 32.12000000000001, 0.1 + 0.2),
                 ("scorecam", "Score-CAM", 128.0, 27.75, 22.8),
                 ("lcam_img", "L-CAM-Img", 1.0, 12.96, 41.25)],
    "tiny_resnet": [("gradcam", "Grad-CAM", 1.0, 13.61, 38.1),
                    ("rise", "RISE", 4000.0, 11.12, 46.15 + 1e-13)],
}


CI = {("tiny_vgg", "L-CAM-Img"): {"AD_100_ci_low": 11.0, "AD_100_ci_high": 15.0}}


def fake_metrics(ad100: float, ic100: float, fw: float) -> dict[str, float]:
    return {"AD_100": ad100, "IC_100": ic100, "AD_50": ad100 * 1.7, "IC_50": ic100 / 3,
            "AD_15": 70 + ad100 / 7, "IC_15": ic100 / 11, "FW": fw, "FW_measured": fw * 0.999,
            "seconds_per_image": 1 / 3, "degenerate_maps": 0.0, "images": 300.0}


def fake_rows(metrics: dict[str, float], seed: int, n: int = 300) -> pa.Table:
    """Per-image Y and O whose AD terms scatter around the run's AD and whose IC indicators
    hit about its IC share (the report only tests them; it does not recompute the means)."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.5, 1.0, n)
    cols = {"image_id": [f"img{i:03d}" for i in range(n)], "Y": y}
    for k in ("100", "50", "15"):
        drop = np.clip(rng.normal(metrics[f"AD_{k}"], 8.0, n), 0, 100) / 100
        o = np.where(rng.random(n) < metrics[f"IC_{k}"] / 100, y * 1.05, y * (1 - drop))
        cols[f"O_{k}"] = o
    return pa.table(cols)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One fake benchmark for the module (creating a sqlite store takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp_path)
        yield _fill(uri, tmp_path)


def _fill(uri, tmp_path) -> dict:
    client = MlflowClient(uri)
    client.create_experiment("fake-bench", artifact_location=(tmp_path / "artifacts").as_uri())
    tracker = Tracker("fake-bench", uri)
    parent = tracker.parent_run("fake", "f00dfeed", {"git_commit": "abc"})
    stored = {}
    for backbone, rows in FAKE.items():
        for i, (mid, display, fw, ad, ic) in enumerate(rows):
            run = tracker.child_run(parent, f"{backbone}/{mid}", f"{backbone} {display}", {
                "backbone": backbone, "method": mid, "method_id": mid, "display_name": display,
                "variant": "paper", "weights_id": "embedded:x"})
            metrics = {**fake_metrics(ad, ic, fw), **CI.get((backbone, display), {})}
            tracker.log(run, metrics=metrics)
            per_image = fake_rows(metrics, seed=i)
            if backbone == "tiny_resnet" and mid == "rise":      # Grad-CAM's rows, 2 changed
                per_image = fake_rows(stored[(backbone, "Grad-CAM")], seed=0)
                o = per_image.column("O_100").to_numpy().copy()
                o[:2] *= 0.5
                per_image = per_image.set_column(2, "O_100", pa.array(o))
            path = tmp_path / f"{backbone}-{mid}" / "per_image.parquet"
            path.parent.mkdir()
            pq.write_table(per_image, path)
            tracker.artifact(run, path)
            tracker.finish(run)
            stored[(backbone, display)] = metrics
    tracker.finish(parent)
    return {"uri": uri, "client": client, "parent": parent, "stored": stored, "tmp": tmp_path}


def test_report_reproduces_stored_metrics_and_logs_artifacts(store, capsys):
    out = store["tmp"] / "rep"
    assert cli.main(["report", "--experiment", "fake-bench", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Grad-CAM" in printed and "AD(100%)" in printed

    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert len(rows) == sum(len(v) for v in FAKE.values())
    for row in rows:
        metrics = store["stored"][(row["backbone"], row["display_name"])]
        for key, value in metrics.items():
            assert row[key] == repr(value), (key, row[key], value)     # exact, not rounded
            assert float(row[key]) == value
        assert row["run_id"] and row["status"] == "FINISHED"
        assert row["method"] == row["method_id"] and row["variant"] == "paper"

    md = (out / "table.md").read_text()
    assert "### tiny_vgg (embedded:x), 300 images" in md and "### tiny_resnet" in md
    vgg = md.split("### tiny_vgg")[1].split("###")[0]
    line = {l.split("|")[1].strip(): l for l in vgg.splitlines() if l.startswith("| ")}
    assert "**12.96 ± 2.00**" in line["L-CAM-Img"]     # best AD_100 (significantly lower)
    assert "<u>27.75</u>" in line["Score-CAM"]          # second AD_100 (better than Grad-CAM)
    assert "**41.25**" in line["L-CAM-Img"]            # best IC_100 (higher is better)
    assert "**1**" in line["Grad-CAM"] and "**1**" in line["L-CAM-Img"]   # FW ties share bold
    resnet = md.split("### tiny_resnet")[1]
    line = {l.split("|")[1].strip(): l for l in resnet.splitlines() if l.startswith("| ")}
    assert "**" not in line["RISE"] and "<u>" not in line["Grad-CAM"].rsplit("|", 2)[0]
    assert line["Grad-CAM"].count("**") == 2            # only #FW: AD/IC within noise
    assert "significantly better than every other row" in md
    assert "Images needed for a 95% interval of ±1 point(s)" in md

    pairs = list(csv.DictReader(io.StringIO((out / "pairwise-tiny_vgg.csv").read_text())))
    assert len(pairs) == 3 * 6                          # 3 pairs x AD/IC at 3 fractions
    ad = {(p["method_a"], p["method_b"]): p for p in pairs if p["metric"] == "AD_100"}
    assert ad[("Grad-CAM", "L-CAM-Img")]["better"] == "L-CAM-Img"
    assert ad[("Grad-CAM", "L-CAM-Img")]["significant"] == "True"
    assert float(ad[("Grad-CAM", "L-CAM-Img")]["p_holm"]) < 0.05
    rise = [p for p in csv.DictReader(io.StringIO((out / "pairwise-tiny_resnet.csv").read_text()))
            if p["metric"] == "AD_100"]
    assert rise[0]["significant"] == "False" and float(rise[0]["p"]) >= 0.25

    for backbone in FAKE:
        for png in (out / f"ad_ic_vs_fw-{backbone}.png", out / f"pairwise-{backbone}.png"):
            assert png.stat().st_size > 10_000
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size[0] > 400
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert logged == {"report/table.md", "report/table.csv", "report/ad_ic_vs_fw-tiny_vgg.png",
                      "report/ad_ic_vs_fw-tiny_resnet.png"} | {
                          f"report/pairwise-{b}.{ext}" for b in FAKE for ext in ("csv", "png")}


def test_report_resolves_a_child_run_and_the_latest_parent(store):
    client = store["client"]
    child = client.search_runs([client.get_experiment_by_name("fake-bench").experiment_id],
                               "tags.harness_role = 'method'")[0]
    before = [a.path for a in client.list_artifacts(store["parent"], "report")]
    out = store["tmp"] / "child"
    assert cli.main(["report", "--run", child.info.run_id, "--out", str(out), "--no-log"]) == 0
    assert (out / "table.csv").is_file()
    latest = store["tmp"] / "latest"
    assert cli.main(["report", "--out", str(latest), "--no-log"]) == 0
    assert (latest / "table.csv").read_text() == (out / "table.csv").read_text()
    assert [a.path for a in client.list_artifacts(store["parent"], "report")] == before


def test_report_errors_exit_2(store, capsys):
    assert cli.main(["report", "--experiment", "fake-bnch"]) == 2
    assert "unknown experiment 'fake-bnch'. Did you mean 'fake-bench'?" in capsys.readouterr().err
    assert cli.main(["report", "--run", "0" * 32]) == 2
    assert "no MLflow run" in capsys.readouterr().err
    empty = Tracker("fake-bench", store["uri"]).parent_run("empty", "0ddba11", {})
    try:
        assert cli.main(["report", "--run", empty]) == 2
        assert "has no method runs" in capsys.readouterr().err
        assert cli.main(["report", "--experiment", "fake-bench"]) == 2   # the latest is empty
    finally:
        store["client"].delete_run(empty)


# -- explain ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quickstart_root(tmp_path_factory):
    import os
    from harness.data.quickstart import ensure_quickstart
    old = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield ensure_quickstart(n_train=1, n_val=2)
    finally:
        if old is None:
            os.environ.pop("HARNESS_CACHE_DIR", None)
        else:
            os.environ["HARNESS_CACHE_DIR"] = old


@pytest.mark.parametrize("backbone,method,select", [
    ("tiny_vgg", "gradcam", ["--top-k", "3"]),
    ("tiny_resnet", "lcam_img", ["--classes", "7", "0"]),
])
def test_explain_writes_class_specific_pngs(quickstart_root, tmp_path, capsys, backbone, method,
                                            select):
    images = [quickstart_root / "val" / "star" / "star_val_0000.png",
              quickstart_root / "val" / "ring" / "ring_val_0001.png"]
    out = tmp_path / "ex"
    code = cli.main(["explain", *map(str, images), "--backbone", backbone, "--weights", "none",
                     "--method", method, *select, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"000-star_val_0000-{method}.png",
                                      f"001-ring_val_0001-{method}.png"]
    tiles = 1 + (3 if "--top-k" in select else 2)          # the image, then one map a class
    for p in pngs:
        with Image.open(p) as im:
            assert p.stat().st_size > 1000 and im.size[0] >= tiles * 160
    printed = capsys.readouterr().out
    assert "star" in printed if "--classes" in select else printed.count(".png:") == 2
    assert (out / "explain.json").is_file()


def test_explain_bad_input_exits_2(quickstart_root, tmp_path, capsys):
    image = str(quickstart_root / "val" / "star" / "star_val_0000.png")
    base = ["--backbone", "tiny_vgg", "--weights", "none", "--method", "gradcam",
            "--out", str(tmp_path)]
    assert cli.main(["explain", str(tmp_path / "missing.png"), *base]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["explain", image, *base, "--classes", "3", "10"]) == 2
    assert "10 out of range" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert cli.main(["explain", str(broken), *base]) == 2
    assert "cannot decode" in capsys.readouterr().err
    assert cli.main(["explain", image, *base[:4], "--method", "grad-cam"]) == 2
    assert "Did you mean 'gradcam'" in capsys.readouterr().err
