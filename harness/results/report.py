"""Report a finished benchmark from MLflow: Table 1 per backbone, CSV/Markdown, AD/IC vs #FW plot.

    python -m harness report                          # the latest benchmark run anywhere
    python -m harness report --experiment quickstart  # the latest one of an experiment
    python -m harness report --run <RUN_ID> --out reports/mine

Reads the store named by ``MLFLOW_TRACKING_URI`` (else ``sqlite:///<cwd>/mlflow.db``, as the
runner) through ``MlflowClient`` only. A benchmark is a parent run tagged
``harness_role=benchmark``; its method runs are the children (``mlflow.parentRunId``) tagged
``harness_role=method`` with tags ``backbone``, ``method``, ``method_id``, ``display_name``,
``variant``, ``weights_id`` and the metrics ``AD_<k>``, ``IC_<k>`` (k = kept percentage),
``FW``, ``FW_measured``, ``seconds_per_image``, ``degenerate_maps``, ``images`` (with
``<metric>_ci_low``/``_ci_high`` and ``deletion_auc``/``insertion_auc`` where logged). A
child run id given to ``--run`` is resolved to its parent.

For every backbone (in the order its runs were created) the report renders the paper's Table 1
layout with ``harness.results.table`` (methods as rows; AD/IC at each kept fraction and #FW as
columns; ``value ± half-width`` of the logged intervals; bold only where a row is
significantly better than every other, by the paired tests that ``harness.results.pairwise``
recomputes from the runs' ``per_image.parquet`` artifacts with the parent's ``statistics.*``
parameters) in the terminal, and writes, atomically (temporary file + ``os.replace``) into
``--out`` (default ``reports/<run id>``):

- ``table.md``: the Markdown tables, one section per backbone, each followed by the images
  needed for the target half-width;
- ``pairwise-<backbone>.csv`` and ``pairwise-<backbone>.png``: every paired test of the
  backbone (``harness.results.pairwise``);
- ``table.csv``: one row per method run: ``backbone, display_name, method`` (registry key),
  ``method_id, variant, weights_id, status, run_id``, then every metric as ``repr(float)`` (so that the stored values are reproduced exactly; empty = not logged);
  for a Table 1 preset run also ``paper_<metric>`` and ``diff_<metric>`` (ours - paper);
- ``ad_ic_vs_fw-<backbone>.png``: AD (left) and IC (right) at each kept fraction against #FW
  on a log x axis, one colour per method, one marker per fraction (methods with equal #FW
  are spread by +-3% along x so that they stay visible); matplotlib's Agg canvas, no pyplot
  state (skipped with a warning when matplotlib is not installed).

A run of a Table 1 preset (``jobs/table1_*.yaml``, tagged ``table1: <preset>``) shows the
paper's value and the difference under each of our numbers (``harness.results.table1``).

The files are logged as artifacts of the parent run under ``report/`` (``--no-log`` to skip).
Exit 2 for an unknown experiment or run, or a benchmark without method runs.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from harness.metrics import registry
from harness.metrics.statistics import StatisticsSettings
from harness.results import pairwise, table, table1
from harness.errors import UserError
from harness.data.cache import atomic_write, write_text_atomic

IDENTITY = ("backbone", "display_name", "method", "method_id", "variant", "weights_id", "status",
            "run_id")
ROW_KEYS = {"display_name": "method", "method": "method_key"}   # CSV column -> row key
EXTRA_ORDER = ("FW_measured", "seconds_per_image", "degenerate_maps", "images")


class ReportError(UserError):
    """A usage problem (unknown experiment/run, nothing to report): exit 2."""


# -- reading MLflow ---------------------------------------------------------------------------
def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient
    from harness.results.tracking import tracking_uri
    return MlflowClient(uri or tracking_uri())


def find_parent(client, experiment: str | None = None, run_id: str | None = None):
    """The benchmark parent run to report (see the module doc); ``ReportError`` if none."""
    from mlflow.exceptions import MlflowException
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ReportError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from None
        parent = run.data.tags.get("mlflow.parentRunId")
        if run.data.tags.get("harness_role") == "method" and parent:
            run = client.get_run(parent)
        if run.data.tags.get("harness_role") != "benchmark":
            raise ReportError(f"run {run_id} is not a benchmark run (tag harness_role="
                              f"{run.data.tags.get('harness_role')!r}, expected 'benchmark')")
        if experiment:
            exp = client.get_experiment(run.info.experiment_id)
            if exp.name != experiment:
                raise ReportError(f"run {run_id} belongs to experiment {exp.name!r}, "
                                  f"not {experiment!r}")
        return run
    experiments = client.search_experiments()
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            from backbones.registry import did_you_mean
            names = sorted(e.name for e in experiments)
            raise ReportError(f"unknown experiment {experiment!r}.{did_you_mean(experiment, names)}"
                              f" Available: {', '.join(names) or '(none)'}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in experiments]
    runs = client.search_runs(ids, filter_string="tags.harness_role = 'benchmark'",
                              order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        where = f"experiment {experiment!r}" if experiment else client.tracking_uri
        raise ReportError(f"no benchmark runs in {where}; run `python -m harness run SPEC` first")
    return runs[0]


def method_runs(client, parent) -> list:
    """The method runs of ``parent``, in creation order."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=5000)
    runs = [r for r in runs if r.data.tags.get("harness_role", "method") == "method"]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_name or ""))


