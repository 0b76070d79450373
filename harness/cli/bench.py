"""``python -m harness bench``: latency, #FW, peak memory and throughput of every method.

The options and the measurement live in ``harness.bench`` (``driver``: options, checks,
table, JSON; ``timing``: the timing machinery; ``cases``: what is measured).
"""
from __future__ import annotations

from harness.bench.driver import add_arguments, main

__all__ = ["add_arguments", "main"]
