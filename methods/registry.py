"""The method registry (one instance of ``harness.registry.Registry``)."""
from harness.registry import Registry

REGISTRY = Registry("method")