def fraction_keys(runs) -> list[str]:
    """The kept-fraction keys ('100', '50', '15', ...) present, largest first."""
    keys = {k[3:] for r in runs for k in r.data.metrics if k.startswith(("AD_", "IC_"))
            and not k.endswith(("_ci_low", "_ci_high"))}

    def value(k: str) -> float:
        try:
            return float(k)
        except ValueError:
            return float("-inf")
    return sorted(keys, key=value, reverse=True)


def collect(client, parent) -> dict[str, Any]:
    """Everything the report shows: {'parent', 'experiment', 'columns', 'backbones': {...}}.

    ``backbones[name]`` = {'weights_id', 'rows': [row dicts]}; a row has 'method' (the display
    name, made unique within the backbone), the identity fields and every metric.
    """
    runs = method_runs(client, parent)
    if not runs:
        raise ReportError(f"benchmark run {parent.info.run_id} ({parent.info.run_name}) has no "
                          "method runs: nothing to report")
    cols = table.metric_columns(fraction_keys(runs), tuple(
        c for c in table.extra_columns() if any(c in r.data.metrics for r in runs)))
    settings = StatisticsSettings.from_params(parent.data.params)
    backbones: dict[str, dict] = {}
    for r in runs:
        t = r.data.tags
        name = t.get("backbone", "?")
        entry = backbones.setdefault(name, {"weights_id": t.get("weights_id", ""), "rows": [],
                                            "dataset": t.get("dataset", "")})
        label = t.get("display_name") or t.get("method") or r.info.run_name or r.info.run_id
        row = {"method": label, "method_key": t.get("method", ""), "backbone": name,
               "method_id": t.get("method_id", ""),
               "variant": t.get("variant", ""), "weights_id": t.get("weights_id", ""),
               "status": r.info.status, "run_id": r.info.run_id, **r.data.metrics,
               "paper": table1.paper_row(t.get(table1.TAG), t.get("method_id"))}
        entry["rows"].append(row)
    for entry in backbones.values():
        labels = [row["method"] for row in entry["rows"]]
        for row in entry["rows"]:
            if labels.count(row["method"]) > 1 and row["method_id"]:
                row["method"] = f"{row['method']} [{row['method_id']}]"
            if row["status"] == "FAILED":
                row["method"] += " (failed)"
    for entry in backbones.values():       # paired tests; sets each row's "marks"
        entry["stats"] = pairwise.backbone_statistics(client, entry["rows"], cols, settings)
    exp = client.get_experiment(parent.info.experiment_id)
    return {"parent": parent, "experiment": exp.name if exp else "", "columns": cols,
            "backbones": backbones, "settings": settings}


