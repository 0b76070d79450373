"""The paired significance tests of a benchmark, recomputed from MLflow alone.

For each backbone of a benchmark (``harness.results.report.collect``), the method runs'
``per_image.parquet`` artifacts (one row per image, ``harness.metrics.aggregate``) are
downloaded, turned into per-image terms (``aggregate.per_image_terms``: AD terms, IC
indicators, deletion/insertion AUCs), aligned on ``image_id`` and compared pairwise for every
mean-valued column of the table with ``harness.metrics.statistics.compare`` (sign-flip
tests, Holm-corrected over the pairs of one backbone and column). The settings are the
parent run's ``statistics.*`` parameters (``StatisticsSettings.from_params``; defaults for
runs recorded before they were logged), so the report reproduces what the run showed.

What it gives the report:

- ``row["marks"] = {column: 1 | 2}`` (best, second: ``harness.results.table``);
- ``pairwise-<backbone>.csv``: one line per backbone, column and pair of methods (means,
  difference, raw and Holm-adjusted p, significant, which is better, images);
- ``pairwise-<backbone>.png``: one heat-map per column, cell (row method, column method) =
  -log10 of the Holm-adjusted p, signed + where the row method is better (blue) and -
  where it is worse (red); significant cells are starred. Matplotlib's Agg canvas, no pyplot
  state, written atomically;
- the images needed for the target half-width (``statistics.sample_sizes``), as a sentence.

A column is tested only when every row that has a value for it also has its per-image rows
(otherwise "best" cannot be established and nothing is marked).
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from harness.data.cache import atomic_write
from harness.metrics.statistics import Comparison, StatisticsSettings, compare, sample_sizes
from harness.results import table

CSV_FIELDS = ("backbone", "metric", "method_a", "method_b", "run_a", "run_b", "images",
              "mean_a", "mean_b", "diff", "p", "p_holm", "significant", "better")


def _fractions(cols: list[str]) -> list[float]:
    return [float(c[3:]) / 100 for c in cols if c.startswith("AD_")]


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per download unless told not to (read at call time)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _download_terms(client, run_id: str, fractions: list[float], folder: Path) -> dict | None:
    """{'ids': image ids, metric: terms} of one run, or None without per-image rows."""
    import pyarrow.parquet as pq
    from mlflow.exceptions import MlflowException
    from harness.metrics.aggregate import per_image_terms
    try:
        local = client.download_artifacts(run_id, "per_image.parquet", str(folder))
        rows = pq.read_table(local)
        terms = per_image_terms(rows, fractions)
    except (MlflowException, OSError, KeyError, ValueError):
        return None
    return {"ids": [str(i) for i in rows.column("image_id").to_pylist()], **terms}


def _aligned(found: dict[str, dict], metric: str) -> dict[str, np.ndarray]:
    """run id -> the metric's terms on the images every run has, in one order."""
    common = sorted(set.intersection(*(set(f["ids"]) for f in found.values())))
    out = {}
    for run_id, f in found.items():
        where = {image: i for i, image in enumerate(f["ids"])}
        out[run_id] = f[metric][[where[image] for image in common]]
    return out


def backbone_statistics(client, rows: list[dict], cols: list[str],
                        settings: StatisticsSettings) -> dict:
    """Test one backbone's rows (see the module docstring); sets ``row['marks']``.

    Returns {'comparisons': {column: Comparison}, 'sizes': {column: {...}}}."""
    fractions = _fractions(cols)
    with tempfile.TemporaryDirectory(prefix="harness-pairwise-") as tmp, _no_progress_bars():
        found = {}
        for row in rows:
            folder = Path(tmp) / row["run_id"]
            folder.mkdir()
            terms = _download_terms(client, row["run_id"], fractions, folder)
            if terms is not None:
                found[row["run_id"]] = terms
    out: dict = {"comparisons": {}, "sizes": {}}
    for row in rows:
        row["marks"] = {}
    for col in cols:
        if col == "FW":
            continue
        present = [r for r in rows if r.get(col) is not None]
        if len(present) < 2 or any(r["run_id"] not in found or col not in found[r["run_id"]]
                                   for r in present):
            continue
        terms = _aligned({r["run_id"]: found[r["run_id"]] for r in present}, col)
        comparison = compare(col, terms, table.lower_is_better(col), settings)
        out["comparisons"][col] = comparison
        for r in present:
            rank = comparison.marks().get(r["run_id"])
            if rank:
                r["marks"][col] = rank
    by_metric = {c: {r["run_id"]: found[r["run_id"]][c] for r in rows
                     if r["run_id"] in found and c in found[r["run_id"]]}
                 for c in cols if c.startswith(("AD_", "IC_"))}
    out["sizes"] = sample_sizes(by_metric, settings)
    return out


