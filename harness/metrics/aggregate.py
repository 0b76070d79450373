"""From per-image rows to a Table 1 row: AD and IC at each kept fraction, #FW, counts.

The evaluation writes one row per image (``harness.pipeline.shards``); its columns are

    image_id, class_explained, ground_truth, Y, O_<k> for every kept fraction <k> (percent),
    degenerate, forward_passes (measured), seconds (explanation wall time per image), shard,
    and the localisation energy shares (``harness.metrics.localisation.COLUMNS``)

``aggregate`` computes the run's numbers from them (docs/protocol.md section 2) and refuses
partial or doubled data: a result is reported from exactly the images planned, each once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

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
    return out