def caption(data: dict) -> str:
    """What ± and the marks mean, for the settings of ``data`` (and, for a Table 1 preset
    run, what the paper's line under each number is)."""
    st = data.get("settings") or StatisticsSettings()
    text = table.caption(f"{st.confidence:.0%} {'BCa' if st.method == 'bca' else 'percentile'} "
                         "bootstrap", st.alpha)
    parent = data.get("parent")
    preset = parent.data.tags.get(table1.TAG) if parent is not None else None
    if preset in table1.PAPER:
        text += (f"; paper: the L-CAM paper's Table 1 (preset {table1.TAG}={preset}), "
                 "Δ = ours - paper")
    return text


# -- rendering --------------------------------------------------------------------------------
def title_of(name: str, entry: dict) -> str:
    images = next((row["images"] for row in entry["rows"] if row.get("images") is not None), None)
    n = f", {images:.0f} images" if images is not None else ""
    of = f" of {entry['dataset']}" if n and entry.get("dataset") else ""
    return f"{name} ({entry['weights_id']}){n}{of}"


def markdown(data: dict) -> str:
    p = data["parent"]
    note = caption(data).replace("bold:", "**bold**:", 1).replace("underlined:",
                                                                  "<u>underlined</u>:", 1)
    parts = [f"# {p.info.run_name or 'benchmark'}\n\n"
             f"Experiment `{data['experiment']}`, run `{p.info.run_id}`, spec fingerprint "
             f"`{p.data.tags.get('spec_fingerprint', '')}`, git `{p.data.tags.get('git_commit', '')}`. "
             f"{registry.directions_text(data['columns'])} {note}.\n"]
    settings = data.get("settings") or StatisticsSettings()
    for name, entry in data["backbones"].items():
        sizes = pairwise.sample_size_text(entry, settings)
        parts.append(f"\n### {title_of(name, entry)}\n\n"
                     + table.markdown_table(entry["rows"], data["columns"])
                     + (f"\n{sizes}" if sizes else ""))
    return "".join(parts)


def csv_text(data: dict) -> str:
    """Every method run: identity columns, then the metrics as ``repr(float)``."""
    cols = list(data["columns"])
    present = {k for e in data["backbones"].values() for row in e["rows"] for k in row}
    metric_keys = {k for e in data["backbones"].values() for row in e["rows"]
                   for k, v in row.items() if isinstance(v, float)}
    extras = [k for k in EXTRA_ORDER if k in present and k not in cols]
    extras += sorted(metric_keys - set(cols) - set(extras))
    papers = [c for c in cols if any(c in (row.get("paper") or {})
                                     for e in data["backbones"].values() for row in e["rows"])]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*IDENTITY, *cols, *extras, *(f"{k}_{c}" for c in papers
                                             for k in ("paper", "diff"))])
    for entry in data["backbones"].values():
        for row in entry["rows"]:
            w.writerow([row.get(ROW_KEYS.get(k, k), "") for k in IDENTITY]
                       + ["" if row.get(c) is None else repr(float(row[c])) for c in cols + extras]
                       + _paper_columns(row, papers))
    return buf.getvalue()


