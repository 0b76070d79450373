"""The command line: ``python -m harness <command> ...`` (also installed as ``lcam-bench``).

Built-in commands::

    validate SPEC [SPEC ...] [key=value ...] [--show]   check specs; exit 0 or 2
    run SPEC [key=value ...] [--debug]                   validate, then harness.runner.run_benchmark
    ls                                                   methods, backbones and jobs/*.yaml

Adding a command: write a module ``harness/<command>.py`` with two top-level functions,
``add_arguments(parser)`` (fills its argparse sub-parser) and ``main(args) -> int | None``.
It is discovered without being imported (its source is scanned for both definitions) and
imported only when that command runs, so a module that fails to import breaks only its own
command. ``tune``, ``report``, ``explain`` and ``bench`` are reserved for such modules.

Exit codes: 0 success, 2 spec or usage errors (nothing was started), 1 runtime failures,
130 interrupted. Errors are one line; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

PACKAGE_DIR = Path(__file__).resolve().parent
RESERVED = ("tune", "report", "explain", "bench")
BUILTIN = ("validate", "run", "ls")


def _split_targets(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Spec paths and ``key=value`` overrides, in any order."""
    specs, overrides = [], []
    for item in items:
        is_override = "=" in item and not item.endswith((".yaml", ".yml"))
        (overrides if is_override else specs).append(item)
    return specs, overrides


def _counts(spec) -> str:
    pairs = len(spec.pairs())
    nb, nm = len(spec.backbones), len(spec.methods)
    text = f"{nb} backbone{'' if nb == 1 else 's'} x {nm} method{'' if nm == 1 else 's'}"
    if pairs != len(spec.backbones) * len(spec.methods):
        text += f" = {pairs} runs"
    return text


# -- built-in commands ------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from harness.spec import SpecError, load_spec  # every file's problems, then exit 2
    specs, overrides = _split_targets(args.targets)
    if not specs:
        print("error: validate needs a spec file (e.g. jobs/quickstart.yaml)", file=sys.stderr)
        return 2
    status = 0
    for path in specs:
        try:
            spec = load_spec(path, overrides)
        except SpecError as err:
            print(err.format(), file=sys.stderr, flush=True)
            status = 2
            continue
        print(f"{path}: OK ({_counts(spec)})", flush=True)
        if args.show:
            import yaml
            print(f"# fingerprint {spec.fingerprint()}")
            print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.ray_runtime import prepare_environment
    from harness.spec import load_spec
    specs, overrides = _split_targets([args.spec, *args.overrides])
    if len(specs) != 1:
        raise UserError(f"run takes one spec file, got {len(specs)}: {' '.join(specs)}")
    spec = load_spec(specs[0], overrides)
    prepare_environment(spec.ray.address)            # before anything imports ray
    from harness.runner import run_benchmark         # Ray, MLflow: once the spec is valid
    run_benchmark(spec)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .terminal import make_console
    from rich.table import Table
    import backbones
    import methods

    console = make_console()
    t = Table(title="methods", title_justify="left")
    for col in ("name", "display", "family", "variants", "params", "paper"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    for name in methods.names():
        cls = methods.method_class(name)
        params = ", ".join(f"{k}={p.default!r}" for k, p in cls.params.items()) or "-"
        t.add_row(name, cls.display_name, cls.family, ", ".join(cls.variants), params,
                  getattr(cls, "paper", ""))
    console.print(t)
    t = Table(title="backbones", title_justify="left")
    for col in ("name", "family", "feature layer", "feature shape", "weights", "paper"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    for entry in backbones.REGISTRY:
        meta = entry.meta
        shape = meta.get("feature_shape")
        weights = meta.get("default_weights") or ("IMAGENET1K_V1" if meta.get("weights_enum")
                                                   else "embedded")
        t.add_row(entry.name, str(meta.get("family", "")), str(meta.get("feature_layer", "")),
                  "x".join(map(str, shape)) if shape else "", weights, str(meta.get("paper", "")))
    console.print(t)
    jobs_dir = Path.cwd() / "jobs"
    if not jobs_dir.is_dir():
        jobs_dir = PACKAGE_DIR.parent / "jobs"
    t = Table(title=f"jobs ({jobs_dir})", title_justify="left")
    t.add_column("file", no_wrap=True)
    t.add_column("command (first comment line)", overflow="fold")
    for path in sorted(jobs_dir.glob("*.yaml")):
        t.add_row(path.name, _first_comment(path))
    console.print(t)
    return 0


def _first_comment(path: Path) -> str:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("#"):
                return line.strip().lstrip("#").strip()
    except OSError:
        pass
    return ""


# -- command discovery ------------------------------------------------------------------------
def discover() -> dict[str, str]:
    """Optional command modules in harness/: {name: first docstring line}, none imported."""
    found = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in BUILTIN or name == "cli":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            if name in RESERVED:
                found[name] = "(cannot be read)"
            continue
        defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if {"add_arguments", "main"} <= defs:
            doc = ast.get_docstring(tree) or ""
            found[name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def _optional_runner(name: str, module) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        result = module.main(args)
        return result if isinstance(result, int) else 0
    return run


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"error: the '{name}' command is not available: {reason}", file=sys.stderr)
        return 1
    return run


def build_parser(command: str | None, debug: bool = False) -> argparse.ArgumentParser:
    """The parser; only the optional module of ``command`` (if any) is imported."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser = argparse.ArgumentParser(prog="python -m harness", description=(
        "Benchmark harness for learned visual explanations (L-CAM) on Ray and MLflow."),
        parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", parents=[common], help="check spec files (exit 0 or 2)")
    p.add_argument("targets", nargs="+", metavar="SPEC|key=value",
                   help="spec files, then overrides such as train.epochs=2")
    p.add_argument("--show", action="store_true", help="print the resolved spec as YAML")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", parents=[common], help="validate a spec, then run the benchmark")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ls", parents=[common], help="list methods, backbones and jobs")
    p.set_defaults(func=cmd_ls)

    found = discover()
    for name in sorted(set(found) | set(RESERVED)):
        help_text = found.get(name) or "(not installed)"
        p = sub.add_parser(name, parents=[common], help=help_text)
        if name != command or name not in found:
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_unavailable(name, f"harness/{name}.py is not part of this "
                                             "installation" if name not in found else "not loaded"))
            continue
        try:
            module = importlib.import_module(f"harness.{name}")
            module.add_arguments(p)
        except Exception as err:  # an optional command must not break the others
            if debug:
                traceback.print_exc()
            p.set_defaults(func=_unavailable(name, f"harness.{name} failed to load "
                                             f"({type(err).__name__}: {err})"))
            p.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        p.set_defaults(func=_optional_runner(name, module))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command, debug)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    from harness.errors import UserError
    from harness.spec import SpecError
    try:
        return int(args.func(args) or 0)
    except SpecError as err:          # every problem of the spec, one a line
        print(err.format(), file=sys.stderr)
        return err.exit_code
    except UserError as err:          # a bad input, option or location: nothing was started
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:           # e.g. piped into head
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # runtime failure: one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"error: {type(err).__name__}: {msg}" if msg else f"error: {type(err).__name__}",
                  file=sys.stderr)
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return 1
