"""``python -m harness bench`` on tiny settings: every method timed, #FW nominal and measured.

Runs ``harness.bench.driver.main`` in-process on ResNet-50 (random init) at 64x64 (A is 2x2x2048),
with a few RISE masks and Score-CAM channels and one thread (two OpenMP threads can stall
for seconds on a loaded machine), and checks the JSON it writes atomically.
Timing values are only checked to be positive: latency targets are verified by running the
benchmark itself (see harness/bench.py), not by the test suite.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest

from harness.bench import driver as bench


@pytest.fixture(autouse=True)
def _ray_environment(monkeypatch):
    """The evaluation part runs a shard in this process, which may import ``ray``: with the
    harness's Ray environment set first (as ``prepare_environment`` does), so that ray, once
    imported here, is the loopback-only one that later in-process tests (``harness.cli``
    ``run``) expect, whichever test imports it first."""
    from harness.pipeline import ray_runtime
    for key, value in {**ray_runtime.QUIET, **ray_runtime.LOOPBACK_ONLY}.items():
        monkeypatch.setenv(key, value)


def _args(tmp_path, **over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--backbones", "resnet50", "--size", "64", "--batch", "2", "--threads", "1",
            "--repeats", "2",
            "--warmup", "1", "--costly-repeats", "1", "--rise-masks", "6",
            "--scorecam-channels", "6", "--eval-images", "2", "--out",
            str(tmp_path / "out" / "bench.json")]
    args = parser.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_bench_tiny_run_writes_every_method(tmp_path, capsys):
    args = _args(tmp_path)
    assert bench.main(args) == 0
    path = tmp_path / "out" / "bench.json"
    data = json.loads(path.read_text())
    assert not list(path.parent.glob(".*")), "temporary file left behind"
    r = data["backbones"]["resnet50"]
    assert r["floor"]["ms_per_image"]["median"] > 0
    assert set(r["methods"]) == set(bench.OURS + bench.LIBRARY)
    for key, m in r["methods"].items():
        assert m["ms_per_image"]["median"] > 0 and m["ms_per_image"]["min"] > 0, key
        assert m["ratio"]["median"] > 0 and math.isfinite(m["ratio"]["median"]), key
        assert m["fw_nominal"] >= 1 and m["fw_run"] >= 1, key
        assert m["fw_measured"] >= 0 and m["passes_counted"] >= 1, key
        assert m["peak_mib"] is not None and m["peak_mib"] >= 0, key
    ours = r["methods"]
    assert ours["rise"]["fw_nominal"] == 8000 and ours["rise"]["fw_run"] == 6
    assert ours["rise"]["fw_measured"] == 6 and ours["rise"]["passes_counted"] == 7
    assert ours["scorecam"]["fw_nominal"] == 2048 and ours["scorecam"]["fw_run"] == 6
    assert ours["scorecam"]["fw_measured"] <= 6
    assert r["methods"]["pgc_scorecam"]["fw_measured"] == 6
    for key in ("gradcam", "gradcampp", "lcam_fm", "lcam_img", "pgc_gradcam"):
        assert ours[key]["fw_measured"] == 1 and ours[key]["passes_counted"] == 1, key
    assert {t["method"] for t in data["targets"]} >= set(bench.OURS)
    assert set(r["rise_memory"]["masks_to_peak_mib"]) == {"2", "8"}
    for name in ("head_only", "lcam_fm", "lcam_img"):
        assert r["train"][name]["images_per_s"] > 0
    assert r["eval"]["run_shard"]["images_per_s"] > 0, r["eval"]
    assert "Score-CAM" in capsys.readouterr().out


def test_bench_rejects_unknown_method(tmp_path, capsys):
    assert bench.main(_args(tmp_path, methods=["score-cam"])) == 2
    assert "score-cam" in capsys.readouterr().err


MEMORY_PROBE = """
import json, mmap, os, sys
from harness.bench.pipeline import _peak
def peak():
    out = {"rss": 0, "anon": 0}
    _peak(out, os.getpid())
    return out
path = sys.argv[1]
with open(path, "wb") as f:
    for _ in range(64):
        f.write(os.urandom(2**20))
before = peak()
with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
    sum(mapped[i] for i in range(0, len(mapped), 4096))             # touch every page
    mapped_peak = peak()
held = bytearray(os.urandom(64 * 2**20))
print(json.dumps({"before": before, "mapped": mapped_peak, "allocated": peak()}))
"""


def test_memory_peaks_split_anonymous_from_mapped_file_pages(tmp_path):
    """The memory check's sampler, in a fresh process: a file mapped and read raises the
    resident size but not its anonymous part (the prepared images are memory-mapped: their
    pages are the kernel's to share and reclaim); an allocation raises both."""
    import json
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "pages.bin")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    before, mapped, allocated = got["before"], got["mapped"], got["allocated"]
    assert 0 < before["anon"] <= before["rss"]
    assert mapped["rss"] - before["rss"] > 48 * 2**20
    assert mapped["anon"] - before["anon"] < 16 * 2**20
    assert allocated["anon"] - mapped["anon"] > 48 * 2**20


def test_training_input_measures_each_number_of_loader_processes(tmp_path, capsys):
    """``--training-input``: one row per number of loader processes, every image of the
    generated set delivered in each (``images`` is counted from the batches), in the JSON."""
    out = tmp_path / "ti.json"
    args = _args(tmp_path, training_input=True, training_input_workers=[0, 1],
                 training_input_images=8, batch=4, size=32, out=str(out))
    assert bench.main(args) == 0
    res = json.loads(out.read_text())
    assert res["schema"] == "lcam-bench/training-input/1" and res["images"] == 8
    assert list(res["workers"]) == ["0", "1"]
    assert all(r["images"] == 8 and r["images_per_s"] > 0 and r["first_batch_s"] > 0
               for r in res["workers"].values())
    assert "loader processes" in capsys.readouterr().out


def test_training_input_refuses_a_set_smaller_than_a_batch(tmp_path, capsys):
    args = _args(tmp_path, training_input=True, training_input_workers=[0],
                 training_input_images=2, batch=4)
    assert bench.main(args) == 2
    assert "--training-input-images >= --batch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
