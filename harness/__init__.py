"""Distributed benchmark harness for learned visual explanations (L-CAM) of CNN classifiers.

Kept import-light: ``harness.protocol`` (metrics) and ``harness.registry`` need only
torch; the Ray and MLflow parts are imported only by the commands that use them.
"""
__version__ = "0.1.0"
