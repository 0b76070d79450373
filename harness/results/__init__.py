"""What a run leaves: MLflow runs (``tracking``, ``record``), tables (``table``, with the
paper's Table 1 beside a preset's: ``table1``), pairwise tests, reports and figures."""
