"""The one-page HTML report (``harness.results.html_report``, ``report --html``) on a small fake
benchmark in a temporary sqlite MLflow store.

The fake: tiny_vgg with three method runs tagged as the vgg16 Table 1 preset (so the paper's
numbers show), each with per-image rows (AD/IC columns, deletion/insertion AUCs), an
``overlays.png`` of four generated images, a planted-shortcut figure and, for one, an error
figure; tiny_resnet with two runs, one of them with no artifact at all. The parent has stage
times and a spec file whose text holds a URL. A second, bare benchmark has metrics only:
every part it lacks must be a "not in this run" note. The browser checks are
``tests/e2e/test_html_report_browser.py``."""
from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from harness import cli
from harness.results import html_report, record, report
from harness.results.analysis import save_png
from harness.results.overlays import grid, save_overlay_grid
from harness.results.tracking import Tracker

N = 40                                     # images per method run
SHOWN = 4                                  # images in each overlays.png
FAKE = {"tiny_vgg": [("gradcam", "Grad-CAM", 1.0, 32.0, 20.0),
                     ("scorecam", "Score-CAM", 128.0, 27.0, 25.0),
                     ("lcam_img", "L-CAM-Img", 1.0, 12.0, 41.0)],
        "tiny_resnet": [("gradcam", "Grad-CAM", 1.0, 14.0, 38.0),
                        ("rise", "RISE <8000>", 4000.0, 11.0, 46.0)]}
BARE = ("tiny_resnet", "rise")             # a run with metrics only
SPEC = "schema: 1\nname: fake\ntracking:\n  uri: http://127.0.0.1:5000\n"


def images(seed: int) -> torch.Tensor:
    return torch.rand(SHOWN, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def rows(ad: float, ic: float, seed: int, causal: bool) -> pa.Table:
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.5, 1.0, N)
    cols = {"image_id": [f"img{i:03d}.png" for i in range(N)], "Y": y,
            "class_explained": [i % 3 for i in range(N)],
            "ground_truth": [i % 3 if i != 5 else 0 for i in range(N)]}
    for k in ("100", "50", "15"):
        drop = np.clip(rng.normal(ad, 8.0, N), 0, 100) / 100
        cols[f"O_{k}"] = np.where(rng.random(N) < ic / 100, y * 1.05, y * (1 - drop))
    if causal:
        cols["deletion_auc"] = rng.uniform(0, 0.4, N)
        cols["insertion_auc"] = rng.uniform(0.4, 1, N)
    return pa.table(cols)


