"""``python -m harness gpu-check [--dry] [--ray] [--only SECTION ...] [--out FILE]``: the GPU
paths, measured in minutes.

What each section measures is described in ``harness.bench.gpu_check``; ``--dry`` runs the
same code on the CPU with small inputs (the test suite does), ``--ray`` adds the Ray part,
``--only`` runs the named sections alone (a rerun of one on a machine lent for minutes). A
table per section is printed and the JSON file is rewritten after each section. Exit 0 when
every section ran and met its targets, 1 when one raised or missed (the JSON file says
which), 2 without CUDA and without ``--dry``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.bench.gpu_check import SECTIONS
    parser.add_argument("--dry", action="store_true",
                        help="run the same code on the CPU with small inputs")
    parser.add_argument("--ray", action="store_true",
                        help="add the Ray part (fit_heads and its resume, quarter-share "
                             "tasks, the refusals); needs ray[train]")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--out", default="bench-results/gpu-check.json", help="JSON results")


def _n(value: Any, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _parity(table, r: dict) -> None:
    for col in ("method", "Spearman float32", "tf32", "autocast", "ms/img", "ms/img autocast",
                "ms/img CPU", "peak MiB", "met"):
        table.add_column(col)
    for name, m in r.items():
        table.add_row(name, f"{m['spearman_float32']:.5f}", f"{m['spearman_tf32']:.5f}",
                      f"{m['spearman_autocast']:.4f}", _ms(m["seconds_per_image"]),
                      _ms(m["seconds_per_image_autocast"]), _ms(m["seconds_per_image_cpu"]),
                      _n(m["peak_mib"], ".0f"), str(m["met"]))


def _busy(table, r: dict) -> None:
    for col in ("method", "busy", "target", "ms/shard", "explain ms", "score ms", "images/s",
                "first shard s", "met"):
        table.add_column(col)
    for name, m in r.items():
        st = m["stage_s_per_shard"]
        table.add_row(name, f"{m['busy']:.3f}", f">= {m['target']}", _ms(m["wall_s_per_shard"]),
                      _ms(st.get("explain")), _ms(st.get("score")), f"{m['images_per_s']:.0f}",
                      f"{m['first_shard_s']:.2f}", "-" if m["met"] is None else str(m["met"]))


def _masked(table, r: dict) -> None:
    for col in ("method", "precision / layout", "masked forwards/s", "forwards/img", "ms/img",
                "Spearman vs float32", "peak MiB"):
        table.add_column(col)
    for name, modes in r.items():
        for mode, m in modes.items():
            table.add_row(name, mode, f"{m['masked_per_s']:.0f}", f"{m['forwards_per_image']:g}",
                          _ms(m["seconds_per_image"]), f"{m['spearman_vs_float32']:.5f}",
                          _n(m["peak_mib"], ".0f"))


def _four_heads(table, r: dict) -> None:
    for col in ("backend", "heads", "steps x batch", "steps/s", "images/s", "losses", "met"):
        table.add_column(col)
    losses = ", ".join(f"{k} {v:.3f}" for k, v in r["loss"].items())
    table.add_row(r["backend"], str(r["heads"]), f"{r['steps']} x {r['batch']}",
                  f"{r['steps_per_s']:.2f}", f"{r['images_per_s']:.0f}", losses, str(r["met"]))


def _training_input(table, r: dict) -> None:
    for col in ("loader processes", "images/s", "first batch s", "images/s after it"):
        table.add_column(col)
    for workers, m in r["workers"].items():
        table.add_row(workers, f"{m['images_per_s']:.0f}", f"{m['first_batch_s']:.2f}",
                      _n(m["images_per_s_after_first"], ".0f"))


def _ray(table, r: dict) -> None:
    for col in ("check", "result", "met"):
        table.add_column(col)
    f, q = r["fit_heads"], r["shards"]
    table.add_row("fit_heads, then resumed",
                  f"{f['seconds'][0]:.1f} s, then {f['seconds'][1]:.1f} s", str(f["met"]))
    table.add_row("8 tasks at a quarter share", f"{q['max_at_once']} at once, pids "
                  f"{sorted({t['pid'] for t in q['tasks']})}", str(q["met"]))
    table.add_row("refusals", "too many GPUs and missing CUDA both refused",
                  str(r["refusals"]["met"]))


TABLES: dict[str, Callable] = {"parity": _parity, "busy": _busy, "masked": _masked,
                               "four_heads": _four_heads, "training_input": _training_input,
                               "ray": _ray}


def main(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.bench.gpu_check import SECTIONS, run
    from harness.errors import UserError
    from harness.terminal import make_console
    try:
        results = run(args.dry, Path(args.out), with_ray=args.ray,
                      only=tuple(args.only) if args.only else None)
    except UserError as err:          # here: the central handler imports the spec (pydantic)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    console = make_console()
    console.print(f"gpu-check on {results['device']} ({results['date']}, torch "
                  f"{results['torch']})")
    for name in SECTIONS:
        if name not in results:
            continue
        r = results[name]
        table = Table(title=f"{name} ({results['section_seconds'][name]:.0f} s)")
        if "error" in r:
            table.add_column("error")
            table.add_row(r["error"])
        else:
            TABLES[name](table, r)
        console.print(table)
    failed = results["failed"]
    console.print(f"wrote {args.out} in {results['seconds']:.0f} s"
                  + (f"; failed or missed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
