"""The example plugin end to end, as a user installs and runs it, and docs/plugins.md's
commands as written.

A fresh copy of the project (``services.workspace``) and a fresh virtual environment on top
of the installed harness (``venv --system-site-packages``: torch, Ray and lcam-bench come
from the current environment, the plugin is installed into the venv only, so the test
leaves the current environment as it was). The shell is a user's (``services.user_env``,
plus their pip settings) with the venv first on ``PATH``; local Ray's workers run the
venv's Python, so they import the plugin as the driver does.

- ``test_install_run_report``: ``pip install -e examples/lcam-xgradcam``, then ``harness run``
  of the example spec on the two embedded backbones and ``harness report``: the plugin's
  rows are in the printed table, in MLflow (child runs tagged with the plugin's names) and
  in the report;
- ``test_docs_commands``: every command of every ``bash`` block of docs/plugins.md, in
  order, in the same copy.

Each distinct command runs once per module (``Shell.once``): the first test's install,
``run`` and ``report`` are docs/plugins.md's own lines, so the second test takes their
(already checked) results instead of installing and running the same thing again in the
same copy (a docs line that differs from them runs as written; run alone, the second test
runs every line itself).
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from services import REPO, TEST_CACHE, user_env, workspace

pytestmark = pytest.mark.slow

SPEC = "examples/lcam-xgradcam/xgradcam_quickstart.yaml"
LIMIT = "data.limit=12"                     # the docs' first look uses the same images
PLUGIN_METHODS = {"xgradcam", "lcam_xgradcam.xgradcam:XGradCAM"}
INSTALL = "python -m pip install -e examples/lcam-xgradcam"


def ensure_tiny_resnet() -> None:
    """The test cache holds tiny_resnet too (services.workspace guarantees tiny_vgg)."""
    if list((TEST_CACHE / "backbones").glob("tiny_resnet-*.pt")):
        return
    code = "from harness.data.models import load_backbone; load_backbone('tiny_resnet')"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=1200,
                   env=user_env(HARNESS_CACHE_DIR=str(TEST_CACHE)))


class Shell:
    """A user's shell in the copy, with the venv activated: ``run(command)``."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", "-e", "-c", command], cwd=self.root, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{command}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        assert "Traceback" not in res.stderr, f"{command}\n{res.stderr[-4000:]}"
        return res

    def once(self, command: str) -> subprocess.CompletedProcess:
        """``run(command)`` the first time; its (checked) result again after that."""
        if command not in self.done:
            self.done[command] = self.run(command)
        return self.done[command]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    where = tmp_path_factory.mktemp("plugin")
    ensure_tiny_resnet()
    root = workspace(where)
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    env = user_env(where / "home")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"          # the venv, activated
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    return Shell(root, env)


def test_install_run_report(shell):
    shell.once(INSTALL)
    shown = shell.once(f"python -m harness run {SPEC} {LIMIT}").stdout
    for backbone in ("tiny_vgg", "tiny_resnet"):
        table = shown[shown.index(f"{backbone} (embedded"):]
        assert re.search(r"│ XGrad-CAM +│", table) and "│ XGrad-CAM (prob) │" in table
    client = MlflowClient(f"sqlite:///{shell.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("xgradcam_quickstart")
    runs = client.search_runs([experiment.experiment_id], "tags.harness_role = 'method'")
    cells = {(r.data.tags["backbone"], r.data.tags["method"]): r for r in runs}
    assert {m for _, m in cells} == {"gradcam", *PLUGIN_METHODS} and len(cells) == 6
    for (_, method), run in cells.items():
        assert run.info.status == "FINISHED" and run.data.metrics["images"] == 12
        origin, via = run.data.tags["method_origin"], ("class reference" if ":" in method
                                                          else "entry point")
        assert origin == "built-in" if method == "gradcam" else (
            origin.startswith("lcam-xgradcam") and via in origin), (method, origin)
        assert run.data.tags["backbone_origin"] == "built-in"
        assert {"AD_100", "IC_15", "FW"} <= set(run.data.metrics)
    report = shell.once("python -m harness report --experiment xgradcam_quickstart").stdout
    assert report.count("XGrad-CAM (prob)") == 2
    table_csv = next(shell.root.glob("reports/*/table.csv"))
    rows = list(csv.DictReader(table_csv.open()))
    assert {r["method_id"] for r in rows} == {"gradcam", "xgradcam", "xgradcam_prob"}


def bash_commands(markdown: str) -> list[str]:
    """The commands of every ```bash block, in order (continuation lines joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        out += [c.strip() for c in re.sub(r"\\\n\s*", "", block).splitlines()
                if c.strip() and not c.strip().startswith("#")]
    return out


def test_docs_commands(shell):
    commands = bash_commands((REPO / "docs" / "plugins.md").read_text())
    assert INSTALL in commands
    assert any(c.startswith("python -m harness run ") for c in commands)
    for command in commands:
        out = shell.once(command).stdout
        if command == "python -m harness ls":
            assert "lcam-xgradcam" in out and "resnet18_layer3" in out
