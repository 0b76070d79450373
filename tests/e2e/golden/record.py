"""Record the pinned reference runs that end-to-end tests compare their fault runs with.

    python tests/e2e/golden/record.py smoke quickstart reliability two_nodes

Each target runs an undisturbed ``python -m harness run`` of the test's own spec, on one
machine with a local Ray, in a user's plain environment and a fresh cache (the session's
generated inputs), and writes what the test compares into ``tests/e2e/golden/<target>.json``
as the recording for this machine's embedded weights (``tests/golden.py``: other weights'
recordings are kept):

- ``smoke``, ``quickstart``: every metric but timings of each run of ``jobs/smoke.yaml``
  and ``jobs/quickstart.yaml`` (the README's command 1; about 10 minutes);

- ``reliability``: ``test_reliability.py``'s spec (tiny_vgg, four methods, 12 images):
  every compared metric of each run and, for each trained L-CAM head file, the SHA-256 of
  each tensor (names, dtype, shape and bytes);
- ``two_nodes``: ``test_two_nodes.py``'s spec (tiny_vgg, eight methods, two Ray Train
  workers) on one node, on a local copy of its data set: every metric the spec determines.

With a recording, the fault tests need no reference run of their own (about a minute each
here on two cores; without one they make it). Rerun this script, and say why in the commit,
only when a change is meant to move the numbers: a refactor must not.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]       # tests/, tests/e2e/

import golden  # noqa: E402
import test_reliability as rel  # noqa: E402
import test_two_nodes as two  # noqa: E402
from services import user_env, workspace  # noqa: E402

#: every metric but timings
TIMINGS = ("seconds", "task_seconds", "images_per_s", "train_", "_")


def run_metrics(args: list[str], work: Path, experiment: str) -> dict[str, dict[str, float]]:
    """``python -m harness run <args>`` in a fresh copy of the project, as a user types it:
    the metrics of each method run, by run key."""
    from mlflow.tracking import MlflowClient
    root = workspace(work)
    res = subprocess.run([sys.executable, "-m", "harness", "run", *args], cwd=root,
                         env=user_env(work / "home"), capture_output=True, text=True,
                         timeout=3600)
    if res.returncode:
        sys.exit(res.stdout[-4000:] + res.stderr[-4000:])
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.harness_role = 'method'",
                              max_results=500)
    return {r.data.tags["run_key"]: {k: v for k, v in sorted(r.data.metrics.items())
                                     if not k.startswith(TIMINGS)} for r in runs}


def record_smoke(work: Path) -> dict:
    return {"command": "harness run jobs/smoke.yaml",
            "runs": run_metrics(["jobs/smoke.yaml"], work, "smoke")}


def record_quickstart(work: Path) -> dict:
    return {"command": "harness run jobs/quickstart.yaml",
            "runs": run_metrics(["jobs/quickstart.yaml"], work, "quickstart")}


TARGETS = {"smoke": record_smoke, "quickstart": record_quickstart,
           "reliability": rel.undisturbed, "two_nodes": two.one_node_run}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        sys.exit(f"usage: record.py {' '.join(TARGETS)} (unknown: {unknown})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
            started = time.time()
            recorded = TARGETS[name](Path(tmp))
        recorded["recorded"] = f"commit {commit}, {time.strftime('%Y-%m-%d')}"
        about = (f"the numbers that the end-to-end tests compare {name} runs with, one "
                 "recording per build of the embedded backbones (tests/golden.py); made by "
                 f"tests/e2e/golden/record.py {name}")
        out = golden.record(name, recorded, about)
        print(f"{out}: {len(recorded['runs'])} runs for weights {golden.local_weights()} "
              f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
