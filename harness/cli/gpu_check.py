"""``python -m harness gpu-check [--dry] [--out FILE]``: the GPU paths, checked in minutes.

What is checked is described in ``harness.bench.gpu_check``; ``--dry`` runs the same code on
the CPU with small inputs (the test suite does). Exit 0 when every check met its target,
1 when one did not (the JSON file says which), 2 without CUDA and without ``--dry``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry", action="store_true",
                        help="run the same code on the CPU with small inputs")
    parser.add_argument("--out", default="bench-results/gpu-check.json", help="JSON results")


def main(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.bench.gpu_check import run
    from harness.terminal import make_console
    results = run(args.dry, Path(args.out))
    console = make_console()
    table = Table(title=f"gpu-check on {results['device']} ({results['date']})")
    for col in ("check", "result", "met"):
        table.add_column(col)
    for name, r in results["parity"].items():
        table.add_row(f"parity {name}", f"Spearman float32 {r['spearman_float32']:.5f}, tf32 "
                      f"{r['spearman_tf32']:.5f}, autocast {r['spearman_autocast']:.4f}; "
                      f"{r['seconds_per_image'] * 1e3:.1f} ms/img"
                      + (f", peak {r['peak_mib']:.0f} MiB" if r["peak_mib"] else ""),
                      str(r["met"]))
    c = results["collectives"]
    table.add_row(f"collectives ({c['backend']})", f"epoch loss {c['loss']:.4f}", str(c["met"]))
    ray_results = results["ray"]
    f = ray_results["fit_heads"]
    table.add_row("fit_heads, then resumed", f"{f['seconds'][0]:.1f} s, then {f['seconds'][1]:.1f} s",
                  str(f["met"]))
    q = ray_results["shards"]
    table.add_row("8 tasks at a quarter share", f"{q['max_at_once']} at once, pids "
                  f"{sorted({t['pid'] for t in q['tasks']})}", str(q["met"]))
    table.add_row("refusals", "too many GPUs and missing CUDA both refused",
                  str(ray_results["refusals"]["met"]))
    console.print(table)
    console.print(f"wrote {args.out} in {results['seconds']:.0f} s")
    met = all(r["met"] for r in results["parity"].values()) and c["met"] and f["met"] \
        and q["met"] and ray_results["refusals"]["met"]
    return 0 if met else 1
