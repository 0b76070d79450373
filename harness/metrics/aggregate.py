"""From per-image rows to a Table 1 row: AD and IC at each kept fraction, #FW, counts.

The evaluation writes one row per image (``harness.pipeline.shards``); its columns are

    image_id, class_explained, ground_truth, Y, O_<k> for every kept fraction <k> (percent),
    degenerate, forward_passes (measured), seconds (explanation wall time per image), shard,
    and the localisation energy shares (``harness.metrics.localisation.COLUMNS``); then the
    columns each metric ``evaluation.metrics`` lists declares (``Metric.columns``,
    ``harness.metrics.registry``), e.g. ``deletion_auc`` and ``deletion_forward_passes``
    (``harness.metrics.causal``), ``road_morf``, ``road_lerf`` (``harness.metrics.road``)

``aggregate`` computes the run's numbers from them (docs/protocol.md section 2) and refuses
partial or doubled data: a result is reported from exactly the images planned, each once.
``per_image_terms`` gives the per-image terms whose means these numbers are (the AD term
``100 max(0, Y - O) / Y``, the IC indicator ``100 [O > Y]``, the AUCs, the localisation
shares), for the intervals and tests of ``harness.metrics.statistics``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from harness.metrics.protocol import average_drop, fraction_key, increase_in_confidence


def columns(fractions: Sequence[float]) -> list[str]:
    """The masked-score columns ``O_<k>`` of the kept fractions."""
    return [f"O_{fraction_key(f)}" for f in fractions]


def read_rows(paths: Sequence[str | Path]) -> pa.Table:
    """The rows of shard files, concatenated in shard order."""
    tables = [pq.read_table(p) for p in sorted(map(str, paths))]
    return pa.concat_tables(tables) if tables else pa.table({})


def aggregate(table: pa.Table, fractions: Sequence[float], nominal_fw: int,
              expected_rows: int) -> dict[str, float]:
    """AD/IC at each fraction, FW (nominal), FW_measured, seconds_per_image, counts."""
    n = table.num_rows
    if n == 0:
        raise RuntimeError("no evaluation rows: nothing to report (were all images skipped?)")
    if n != expected_rows:
        raise RuntimeError(f"evaluation has {n} rows, expected {expected_rows}: refusing to "
                           "report numbers from partial or doubled data")
    ids = table.column("image_id").to_pylist()
    if len(set(ids)) != n:
        raise RuntimeError("evaluation rows contain duplicated image ids")
    out: dict[str, float] = dict(_ad_ic(fractions).aggregate(table))
    fw = table.column("forward_passes").to_pylist()
    secs = table.column("seconds").to_pylist()
    out["FW"] = float(nominal_fw)
    out["FW_measured"] = float(sum(fw) / n) if n else math.nan
    out["seconds_per_image"] = float(sum(secs) / n) if n else math.nan
    out["degenerate_maps"] = float(sum(table.column("degenerate").to_pylist()))
    out["images"] = float(n)
    for metric in listed(table):       # deletion, insertion, road, ...: when the rows have them
        out.update(metric.aggregate(table))
    return out


def _ad_ic(fractions):
    from harness.metrics import registry
    return registry.create("ad_ic", {"fractions": tuple(fractions)})


def listed(table) -> list:
    """The metrics a spec may list (not the ``always`` ones) whose columns ``table`` has,
    with their default settings, in registry order."""
    from harness.metrics import registry
    have = set(table.column_names)
    return [m for m in (cls() for cls in registry.classes() if not cls.always
                        and cls.stage == "image") if set(m.columns()) <= have]


CAUSAL = ("deletion", "insertion")
#: per-image localisation columns -> the metric their mean is logged as
#: (``harness.metrics.localisation.energy_metrics``)
LOCALISATION = {"energy_box": "localisation_energy", "energy_mask": "localisation_energy_mask",
                "energy_cue": "localisation_cue_energy",
                "energy_cue_object": "localisation_cue_object_energy"}


def per_image_terms(table: pa.Table, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Metric -> its per-image terms (float64, NaN where not defined), in row order:
    ``AD_<k>`` (100 max(0, Y - O) / Y, 0 where Y <= 0), ``IC_<k>`` (100 [O > Y]), the
    causal AUCs and the localisation shares present in ``table``. Each metric of
    ``aggregate`` / ``energy_metrics`` is the mean (NaNs left out) of its terms."""
    out: dict[str, np.ndarray] = dict(_ad_ic(fractions).terms(table))
    for metric in listed(table):
        out.update(metric.terms(table))
    for col, metric in LOCALISATION.items():
        if col in table.column_names:
            values = table.column(col).to_pylist()
            out[metric] = np.array([np.nan if v is None else v for v in values], np.float64)
    return out