def metrics_of(ad: float, ic: float, fw: float, causal: bool) -> dict[str, float]:
    out = {"AD_100": ad, "IC_100": ic, "AD_50": ad * 1.5, "IC_50": ic / 2, "AD_15": 70.0,
           "IC_15": ic / 10, "FW": fw, "FW_measured": fw, "seconds_per_image": 0.01,
           "degenerate_maps": 0.0, "images": float(N), "AD_100_ci_low": ad - 2,
           "AD_100_ci_high": ad + 2, "shortcut_cue_energy": 0.3}
    if causal:
        out.update({"deletion_auc": 0.2, "insertion_auc": 0.7, "deletion_auc_ci_low": 0.18,
                    "deletion_auc_ci_high": 0.22, "FW_deletion": 225.0, "FW_insertion": 225.0})
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        client = MlflowClient(uri)
        client.create_experiment("html-bench", artifact_location=(tmp / "artifacts").as_uri())
        tracker = Tracker("html-bench", uri)
        parent = tracker.parent_run("fake", "5eed", {"git_commit": "abc", "version.torch": "2"})
        tracker.log(parent, params={"statistics.resamples": 500}, metrics={
            "seconds_ray": 3.0, "seconds_evaluation": 20.0, "began_evaluation": 4.0,
            "ended_evaluation": 24.0, "task_seconds_explain": 11.0})
        spec = tmp / "fake-5eed.yaml"
        spec.write_text(SPEC)
        tracker.artifact(parent, spec)
        for backbone, methods in FAKE.items():
            for i, (mid, display, fw, ad, ic) in enumerate(methods):
                causal = backbone == "tiny_vgg"
                run = tracker.child_run(parent, f"{backbone}/{mid}", f"{backbone} {display}", {
                    "backbone": backbone, "method": mid, "method_id": mid,
                    "display_name": display, "variant": "paper", "weights_id": "embedded:x",
                    "dataset": "quickstart", "eval_pixels_digest": "d1e57",
                    **({"table1": "vgg16"} if backbone == "tiny_vgg" else {})})
                tracker.log(run, metrics=metrics_of(ad, ic, fw, causal))
                if (backbone, mid) != BARE:
                    folder = tmp / f"{backbone}-{mid}"
                    (folder / "analysis").mkdir(parents=True)
                    pq.write_table(rows(ad, ic, i, causal), folder / "per_image.parquet")
                    ims = images(7)                      # the same images for every method
                    save_overlay_grid(folder / "overlays.png", ims, ims[:, 0] * (i + 1) / 4,
                                      [f"img{j:03d}.png" for j in range(SHOWN)])
                    tile = Image.new("RGB", (40, 40), (200, 30 * i, 0))
                    save_png(grid([[tile, tile]], ["star map"]), folder / "analysis/shortcut.png")
                    files = ["per_image.parquet", "overlays.png", "analysis/shortcut.png"]
                    if mid == "gradcam":
                        save_png(grid([[tile], [tile]]), folder / "analysis/errors.png")
                        files.append("analysis/errors.png")
                    for name in files:
                        tracker.artifact(run, folder / name, name.rpartition("/")[0] or None)
                tracker.finish(run)
        tracker.finish(parent)
        bare = tracker.parent_run("bare", "ba5e", {})
        run = tracker.child_run(bare, "tiny_vgg/gradcam", "tiny_vgg Grad-CAM", {
            "backbone": "tiny_vgg", "method": "gradcam", "method_id": "gradcam",
            "display_name": "Grad-CAM"})
        tracker.log(run, metrics={"AD_100": 30.0, "IC_100": 10.0, "FW": 1.0})
        tracker.finish(run)
        tracker.finish(bare)
        yield {"uri": uri, "client": client, "parent": parent, "bare": bare, "tmp": tmp,
               "tracker": tracker}


