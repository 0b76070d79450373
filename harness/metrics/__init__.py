"""The evaluation's measures: AD/IC (``protocol``), localisation, sanity checks, deletion and
insertion (``causal``), bootstrap intervals and paired tests (``statistics``), and the
aggregation of per-image rows (``aggregate``)."""
