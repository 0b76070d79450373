"""The method registry (one instance of ``backbones.registry.Registry``) and its decorator.

Built-in methods register with ``register``; plugins (entry points of the group
``lcam_bench.methods``, or a class reference ``package.module:Class``) are resolved by the
same registry on first use and checked by ``methods.plugins.adopt_method``; ``pgc:<Class>``
names a pytorch-grad-cam method (``methods.ecosystem``).
"""
from backbones.registry import Registry

PLUGIN_GROUP = "lcam_bench.methods"


def _adopt(name, cls, source):
    from .plugins import adopt_method
    return adopt_method(name, cls, source)


REGISTRY = Registry("method", plugin_group=PLUGIN_GROUP, adopt=_adopt)


def register(cls):
    """Register a built-in ``Explainer`` subclass under ``cls.name``.

    The registry's metadata (display name, family, paper) is read from the class attributes,
    so each is written once, on the class. Plugins do not call this: their entry point (or a
    class reference in a spec) is what makes them known.
    """
    REGISTRY.register(cls.name, display_name=cls.display_name, family=cls.family,
                      paper=cls.paper)(cls)
    return cls


def _pgc(name: str, rest: str):
    """``pgc:<Class>``: a pytorch-grad-cam method (``methods.ecosystem``)."""
    from backbones.plugins import PluginError
    from backbones.registry import Entry

    from .base import ExplainerInputError
    from .ecosystem import pgc_method
    try:
        cls = pgc_method(rest)
    except ExplainerInputError as err:
        raise PluginError(str(err)) from None
    return Entry(name, cls, {"display_name": cls.display_name, "family": cls.family,
                             "paper": cls.paper}, origin="pytorch-grad-cam")


REGISTRY.add_prefix("pgc", _pgc)
