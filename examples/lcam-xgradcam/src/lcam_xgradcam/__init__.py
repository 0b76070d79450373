"""lcam-xgradcam: an example plugin for lcam-bench (docs/plugins.md).

- ``XGradCAM`` (``xgradcam.py``): a method, entry point ``xgradcam`` of ``lcam_bench.methods``;
- ``resnet18_layer3`` (``backbones.py``): a backbone, entry point of ``lcam_bench.backbones``.

Importing this package registers nothing: lcam-bench finds both through the entry points
declared in ``pyproject.toml``.
"""
from lcam_xgradcam.backbones import resnet18_layer3
from lcam_xgradcam.xgradcam import XGradCAM

__all__ = ["XGradCAM", "resnet18_layer3"]
