"""Record the pinned reference runs that end-to-end tests compare their fault runs with.

    python tests/e2e/golden/record.py reliability two_nodes

Each target runs an undisturbed ``python -m harness run`` of the test's own spec, on one
machine with a local Ray, in a user's plain environment and a fresh cache (the session's
generated inputs), and writes what the test compares into ``tests/e2e/golden/<target>.json``:

- ``reliability``: ``test_reliability.py``'s spec (tiny_vgg, four methods, 12 images):
  every compared metric of each run and, for each trained L-CAM head file, the SHA-256 of
  each tensor (names, dtype, shape and bytes);
- ``two_nodes``: ``test_two_nodes.py``'s spec (tiny_vgg, eight methods, two Ray Train
  workers) on one node: every metric the spec determines.

The tests then need no reference run of their own (49 s and 69 s here on two
cores). Rerun this script, and say why in the commit, only when a change is meant to move
the numbers: a refactor must not (``golden/smoke.json`` and ``golden/quickstart.json`` pin
the benchmark's own rows the same way).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]       # tests/, tests/e2e/

import test_reliability as rel  # noqa: E402
import test_two_nodes as two  # noqa: E402
from services import fresh_cache, tensor_hashes, user_env, workspace  # noqa: E402


def compared(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {key: {n: v for n, v in sorted(m.items())
                  if not n.startswith(("_", "train_")) and n not in rel.NOT_COMPARED}
            for key, m in sorted(metrics.items())}


def record_reliability(work: Path) -> dict:
    stores = rel.Stores(work)
    cache = fresh_cache(work)
    ray_tmp = rel.short_tmp("rel")
    stores.ok(rel.harness_run("tracking.experiment=rel-clean"), stores.env(cache, ray_tmp),
              timeout=900)
    metrics = stores.finished("rel-clean")
    rel.assert_rows_complete(metrics)
    heads = {name: tensor_hashes(state) for name, state in rel.heads_of(cache).items()}
    return {"command": rel.REFERENCE_COMMAND,
            "runs": compared(metrics), "heads": heads}


def record_two_nodes(work: Path) -> dict:
    root = workspace(work)
    db = work / "mlflow.db"
    args = ["-m", "harness", "run", *two.SPEC, *two.ONE_NODE, f"tracking.uri=sqlite:///{db}"]
    res = subprocess.run([sys.executable, *args], cwd=root, env=user_env(work / "home"),
                         capture_output=True, text=True, timeout=1800)
    if res.returncode:
        sys.exit(res.stdout[-4000:] + res.stderr[-4000:])
    numbers = two.numbers(two.method_runs(f"sqlite:///{db}", "smoke"))
    return {"command": " ".join(args[1:-1]), "runs": numbers}


TARGETS = {"reliability": record_reliability, "two_nodes": record_two_nodes}


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
        about = (f"the undisturbed one-machine run that test_{name}.py compares with, recorded "
                 f"by tests/e2e/golden/record.py at commit {commit} ({time.strftime('%Y-%m-%d')})")
        out = HERE / f"{name}.json"
        out.write_text(json.dumps({"_about": about, **recorded}, indent=1, sort_keys=True) + "\n")
        print(f"{out}: {len(recorded['runs'])} runs ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
