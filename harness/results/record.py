"""Recording a run in MLflow: the runs of a plan, each cell's numbers and files, the tables.

- ``open_runs``: the parent run of the spec and one child run per cell (``<backbone> <NN>
  <method>``), with the tags and parameters known before anything is computed; an
  interrupted run of the same spec is resumed, not duplicated (``Tracker``);
- ``record_cell``: a finished cell's numbers (``harness.metrics.aggregate`` over its rows,
  the localisation shares, what its analysis task measured), the bootstrap interval of each
  mean over images as ``<metric>_ci_low``/``<metric>_ci_high``
  (``harness.metrics.statistics``), its provenance, and its files (per-image table,
  overlays, figures, head, resolved spec);
- ``show``: Table 1 per backbone in the terminal (``value ± half-width``; bold only where
  significant, by the paired tests of ``harness.results.pairwise``), the same tables, the
  pairwise matrices and the AD/IC-vs-#FW plots as artifacts of the parent run
  (``harness.results.report``; the statistics settings as its ``statistics.*``
  parameters) and the one-page ``report.html`` (``harness.results.html_report``), the
  experiment's saved "Table 1" view and the link that opens it.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.data.cache import cache_dir
from harness.metrics import localisation, statistics
from harness.metrics.aggregate import aggregate, per_image_terms
from harness.metrics.protocol import fraction_key
from harness.pipeline.evaluation import CellWork
from harness.pipeline.inputs import Inputs
from harness.pipeline.plan import Plan
from harness.results import table
from harness.results.tracking import Tracker, git_commit, package_versions


def common_tags(plan: Plan, extra: dict) -> dict[str, str]:
    return {"git_commit": git_commit(), "protocol_preset": plan.evaluation.preset.name,
            **package_versions(), **{str(k): str(v) for k, v in extra.items()}}


def origin_tags(cell) -> dict[str, str]:
    """Where the cell's method and backbone come from: 'built-in', or the plugin (its
    distribution and version, or the class reference), as ``harness ls`` shows them."""
    import backbones
    import methods
    return {"method_origin": methods.REGISTRY.get(cell.method).origin,
            "backbone_origin": backbones.REGISTRY.get(cell.backbone).origin}


def open_runs(plan: Plan, inputs: Inputs, tracker: Tracker, parent_id: str,
              tags: dict[str, str]) -> dict[str, str]:
    """One child run per cell under ``parent_id``: cell key -> run id."""
    ev, runs = plan.evaluation, {}
    for cell in plan.cells:
        bb = inputs.backbones[cell.backbone]
        runs[cell.key] = tracker.child_run(parent_id, cell.key, cell.run_name, {
            **tags, "backbone": cell.backbone, "method": cell.method,
            "method_id": cell.method_id, "display_name": cell.display_name,
            "variant": cell.variant, "weights_id": bb.weights_id,
            "feature_layer": bb.feature_layer,
            "eval_list_hash": inputs.datasets[cell.backbone].list_hash,
            "dataset": inputs.datasets[cell.backbone].name,
            "eval_pixels_digest": str(inputs.prepared[cell.backbone].pixels),
            **origin_tags(cell)})
        tracker.log(runs[cell.key], params={
            "backbone": cell.backbone, "weights": bb.weights_id, "seed": plan.seed,
            "fractions": list(ev.fractions), "preset": json.dumps(ev.preset.as_dict())})
    return runs


def record_cell(plan: Plan, inputs: Inputs, work: CellWork, tracker: Tracker, run_id: str,
                spec_file: Path) -> dict[str, float]:
    """Log one finished cell (see the module docstring); returns its metrics."""
    import methods
    if work.error:
        tracker.log(run_id, tags={"error": work.error})
        tracker.finish(run_id, ok=False)
        return {}
    cell = work.cell
    rows = work.storage.read_table(work.shard_paths)
    metrics = aggregate(rows, plan.evaluation.fractions, cell.forward_passes,
                        inputs.images(cell.backbone))
    metrics.update(localisation.energy_metrics(rows))
    settings = plan.evaluation.statistics
    terms = per_image_terms(rows, plan.evaluation.fractions)
    metrics.update(statistics.intervals({k: v for k, v in terms.items() if k in metrics},
                                        settings, metrics))
    metrics["skipped_images"] = float(inputs.datasets[cell.backbone].skipped)
    metrics.update(work.analysis.get("metrics", {}))
    head = work.jobs[0].head.local_path() if work.jobs[0].head else None
    explainer = methods.create(cell.method, inputs.backbones[cell.backbone],
                               variant=cell.variant, **cell.params,
                               **({"checkpoint": head} if head else {}))
    info = explainer.describe()
    tracker.log(run_id, metrics=metrics,
                tags={**{k: v for k, v in info.items() if k == "rise_mask_hash"},
                      "nodes": ",".join(work.nodes())},
                params={**{k: v for k, v in info.items() if k != "rise_mask_hash"},
                        **settings.as_params()})
    per_image = work.artifact_path("per_image.parquet")
    work.storage.write_table(per_image, rows)
    names = ["per_image.parquet", *work.analysis.get("files", [])]
    for name in names:
        folder = name.rsplit("/", 1)[0] if "/" in name else None
        tracker.artifact(run_id, work.storage.fetch(work.artifact_path(name), cache_dir()),
                         folder)
    if head:
        tracker.artifact(run_id, Path(head), "head")
    tracker.artifact(run_id, spec_file)
    tracker.finish(run_id)
    return metrics


def show(plan: Plan, inputs: Inputs, metrics: dict[str, dict], tracker: Tracker,
         parent_id: str, out_dir: Path, console) -> None:
    """Table 1 per backbone; tables, plots and the saved view in MLflow; where to look."""
    from harness.results import report
    cols = table.metric_columns([fraction_key(f) for f in plan.evaluation.fractions],
                                tuple(r.key for m in plan.evaluation.measures()
                                      for r in m.reported))
    data = None
    if any(metrics.values()):          # the paired tests need every cell's rows: MLflow's
        tracker.log(parent_id, params=plan.evaluation.statistics.as_params())
        data = report.collect(tracker.client, tracker.client.get_run(parent_id))
    for name in plan.backbones:
        marks = {r["method_id"]: r.get("marks", {})
                 for r in (data["backbones"].get(name, {}).get("rows", []) if data else [])}
        rows = [{"method": c.display_name, **metrics[c.key], "marks": marks.get(c.method_id, {})}
                for c in plan.cells_of(name) if metrics.get(c.key)]
        if not rows:
            continue
        console.print(table.rich_table(f"{name} ({inputs.weights_id(name)}), "
                                       f"{rows[0].get('images', 0):.0f} images of "
                                       f"{inputs.datasets[name].name}", rows, cols,
                                       report.caption(data or {})))
        bad = inputs.datasets[name].bad
        if bad:    # data.on_bad_image: skip
            console.print(f"{len(bad)} image{'s' if len(bad) > 1 else ''} skipped "
                          "(data.on_bad_image: skip): " + "; ".join(r for _, r in bad[:5])
                          + ("; ..." if len(bad) > 5 else ""),
                          markup=False, highlight=False, soft_wrap=True)
    if data:
        paths = report.write_report(data, out_dir)
        for path in paths + html_page(tracker, data, paths, out_dir, console):
            tracker.artifact(parent_id, path, "report")
        tracker.publish_view(cols)
    console.print(f"MLflow: {tracker.uri} (experiment '{plan.experiment}', run {parent_id})")
    console.print(f"MLflow UI: {tracker.ui_link()}")


def html_page(tracker: Tracker, data: dict, paths: list[Path], out_dir: Path,
              console) -> list[Path]:
    """``report.html`` beside the report's files (``harness.results.html_report``); a page
    that cannot be built is a warning, not a failed run."""
    from harness.results import html_report
    try:
        text = html_report.build(tracker.client, data["parent"], data,
                                 html_report.files_of(paths))
        return [html_report.write(out_dir / "report.html", text)]
    except Exception as err:                   # noqa: BLE001 (the numbers are recorded)
        console.print(f"warning: report.html not written: {type(err).__name__}: {err}",
                      markup=False, highlight=False)
        return []
