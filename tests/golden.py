"""Pinned reference numbers, one recording per build of the embedded backbones.

The end-to-end tests compare runs with numbers pinned in ``tests/e2e/golden/<name>.json``.
Those numbers depend on the embedded backbones' weights, which the harness trains on first
use: bit-identical on one machine, but another CPU (its vector instructions: AVX2, AVX-512)
or torch build trains other weights, and every number moves. So a golden file holds
*recordings*, each with the weights it was made with (``backbones.embedded.state_hash`` of
each embedded backbone, from the weights' sidecar) and the machine (torch version, torch's
CPU capability, CPU model):

- ``pinned(name)``: the recording made with this machine's weights; a test compares with it
  bit for bit where the machine is the same, and within ``TOLERANCE`` where only the machine
  differs (the weights being equal);
- no recording for these weights: the test is skipped, saying how to record one
  (``python tests/e2e/golden/record.py <name>``). The tests that check numbers independently
  (AD/IC recomputed from the per-image rows, the peers' oracles) run everywhere.
"""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pytest

from services import TEST_CACHE

GOLDEN = Path(__file__).resolve().parent / "e2e" / "golden"
#: relative tolerance between machines with the same weights (float32 kernels may round
#: differently); IC is a count of images, compared to within one image
TOLERANCE = 1e-5


def machine() -> dict[str, str]:
    """What decides the floating-point results on this machine."""
    import torch
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": model}


def local_weights(cache: Path = TEST_CACHE) -> dict[str, str]:
    """The embedded backbones' weights hashes in the test cache (from their sidecars)."""
    out = {}
    for side in sorted((cache / "backbones").glob("*-v*.json")):
        info = json.loads(side.read_text())
        if info.get("weights_hash"):
            out[info["name"]] = info["weights_hash"]
    return out


def recordings(name: str) -> list[dict]:
    path = GOLDEN / f"{name}.json"
    return json.loads(path.read_text()).get("recordings", []) if path.is_file() else []


def find(name: str, weights: dict[str, str] | None = None) -> dict | None:
    """The recording of ``name`` made with ``weights`` (default: the test cache's), or None."""
    weights = local_weights() if weights is None else weights
    for rec in recordings(name):
        if rec["weights"] and all(weights.get(k) == v for k, v in rec["weights"].items()):
            return rec
    return None


def pinned(name: str, weights: dict[str, str] | None = None) -> dict:
    """The recording for this machine's weights, or skip (see the module docstring)."""
    rec = find(name, weights)
    if rec is None:
        pytest.skip(f"no pinned {name} numbers for these embedded weights "
                    f"({weights or local_weights()}, {machine()}): record them with "
                    f"python tests/e2e/golden/record.py {name}")
    return rec


def same_machine(rec: dict) -> bool:
    return rec.get("machine", {}).get("cpu_capability") == machine()["cpu_capability"] and \
        rec.get("machine", {}).get("torch") == machine()["torch"]


def close(got: float, want: float, metric: str, images: float, exact: bool) -> bool:
    """``got`` equals ``want``: bit for bit when ``exact``, else within ``TOLERANCE`` (IC
    metrics within one image of ``images``)."""
    if exact:
        return got == want or (math.isnan(got) and math.isnan(want))
    if metric.startswith("IC_") and images:
        return abs(got - want) <= 100.0 / images + 1e-9
    return math.isclose(got, want, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def differences(got: dict[str, dict], rec: dict) -> dict[str, dict[str, tuple]]:
    """Per run key, the metrics of ``got`` that differ from the recording ``rec``."""
    exact = same_machine(rec)
    out = {}
    for key, want in rec["runs"].items():
        mine = got.get(key, {})
        n = want.get("images", 0.0)
        bad = {m: (mine.get(m), v) for m, v in want.items()
               if m not in mine or not close(mine[m], v, m, n, exact)}
        if bad:
            out[key] = bad
    missing = sorted(set(rec["runs"]) - set(got))
    if missing:
        out["(missing runs)"] = {k: (None, None) for k in missing}
    return out


def record(name: str, recorded: dict, about: str) -> Path:
    """Write ``recorded`` (``runs`` and what else the test compares) as the recording for
    this machine's weights, keeping the recordings of other weights."""
    weights = local_weights()
    rec = {"weights": weights, "machine": machine(), **recorded}
    others = [r for r in recordings(name) if r["weights"] != weights]
    path = GOLDEN / f"{name}.json"
    path.write_text(json.dumps({"_about": about, "recordings": [*others, rec]}, indent=1,
                               sort_keys=True) + "\n")
    return path
