"""The command line: ``python -m harness <command> ...`` (also installed as ``lcam-bench``).

One module per command in this package, listed in ``COMMANDS``; each has ``HELP`` (one
line), ``add_arguments(parser)`` and ``main(args) -> int``. Only the module of the command
being run is imported (a command that fails to import breaks only itself, and ``validate``
or ``ls`` never pay for Ray or MLflow).

Exit codes: 0 success; 2 a problem the user can fix (``harness.errors.UserError``: a bad spec,
input, option or location), reported before anything was started; 1 a runtime failure;
130 interrupted. An error is its message (a spec's problems one a line; a long message
shortened in the middle, never cut before its cause); ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Sequence

#: command -> (module, one-line help). The order is the order of ``--help``.
COMMANDS = {
    "validate": ("harness.cli.validate", "check spec files and print their plans (exit 0 or 2)"),
    "run": ("harness.cli.run", "validate a spec, then run the benchmark"),
    "tune": ("harness.cli.tune", "Ray Tune sweep of the L-CAM hyper-parameters"),
    "report": ("harness.cli.report", "Table 1, CSV and plots of a finished run, from MLflow"),
    "explain": ("harness.cli.explain", "class-specific saliency overlays for your own images"),
    "bench": ("harness.cli.bench", "cost per explanation against the #FW floor"),
    "gpu-check": ("harness.cli.gpu_check", "the GPU paths checked in minutes (--dry: on CPU)"),
    "ls": ("harness.cli.ls", "list methods, backbones and jobs"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to fill its arguments."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser = argparse.ArgumentParser(prog="python -m harness", parents=[common], description=(
        "Benchmark harness for learned visual explanations (L-CAM) on Ray and MLflow."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(func=module.main)
    return parser


def _report(err: BaseException, debug: bool) -> int:
    from harness.errors import UserError
    # a SpecError can only come from harness.spec: never import it (and pydantic) to ask
    spec_error = getattr(sys.modules.get("harness.spec"), "SpecError", None)
    if spec_error is not None and isinstance(err, spec_error):
        print(err.format(), file=sys.stderr)
        return err.exit_code
    if isinstance(err, UserError):
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if debug:
        traceback.print_exc()
    else:
        msg = _excerpt(str(err).strip())
        print(f"error: {type(err).__name__}: {msg}" if msg else f"error: {type(err).__name__}",
              file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
    return 1


def _excerpt(text: str, lines: int = 12, chars: int = 2000) -> str:
    """The message whole, up to ``lines`` lines and ``chars`` characters (the cause of an
    error is often on its last line: nothing is cut before it unless the message is long)."""
    parts = text.splitlines()
    out = "\n".join(parts[:lines] if len(parts) <= lines else
                    parts[:lines // 2] + [f"... ({len(parts) - lines} lines)"] + parts[-lines // 2:])
    return out if len(out) <= chars else out[:chars // 2] + " ... " + out[-chars // 2:]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv                       # accepted before or after the command
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:           # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:          # one place turns errors into exit codes
        return _report(err, args.debug)
