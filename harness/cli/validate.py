"""``python -m harness validate SPEC [SPEC ...] [key=value ...]``: will these specs run?

Each spec is read and checked completely (``harness.spec``: every problem at once, exit 2)
and planned (``harness.pipeline.plan``: cells, heads to train, shards, #FW per image), which
is printed. Nothing is started: no Ray, no MLflow, no data generated.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def split_targets(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Spec paths and ``key=value`` overrides, in any order."""
    specs, overrides = [], []
    for item in items:
        is_override = "=" in item and not item.endswith((".yaml", ".yml"))
        (overrides if is_override else specs).append(item)
    return specs, overrides


def counts(spec) -> str:
    pairs = len(spec.pairs())
    nb, nm = len(spec.backbones), len(spec.methods)
    text = f"{nb} backbone{'' if nb == 1 else 's'} x {nm} method{'' if nm == 1 else 's'}"
    if pairs != nb * nm:
        text += f" = {pairs} runs"
    return text


def locations(spec) -> str:
    """Where a run of this spec would write: results, node-local cache, MLflow store."""
    from harness.data.cache import planned_cache
    from harness.results.tracking import tracking_uri
    cache = planned_cache(spec.storage.uri, spec.storage.cache)
    results = spec.storage.uri if spec.storage.uri and "://" in spec.storage.uri else cache
    return (f"results: {results}; node cache: {cache}; "
            f"MLflow: {spec.tracking.uri or tracking_uri()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", metavar="SPEC|key=value",
                        help="spec files, then overrides such as train.epochs=2")
    parser.add_argument("--show", action="store_true", help="print the resolved spec as YAML")


def main(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.pipeline.plan import describe, plan
    from harness.spec import SpecError, load_spec
    specs, overrides = split_targets(args.targets)
    if not specs:
        raise UserError("validate needs a spec file (e.g. jobs/quickstart.yaml)")
    status = 0
    for path in specs:
        try:
            spec = load_spec(path, overrides)
        except SpecError as err:
            print(err.format(), file=sys.stderr, flush=True)
            status = 2
            continue
        print(f"{path}: OK ({counts(spec)})", flush=True)
        for line in describe(plan(spec)):
            print(f"  {line}")
        print(f"  {locations(spec)}")
        if args.show:
            import yaml
            print(f"# fingerprint {spec.fingerprint()}")
            print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    return status
