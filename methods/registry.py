"""The method registry (one instance of ``backbones.registry.Registry``) and its decorator."""
from backbones.registry import Registry

REGISTRY = Registry("method")


def register(cls):
    """Register an ``Explainer`` subclass under ``cls.name``.

    The registry's metadata (display name, family, paper) is read from the class attributes,
    so each is written once, on the class.
    """
    REGISTRY.register(cls.name, display_name=cls.display_name, family=cls.family,
                      paper=cls.paper)(cls)
    return cls
