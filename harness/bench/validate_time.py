"""``python -m harness bench --validate SPEC``: how long ``validate`` takes, and what it holds,
against the same check with the imports it no longer needs, side by side in one run.

Each way runs ``--validate-repeats`` times in a fresh interpreter (``python -c``), in turn:

* **validate**: ``python -m harness validate SPEC`` as a user types it (the embedded
  backbones' specs import neither torchvision nor MLflow: their registry entries and the
  tracking location need neither);
* **with the old imports**: the same call after ``import torchvision, mlflow.tracking`` (what
  ``validate`` imported before: torchvision for the registry's torchvision entries, pulling
  in ``torch._dynamo``, and MLflow to print the tracking location).

For each: the median wall seconds, the median peak resident memory (MiB, ``ru_maxrss`` of
the child), and the ratio to ``validate``'s.
"""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from typing import Any

OLD_IMPORTS = "import torchvision, mlflow.tracking; "


def _once(code: str) -> float:
    """Wall seconds of one fresh interpreter running ``code``."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode:
        raise RuntimeError(f"validate failed: {res.stderr[-1000:]}")
    return wall


def run(spec: str, repeats: int) -> dict[str, Any]:
    call = f"from harness.cli import main; main(['validate', {spec!r}])"
    ways = {"validate": call, "with the old imports": OLD_IMPORTS + call}
    times: dict[str, list] = {w: [] for w in ways}
    for _ in range(repeats):                 # interleaved: the machine's noise hits both
        for name, code in ways.items():
            times[name].append(_once(code))
    base = statistics.median(times["validate"])
    out = {}
    for name, got in times.items():
        out[name] = {"seconds": statistics.median(got),
                     "x_validate": statistics.median(got) / base, "runs": got,
                     "peak_mib": _peak(ways[name])}
    return {"spec": spec, "repeats": repeats, "ways": out}


def _peak(code: str) -> float:
    """Peak resident MiB of one fresh run of ``code`` (its own ``ru_maxrss``, KiB on Linux)."""
    probe = (f"{code}\nimport resource, sys; "
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("PEAK"))
    return int(line.split()[1]) / 1024


def table(results: dict[str, Any]):
    from rich.table import Table
    t = Table(title=f"validate {results['spec']}, median of {results['repeats']} fresh "
                    "interpreters, interleaved", title_justify="left")
    for col in ("way", "seconds", "x validate", "peak MiB"):
        t.add_column(col, justify="left" if col == "way" else "right")
    for name, r in results["ways"].items():
        t.add_row(name, f"{r['seconds']:.2f}", f"{r['x_validate']:.2f}x", f"{r['peak_mib']:.0f}")
    return t
