"""``python -m harness tune SWEEP_SPEC [key=value ...] [--resume]``: a Ray Tune sweep.

The spec is a benchmark spec with a ``sweep`` section, checked completely first (exit 2);
``harness.pipeline.sweep.run_sweep`` runs (or, with ``--resume``, continues) the sweep.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec (a benchmark spec with a 'sweep' section)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep of the same spec")


def main(args: argparse.Namespace) -> int:
    from harness.pipeline.ray_runtime import prepare_environment
    from harness.spec import load_spec
    spec = load_spec(args.spec, args.overrides, sweep=True)
    prepare_environment(spec.ray.address)            # before anything imports ray
    from harness.pipeline.sweep import run_sweep
    run_sweep(spec, resume=args.resume)
    return 0
