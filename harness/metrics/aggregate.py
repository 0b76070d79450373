"""From per-image rows to a Table 1 row: AD and IC at each kept fraction, #FW, counts.

The evaluation writes one row per image (``harness.pipeline.shards``); its columns are

    image_id, class_explained, ground_truth, Y, O_<k> for every kept fraction <k> (percent),
    degenerate, forward_passes (measured), seconds (explanation wall time per image), shard,
    and the localisation energy shares (``harness.metrics.localisation.COLUMNS``); when
    ``evaluation.metrics`` asks for them, ``deletion_auc``, ``insertion_auc`` and their
    forwards ``deletion_forward_passes``, ``insertion_forward_passes``
    (``harness.metrics.causal``)

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
    y = torch.tensor(table.column("Y").to_pylist(), dtype=torch.float64)
    out: dict[str, float] = {}
    for f, col in zip(fractions, columns(fractions)):
        o = torch.tensor(table.column(col).to_pylist(), dtype=torch.float64)
        out[f"AD_{fraction_key(f)}"] = average_drop(y, o)
        out[f"IC_{fraction_key(f)}"] = increase_in_confidence(y, o)
    fw = table.column("forward_passes").to_pylist()
    secs = table.column("seconds").to_pylist()
    out["FW"] = float(nominal_fw)
    out["FW_measured"] = float(sum(fw) / n) if n else math.nan
    out["seconds_per_image"] = float(sum(secs) / n) if n else math.nan
    out["degenerate_maps"] = float(sum(table.column("degenerate").to_pylist()))
    out["images"] = float(n)
    for metric in CAUSAL:              # deletion/insertion, when the rows have them
        if f"{metric}_auc" in table.column_names:
            out[f"{metric}_auc"] = float(np.mean(table.column(f"{metric}_auc").to_numpy()))
            out[f"FW_{metric}"] = float(np.mean(
                table.column(f"{metric}_forward_passes").to_numpy()))
    return out


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
    y = np.asarray(table.column("Y").to_numpy(), dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for f, col in zip(fractions, columns(fractions)):
        o = np.asarray(table.column(col).to_numpy(), dtype=np.float64)
        safe = np.where(y > 0, y, 1.0)
        out[f"AD_{fraction_key(f)}"] = np.where(y > 0, 100.0 * np.maximum(y - o, 0) / safe, 0.0)
        out[f"IC_{fraction_key(f)}"] = 100.0 * (o > y)
    for metric in CAUSAL:
        if f"{metric}_auc" in table.column_names:
            out[f"{metric}_auc"] = np.asarray(table.column(f"{metric}_auc").to_numpy(),
                                              dtype=np.float64)
    for col, metric in LOCALISATION.items():
        if col in table.column_names:
            values = table.column(col).to_pylist()
            out[metric] = np.array([np.nan if v is None else v for v in values], np.float64)
    return out
