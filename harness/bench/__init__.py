"""The performance benchmarks: cost per explanation against the #FW floor (``driver``,
``timing``, ``cases``), the pipeline and memory benchmark (``pipeline``) and the GPU check
(``gpu_check``)."""
