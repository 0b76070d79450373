"""The install users get on cluster nodes: a built wheel, not the checkout (issue 21).

``pip wheel`` of a fresh copy of the project (its tracked files, as a clone has), then that
wheel installed into a new virtual environment (its dependencies from this machine's
site-packages, without the checkout's editable install; nothing downloaded) and the commands run from a folder outside any checkout:

- the wheel holds every module of ``harness``, ``methods`` and ``backbones`` in the checkout
  and the shipped evaluation list (a sub-package without ``__init__.py`` or a missing
  ``package-data`` entry fails here);
- ``harness ls`` and ``harness validate`` (of a spec naming ``builtin:Evaluation_2000``)
  work there, and ``harness`` is imported from the environment, not from the checkout.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from services import REPO, project_copy, user_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """{"wheel": its path, "python": the new environment's interpreter, "outside": a folder
    outside any checkout}."""
    work = tmp_path_factory.mktemp("wheel")
    project = project_copy(work)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(work / "dist"), str(project)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("lcam_bench-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies from this machine's site-packages, as plain path entries: their .pth
    # files are not run, so the checkout's editable install (a .pth finder) stays out.
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "machine-deps.pth").write_text("\n".join(
        p for p in sys.path if p.endswith("site-packages")) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--force-reinstall", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    outside = work / "elsewhere"
    outside.mkdir()
    return {"wheel": wheel, "python": python, "outside": outside, "venv": venv}


def _modules(names) -> set[str]:
    return {n for n in names if n.endswith(".py") and n.split("/")[0] in
            ("harness", "methods", "backbones")}


def test_the_wheel_holds_every_module_and_the_evaluation_list(installed):
    tracked = subprocess.run(["git", "ls-files", "harness", "methods", "backbones"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    missing = sorted(_modules(tracked) - _modules(names))
    assert not missing, f"modules not in the wheel: {missing}"
    assert "harness/data/lists/Evaluation_2000.txt" in names


def _harness(installed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(installed["python"]), "-m", "harness", *args],
                          cwd=installed["outside"], env=user_env(), capture_output=True,
                          text=True, timeout=300)


def test_harness_is_imported_from_the_environment(installed):
    where = subprocess.run([str(installed["python"]), "-c",
                            "import harness.pipeline.runner as r; print(r.__file__)"],
                           cwd=installed["outside"], env=user_env(), capture_output=True,
                           text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed["venv"]), where.stdout


def test_ls_works_outside_the_checkout(installed):
    proc = _harness(installed, "ls")
    assert proc.returncode == 0, proc.stderr
    for name in ("gradcam", "lcam_img", "resnet50", "tiny_vgg"):
        assert name in proc.stdout
    assert "no jobs/ folder here" in proc.stdout


def test_validate_works_outside_the_checkout(installed):
    spec = installed["outside"] / "paper_list.yaml"
    root = installed["outside"] / "imagenet"
    (root / "val").mkdir(parents=True)
    spec.write_text("schema: 1\nbackbones: [{name: resnet50, weights: null}]\n"
                    f"data: {{kind: imagenet, root: {root}, list_file: builtin:Evaluation_2000}}"
                    "\nmethods: [{name: gradcam}]\n")
    proc = _harness(installed, "validate", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert "2000 images" in proc.stdout, proc.stdout