def csv_text(name: str, entry: dict) -> str:
    """The pairwise lines of one backbone (``CSV_FIELDS``; p values as ``repr(float)``)."""
    labels = {r["run_id"]: r["method"] for r in entry["rows"]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for col, comparison in entry.get("stats", {}).get("comparisons", {}).items():
        for p in comparison.pairs:
            w.writerow([name, col, labels[p["a"]], labels[p["b"]], p["a"], p["b"],
                        comparison.n, repr(p["mean_a"]), repr(p["mean_b"]), repr(p["diff"]),
                        repr(p["p"]), repr(p["p_holm"]), p["significant"],
                        labels.get(p["better"], "")])
    return buf.getvalue()


def _matrix(comparison: Comparison) -> np.ndarray:
    """Signed -log10(Holm p): + where the row method is better than the column method."""
    k = len(comparison.methods)
    index = {m: i for i, m in enumerate(comparison.methods)}
    out = np.full((k, k), np.nan)
    for p in comparison.pairs:
        i, j = index[p["a"]], index[p["b"]]
        strength = -math.log10(max(p["p_holm"], 1e-12))
        sign = 1.0 if p["better"] == p["a"] else -1.0 if p["better"] == p["b"] else 0.0
        out[i, j], out[j, i] = sign * strength, -sign * strength
    return out


def heatmap(path: Path, name: str, entry: dict, alpha: float) -> Path | None:
    """One panel per tested column (module docstring); None when nothing was tested."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    comparisons = entry.get("stats", {}).get("comparisons", {})
    if not comparisons:
        return None
    labels = {r["run_id"]: r["method"] for r in entry["rows"]}
    cols = min(3, len(comparisons))
    rows = -(-len(comparisons) // cols)
    k = max(len(c.methods) for c in comparisons.values())
    fig = Figure(figsize=(cols * (2.2 + 0.45 * k) + 1.2, rows * (2.0 + 0.45 * k) + 0.6),
                 dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    limit = -math.log10(alpha) * 2
    image = None
    for ax, (col, comparison) in zip(axes, comparisons.items()):
        m = _matrix(comparison)
        image = ax.imshow(m, cmap="RdBu", vmin=-limit, vmax=limit)
        names = [labels[x] for x in comparison.methods]
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"{table.header(col)}, {comparison.n} images", fontsize=9)
        for p in comparison.pairs:
            if p["significant"]:
                i, j = comparison.methods.index(p["a"]), comparison.methods.index(p["b"])
                for y, x in ((i, j), (j, i)):
                    ax.text(x, y, "*", ha="center", va="center", fontsize=12,
                            color="white" if abs(m[y, x]) > limit / 2 else "black")
    for ax in axes[len(comparisons):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(comparisons)]), shrink=0.8,
                 label="±log10(Holm p): + row better, - row worse")
    fig.suptitle(f"{name}: paired sign-flip tests, * = Holm-adjusted p < {alpha:g}")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def sample_size_text(entry: dict, settings: StatisticsSettings) -> str:
    """'Images needed for ±h ...' for one backbone, or '' without per-image rows."""
    sizes = entry.get("stats", {}).get("sizes", {})
    if not sizes:
        return ""
    labels = {r["run_id"]: r["method"] for r in entry["rows"]}
    parts = [f"{table.header(col)} {s['images']:,} (sd {s['sd']:.1f}, {labels[s['method']]})"
             for col, s in sizes.items()]
    return (f"Images needed for a {settings.confidence:.0%} interval of ±{settings.half_width:g} "
            "point(s), n = (z·sd/h)², from the largest per-image sd of the rows: "
            + "; ".join(parts) + ".\n")
