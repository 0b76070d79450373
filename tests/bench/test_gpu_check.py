"""``python -m harness gpu-check --dry``: the GPU check's code runs on the CPU where Ray and
MLflow cannot be imported (the GPU machine has neither; pydantic, 2.6 MB of wheels, travels
with the tree: README "GPU check") and fills every section
with sane numbers, so the script is ready wherever a GPU is lent; ``--ray`` adds the Ray
part (a resumed fit, overlapping quarter-share tasks, both refusals). No timing is a pass or
fail here: the dry sizes are too small for the targets to mean anything."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from services import REPO, user_env

ABSENT = ("ray", "mlflow")

#: ``python -c`` program: the command line with ``ABSENT``'s packages unimportable, as on a
#: machine where they are not installed (a meta path finder ahead of every other one)
WITHOUT = f"""
import sys
ABSENT = {ABSENT!r}
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (gpu-check test)", name=name)
        return None
sys.meta_path.insert(0, Absent())
from harness.cli import main
code = main(sys.argv[1:])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(ABSENT))
assert not loaded, loaded
sys.exit(code)
"""


def _gpu_check(tmp_path, *args: str, program: list[str]) -> tuple[dict, str]:
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([*program, "gpu-check", "--dry", "--out", str(out), *args],
                          cwd=REPO, env=user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _rate(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_dry_run_fills_every_section_without_ray_or_mlflow(tmp_path):
    results, printed = _gpu_check(tmp_path, program=[sys.executable, "-c", WITHOUT])
    sections = ("parity", "busy", "masked", "four_heads", "training_input")
    assert results["dry"] and results["complete"] and results["failed"] == []
    assert results["device"] == "cpu" and results["torch"] and results["date"]
    assert "ray" not in results                               # only with --ray
    for name in sections:
        assert "error" not in results[name], results[name]
        assert f"{name} (" in printed                         # its table was printed
        assert _rate(results["section_seconds"][name])

    parity = results["parity"]
    assert set(parity) == {"gradcam", "gradcampp", "scorecam", "rise", "lcam_fm", "lcam_img"}
    for r in parity.values():                         # CPU against CPU: the same maps
        assert r["spearman_float32"] >= 0.99 and r["spearman_tf32"] >= 0.99
        assert -1 <= r["spearman_autocast"] <= 1 and r["met"] is True
        assert all(_rate(r[k]) for k in ("seconds_per_image", "seconds_per_image_autocast",
                                         "seconds_per_image_cpu"))

    busy = results["busy"]
    assert set(busy) == {"gradcam", "gradcampp", "lcam_fm", "lcam_img"}
    for name in ("gradcam", "gradcampp", "lcam_fm", "lcam_img"):
        r = busy[name]
        assert 0 < r["busy"] <= 1 and r["met"] is None        # a target only on CUDA
        assert r["shards"] >= 1 and _rate(r["images_per_s"]) and _rate(r["wall_s_per_shard"])
        assert _rate(r["stage_s_per_shard"]["explain"]) and _rate(r["stage_s_per_shard"]["score"])

    masked = results["masked"]
    assert set(masked) == {"rise", "scorecam"}
    for name in ("rise", "scorecam"):
        modes = masked[name]
        assert set(modes) == {"float32", "autocast", "channels_last", "autocast_channels_last"}
        for r in modes.values():
            assert _rate(r["masked_per_s"]) and r["forwards_per_image"] >= 1
            assert -1 <= r["spearman_vs_float32"] <= 1 + 1e-9
        assert modes["float32"]["spearman_vs_float32"] >= 0.99
        assert modes["channels_last"]["spearman_vs_float32"] >= 0.99    # float32 too

    heads = results["four_heads"]
    assert heads["backend"] == "gloo" and heads["heads"] == 4 and heads["met"] is True
    assert set(heads["loss"]) == {"lcam_fm", "lcam_img", "lcam_fm_ce", "lcam_img_ce"}
    assert all(math.isfinite(v) for v in heads["loss"].values())
    assert _rate(heads["steps_per_s"]) and _rate(heads["images_per_s"])

    loading = results["training_input"]
    assert loading["images"] > 0 and set(loading["workers"]) == {"0", "2"}
    assert all(_rate(r["images_per_s"]) for r in loading["workers"].values())


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path):
    """A section that raises (here: Ray, which this run cannot import) gives its error in
    the JSON and exit 1; the sections after it and beside it ran."""
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-c", WITHOUT, "gpu-check", "--dry", "--ray", "--only",
                           "four_heads", "ray", "--out", str(out)], cwd=REPO, env=user_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["failed"] == ["ray"] and "No module named 'ray'" in results["ray"]["error"]
    assert results["four_heads"]["met"] is True and "parity" not in results
    assert "No module named 'ray'" in proc.stdout and "failed or missed: ray" in proc.stdout


@pytest.mark.slow
def test_ray_part_dry_resumes_the_fit_overlaps_tasks_and_refuses(tmp_path):
    results, _ = _gpu_check(tmp_path, "--ray", "--only", "ray",
                            program=[sys.executable, "-m", "harness"])
    ray_results = results["ray"]
    assert "error" not in ray_results, ray_results
    assert ray_results["fit_heads"]["met"] and ray_results["fit_heads"]["heads"] == ["lcam_fm"]
    assert ray_results["shards"]["max_at_once"] > 1
    refusals = ray_results["refusals"]
    assert "needs 1 CPU and 1 GPU" in refusals["too_many_gpus"]
    assert "CUDA is not available" in refusals["missing_cuda"]
