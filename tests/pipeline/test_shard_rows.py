"""A shard's rows record what was measured, and its results are reported only whole.

- ``forward_passes`` in each row is the count the explainer *measured* for that batch
  (``last_forward_passes``), not the method's nominal #FW (``Cell.forward_passes``): a method
  that saves passes (Score-CAM's skipped constant channels) must show it (issue 25: a shard
  writing the nominal count was caught by no test).
- ``aggregate`` refuses rows that are partial, doubled or duplicated (issue 25: the refusal
  could be removed unnoticed), and otherwise gives the paper's AD/IC of those rows.
"""
from __future__ import annotations

from unittest import mock

import pyarrow as pa
import pytest
import torch

from harness.data.prepared import prepare, ref_of
from harness.metrics import aggregate as agg
from harness.metrics.protocol import PAPER, PAPER_FRACTIONS
from harness.pipeline import shards
from harness.pipeline.plan import Cell, EvaluationPlan, ImageSet

from tests.data.test_prepared import folder


class SavingGradCAM:
    """Grad-CAM whose measured passes differ per call (0.25, 0.5, ...), as a method that
    saves passes on some images would report them."""

    def __init__(self, inner):
        self.inner, self.calls, self.config = inner, 0, inner.config

    def explain(self, images, targets=None):
        out = self.inner.explain(images, targets)
        self.calls += 1
        self.last_forward_passes = 0.25 * self.calls
        self.last_degenerate, self.last_logits = self.inner.last_degenerate, self.inner.last_logits
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_rows_hold_the_measured_forward_passes_not_the_nominal(tmp_path, tiny_backbone,
                                                              monkeypatch):
    import methods
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    images = ImageSet("imagenet", "val", (16, 16), root=str(folder(tmp_path)))
    prepared = prepare(images, images.build(), tmp_path / "cache")
    ev = EvaluationPlan(fractions=PAPER_FRACTIONS, preset=PAPER, batch_size=2, overlays=0,
                        autocast=False, channels_last=False, images_per_task=6,
                        cpus_per_task=1, gpus_per_task=0, max_retries=0)
    cell = Cell(backbone="tiny", weights=None, method="gradcam", method_id="gradcam",
                display_name="Grad-CAM", variant="paper", params={}, row=1, family="gradient",
                forward_passes=7)                                   # nominal: 7
    explainer = SavingGradCAM(methods.create("gradcam", tiny_backbone))
    with mock.patch.object(shards, "_prepare",
                           lambda job: (torch.device("cpu"), tiny_backbone, explainer)):
        result = shards.run_shard(shards.ShardJob(
            cell=cell, images=images, prepared=ref_of(prepared, ship=False),
            weights_id=tiny_backbone.weights_id, evaluation=ev, head=None, seed=0, shard=0,
            indices=tuple(range(6))))
    fw = result["rows"].column("forward_passes").to_pylist()
    assert fw == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75]                 # 3 batches of 2 images


def rows(ids, y, o):
    return pa.table({"image_id": ids, "Y": y, **{c: o for c in agg.columns(PAPER_FRACTIONS)},
                     "forward_passes": [1.0] * len(ids), "seconds": [0.1] * len(ids),
                     "degenerate": [False] * len(ids)})


def test_aggregate_gives_the_papers_ad_and_ic_of_the_rows():
    table = rows(["a", "b"], [0.8, 0.5], [0.4, 0.6])
    out = agg.aggregate(table, PAPER_FRACTIONS, nominal_fw=1, expected_rows=2)
    # AD = 100 * mean(max(0, Y - O) / Y) = 100 * (0.5 + 0) / 2; IC = 100 * mean(O > Y)
    assert out["AD_100"] == pytest.approx(25.0) and out["IC_100"] == pytest.approx(50.0)


@pytest.mark.parametrize("ids, expected, message", [
    (["a", "b"], 3, "partial or doubled"),                 # a shard missing
    (["a", "b", "a", "b"], 2, "partial or doubled"),       # a shard written twice
    (["a", "a"], 2, "duplicated image ids"),               # the same image in two shards
])
def test_aggregate_refuses_partial_doubled_or_duplicated_rows(ids, expected, message):
    table = rows(ids, [0.5] * len(ids), [0.4] * len(ids))
    with pytest.raises(RuntimeError, match=message):
        agg.aggregate(table, PAPER_FRACTIONS, nominal_fw=1, expected_rows=expected)
