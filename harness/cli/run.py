"""``python -m harness run SPEC [key=value ...]``: validate a spec, then run the benchmark.

The spec is checked completely first (exit 2, nothing started); then Ray's environment is
set before anything imports Ray (``harness.pipeline.ray_runtime``) and
``harness.pipeline.runner.run_benchmark`` runs the stages.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def main(args: argparse.Namespace) -> int:
    from harness.cli.validate import split_targets
    from harness.errors import UserError
    from harness.pipeline.ray_runtime import prepare_environment
    from harness.spec import load_spec
    specs, overrides = split_targets([args.spec, *args.overrides])
    if len(specs) != 1:
        raise UserError(f"run takes one spec file, got {len(specs)}: {' '.join(specs)}")
    spec = load_spec(specs[0], overrides)
    prepare_environment(spec.ray.address)            # before anything imports ray
    from harness.pipeline.runner import run_benchmark
    run_benchmark(spec)
    return 0
