"""Distributed benchmark harness for learned visual explanations (L-CAM) of CNN classifiers.

Sub-packages, each with one role (docs/architecture.md walks through them):

- ``harness.cli``: the commands (``python -m harness <command>``), one module each;
- ``harness.spec``: the benchmark spec, its schema declared once, and its checks;
- ``harness.data``: data sets, the generated quickstart set, the embedded backbones' weights,
  the cache;
- ``harness.metrics``: the evaluation protocol (AD, IC), localisation, sanity checks,
  aggregation of per-image rows;
- ``harness.pipeline``: the plan of a run and its stages on Ray (heads, shards, sweeps);
- ``harness.results``: MLflow tracking, tables, reports, figures;
- ``harness.bench``: the performance benchmark.

``harness.errors.UserError`` is the base of every problem reported with exit code 2.
Importing ``harness`` is cheap: Ray and MLflow are imported only by the commands using them.
"""
__version__ = "0.1.0"