class Page(HTMLParser):
    """Tables (class -> [rows per table]), <img> sources, every attribute value, the text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.srcs, self.attrs, self.text, self._rows = {}, [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs += [v or "" for v in a.values()]
        if tag == "table":
            self._rows.append([a.get("class", ""), 0])
        elif tag == "tr" and self._rows:
            self._rows[-1][1] += 1
        elif tag == "img":
            self.srcs.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            cls, n = self._rows.pop()
            self.tables.setdefault(cls, []).append(n)

    def handle_data(self, data):
        self.text.append(data)


def decoded(src: str) -> Image.Image:
    head, _, payload = src.partition(",")
    assert head == "data:image/png;base64", head[:40]
    im = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    im.load()
    return im


def test_report_html_is_one_self_contained_page(store, capsys):
    out = store["tmp"] / "pages" / "run.html"
    assert cli.main(["report", "--experiment", "html-bench", "--run", store["parent"],
                     "--out", str(store["tmp"] / "rep"), "--html", str(out)]) == 0
    assert "HTML report: " in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text) and "<script" not in text.lower()
    assert "Content-Security-Policy" in text and "img-src data:" in text
    page = Page(text)
    assert page.tables["table1"] == [1 + 3, 1 + 2]            # header + one row per method
    assert page.tables["gallery"] == [1 + SHOWN, 1 + SHOWN]     # header + one row per image
    assert len(page.tables["worst"]) == 2 and page.tables["causal"] == [1 + 3]
    assert len(page.tables["times"]) == 2
    assert page.srcs and all(decoded(s).size[0] > 4 for s in page.srcs)
    words = " ".join(page.text)
    assert "paper 32.12" in words and "Δ -0.12" in words       # Table 1 preset vgg16, Grad-CAM
    assert "12.00 ± 2.00" in words and "RISE <8000>" in words  # escaped, shown as written
    assert "RISE &lt;8000&gt;" in text and "<8000>" not in text
    assert "127.0.0.1:5000" in words                            # the spec, its URL defanged
    assert "d1e57" in words and "#FW measured" in words and "s / image" in words
    resnet = text.split('class="gallery" data-backbone="tiny_resnet"')[1].split("</table>")[0]
    assert "overlays: not in this run" in resnet                # RISE there has no artifact
    gallery = text.split('class="gallery" data-backbone="tiny_vgg"')[1].split("</table>")[0]
    assert gallery.count("<img") == SHOWN * (1 + 3)             # originals + a map per method
    assert "AD " in gallery and "img000.png" in gallery
    for name in ("errors.png", "shortcut"):
        assert name in words
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert "report/report.html" in logged
    assert (store["tmp"] / "rep" / "report.html").read_text(encoding="utf-8") == text


def test_overlay_tiles_give_back_the_images_and_maps(tmp_path):
    ims = images(3)
    path = save_overlay_grid(tmp_path / "o.png", ims, ims[:, 1], ["a", "b", "c", "d"])
    originals, maps = html_report.overlay_tiles(path.read_bytes())
    assert len(originals) == len(maps) == SHOWN
    for j, tile in enumerate(originals):
        want = (ims[j].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert tile.size == (16, 16) and np.array_equal(np.asarray(tile), want)
    assert html_report.overlay_tiles(b"not a png") is None


def test_missing_parts_are_short_notes(store):
    client = store["client"]
    parent = client.get_run(store["bare"])
    text = html_report.build(client, parent)
    page = Page(text)
    assert page.tables["table1"] == [2] and not page.srcs
    words = " ".join(page.text)
    for part in ("AD/IC vs #FW plot of tiny_vgg: not in this run",
                 "saliency overlays of tiny_vgg: not in this run",
                 "a planted-shortcut figure (only the quickstart data set has one): not in",
                 "deletion and insertion", "Stage times: not in this run",
                 "the spec file: not in this run"):
        assert part in words, part


def test_the_run_hook_writes_the_page_and_warns_instead_of_failing(store, tmp_path):
    client, tracker = store["client"], store["tracker"]
    data = report.collect(client, client.get_run(store["bare"]))
    printed = []

    class Console:
        def print(self, text, **kw):
            printed.append(text)
    paths = record.html_page(tracker, data, [], tmp_path, Console())
    assert [p.name for p in paths] == ["report.html"] and not printed
    assert record.html_page(tracker, {**data, "backbones": None}, [], tmp_path / "x",
                            Console()) == []
    assert printed and printed[0].startswith("warning: report.html not written")


@pytest.mark.parametrize("target,message", [
    ("pages", "is a folder"), ("page.txt", "must end in .html"),
    ("spec/page.html", "is a file, not a folder")])
def test_a_bad_html_target_exits_2_and_writes_nothing(store, capsys, target, message):
    (store["tmp"] / "pages").mkdir(exist_ok=True)
    (store["tmp"] / "spec").write_text("a file")
    before = sorted(p.name for p in (store["tmp"]).rglob("*"))
    assert cli.main(["report", "--run", store["parent"], "--no-log", "--html", target]) == 2
    err = capsys.readouterr().err
    assert f"--html {target}: " in err and message in err
    assert sorted(p.name for p in (store["tmp"]).rglob("*")) == before


def test_an_unknown_run_writes_no_page(store, capsys):
    target = store["tmp"] / "never.html"
    assert cli.main(["report", "--run", "0" * 32, "--html", str(target)]) == 2
    assert "no MLflow run" in capsys.readouterr().err and not target.exists()


def test_text_is_escaped_and_holds_no_url():
    assert html_report.esc("<b>https://x.org & s3://b</b>") == \
        "&lt;b&gt;https:\u200b//x.org &amp; s3://b&lt;/b&gt;"
    assert html_report.data_uri(b"junk") is None
