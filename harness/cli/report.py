"""``python -m harness report``: Table 1, CSV, Markdown and plots of a finished run, from MLflow.

    python -m harness report                          # the latest benchmark run anywhere
    python -m harness report --experiment quickstart  # the latest one of an experiment
    python -m harness report --run <RUN_ID> --out reports/mine

The store is ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (as ``run``); what is
read and written is described in ``harness.results.report``. Exit 2 for an unknown experiment
or run, or a benchmark without method runs.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: any)")
    parser.add_argument("--run", metavar="RUN_ID", help="a benchmark (parent) run id, or one "
                        "of its method runs (default: the latest benchmark run)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: reports/<run id>)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the files as artifacts of the parent run")


def main(args) -> int:
    from harness.results.report import report
    report(args.experiment, args.run, args.out, log=not args.no_log)
    return 0
