"""``python -m harness report``: Table 1, CSV, Markdown and plots of a finished run, from MLflow.

    python -m harness report                          # the latest benchmark run anywhere
    python -m harness report --experiment quickstart  # the latest one of an experiment
    python -m harness report --run <RUN_ID> --out reports/mine
    python -m harness report --html report.html       # also the one-page HTML report

The store is ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (as ``run``); what is
read and written is described in ``harness.results.report``. ``--html OUT`` also writes the
self-contained page of ``harness.results.html_report`` to OUT (atomically, once everything
else succeeded) and, unless ``--no-log``, logs it to the parent run as
``report/report.html`` (a copy in the ``--out`` folder). Exit 2 for an unknown experiment or
run, a benchmark without method runs, or an ``--html`` path that cannot be written (not
ending in .html, a folder, or in a folder that is a file or not writable): then nothing is
written.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: any)")
    parser.add_argument("--run", metavar="RUN_ID", help="a benchmark (parent) run id, or one "
                        "of its method runs (default: the latest benchmark run)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: reports/<run id>)")
    parser.add_argument("--html", metavar="OUT", help="also write the run's self-contained HTML "
                        "report to OUT (a .html file; images inlined, no links)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the files as artifacts of the parent run")


def main(args) -> int:
    from harness.results import html_report
    from harness.results.report import _client, report
    target = html_report.check_target(args.html) if getattr(args, "html", None) else None
    done = report(args.experiment, args.run, args.out, log=not args.no_log)
    if target is None:
        return 0
    data, paths = done["data"], done["paths"]
    client = _client()
    text = html_report.build(client, data["parent"], data, html_report.files_of(paths))
    written = html_report.write(target, text)
    if not args.no_log:
        copy = html_report.write(paths[0].parent / "report.html", text)
        client.log_artifact(done["parent_run_id"], str(copy), "report")
    print(f"HTML report: {written} ({written.stat().st_size / 1e6:.1f} MB)"
          + (", logged as report/report.html" if not args.no_log else ""))
    return 0