def _paper_columns(row: dict, cols: list[str]) -> list[str]:
    """The paper's value and ours - paper of each column in ``cols`` ('' where missing)."""
    compared = table1.comparison(row, row.get("paper") or {})
    return [repr(v) if v is not None else "" for c in cols
            for v in (compared.get(c, (None, None)))]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot(path: Path, name: str, entry: dict, columns: list[str]) -> Path:
    """AD and IC at each kept fraction against #FW (log x) for one backbone, as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    keys = [c[3:] for c in columns if c.startswith("AD_")]
    fig = Figure(figsize=(11, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(entry["rows"]))]
    same = {}                       # methods with equal #FW are spread apart a little
    for i, row in enumerate(entry["rows"]):
        same.setdefault(row.get("FW"), []).append(i)
    dodge = {i: 10 ** (0.025 * (k - (len(g) - 1) / 2)) for g in same.values()
             for k, i in enumerate(g)}
    for ax, kind in zip(axes, ("AD", "IC")):
        for i, (row, colour) in enumerate(zip(entry["rows"], colours)):
            fw = row.get("FW")
            if fw is None or not fw > 0:
                continue
            fw = fw * dodge[i]
            ys = [(k, row.get(f"{kind}_{k}")) for k in keys]
            ys = [(k, v) for k, v in ys if v is not None]
            if len(ys) > 1:
                ax.plot([fw] * len(ys), [v for _, v in ys], color=colour, lw=0.8, alpha=0.5)
            for k, v in ys:
                ax.scatter([fw], [v], color=colour, marker=MARKERS[keys.index(k) % len(MARKERS)],
                           s=42, zorder=3, edgecolors="black", linewidths=0.4)
        ax.set_xscale("log")
        ax.set_xlabel("#FW (forward passes per explanation, log scale)")
        ax.set_ylabel(f"{kind} (%), {'lower' if kind == 'AD' else 'higher'} is better")
        ax.set_title(f"{kind} vs #FW")
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=row["method"])
               for row, c in zip(entry["rows"], colours)]
    handles += [Line2D([], [], color="gray", marker=MARKERS[i % len(MARKERS)], ls="",
                       label=f"keep {k}%") for i, k in enumerate(keys)]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title_of(name, entry))
    fig.subplots_adjust(left=0.07, right=0.78, bottom=0.13, top=0.86, wspace=0.28)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(data: dict, out: Path) -> list[Path]:
    """Write table.md, table.csv and one plot per backbone into ``out``; return the paths."""
    out = Path(out)
    paths = [write_text_atomic(out / "table.md", markdown(data)),
             write_text_atomic(out / "table.csv", csv_text(data))]
    paths += [write_text_atomic(out / f"pairwise-{_safe(name)}.csv", pairwise.csv_text(name, e))
              for name, e in data["backbones"].items() if e.get("stats", {}).get("comparisons")]
    try:
        import matplotlib  # noqa: F401  (a dependency of the plots only)
    except ImportError:
        print("warning: matplotlib is not installed: no AD/IC vs #FW plots", file=sys.stderr)
        return paths
    alpha = (data.get("settings") or StatisticsSettings()).alpha
    for name, entry in data["backbones"].items():
        paths.append(plot(out / f"ad_ic_vs_fw-{_safe(name)}.png", name, entry, data["columns"]))
        heat = pairwise.heatmap(out / f"pairwise-{_safe(name)}.png", name, entry, alpha)
        paths += [heat] if heat else []
    return paths


def report(experiment: str | None = None, run_id: str | None = None, out: str | Path | None = None,
           log: bool = True, uri: str | None = None, console=None) -> dict:
    """Build the report (the command's body, callable from Python); returns paths and ids."""
    from harness.terminal import make_console
    console = console or make_console()
    client = _client(uri)
    parent = find_parent(client, experiment, run_id)
    data = collect(client, parent)
    for name, entry in data["backbones"].items():
        console.print(table.rich_table(title_of(name, entry), entry["rows"], data["columns"],
                                       caption(data)))
    out_dir = Path(out) if out else Path("reports") / parent.info.run_id
    paths = write_report(data, out_dir)
    if log:
        for p in paths:
            client.log_artifact(parent.info.run_id, str(p), "report")
    console.print(f"report of run {parent.info.run_id} (experiment '{data['experiment']}'): "
                  + ", ".join(str(p) for p in paths)
                  + (" (logged under report/)" if log else ""))
    return {"parent_run_id": parent.info.run_id, "paths": paths, "data": data}
