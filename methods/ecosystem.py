"""The ecosystem's methods as harness methods: ``pgc:<Class>`` runs a pytorch-grad-cam CAM.

A spec names ``pgc:LayerCAM``, ``pgc:HiResCAM``, ``pgc:EigenCAM``, ... (any CAM class of
``pytorch_grad_cam`` listed in ``PGC_METHODS``; ``pip install lcam-bench[pgc]``). The method
registry (``backbones.registry.Registry.add_prefix``) resolves the name to an ``Explainer``
subclass made here for that class (its id ``pgc_<class>``, lower case), so it is planned,
sharded, scored and recorded like a built-in method. What the harness adds around the
library's code, never inside it:

- **the model it is given**: the backbone's body (up to A, the harness's feature layer), then
  a pass-through module that makes A a leaf requiring grad (the library's gradient is
  d S_c / dA through the head only, as the built-in Grad-CAM takes it: the frozen body is not
  back-propagated), then the head; the CAM's target layer is that pass-through module, so
  every method explains the same A as the built-in ones. The model takes normalised images
  (the backbone's own normalisation, applied here);
- **the target**: ``ClassifierOutputTarget(c)`` for each image's class (default: the
  backbone's top-1 on the clean image, which the library computes the same way);
  class-agnostic methods (``CLASS_AGNOSTIC``: Eigen-CAM and its kin ignore the target by
  definition) declare ``class_agnostic = True`` and the conformance kit does not ask them to
  depend on it;
- **#FW measured**, not declared: a forward pre-hook on the backbone's first layer counts the
  images that enter it during the library's call, per explained image; as for the built-in
  methods (docs/protocol.md 2.4) the clean pass is the #FW of a one-pass method and is not
  counted beside a masking method's masked forwards. ``forward_passes`` is the nominal count
  of ``PGC_METHODS`` (K = A's channels for Score-CAM, 1 for the one-pass methods);
- **the map**: the library's (B, H, W) map at input size (its own min-max and resize), then
  the harness's min-max (docs/protocol.md section 2.3: a constant map is degenerate and
  becomes zeros).

The library itself is the reference for what each method computes (its papers are named on
each class); nothing of its code is copied here.
"""
from __future__ import annotations

import contextlib
import importlib
import io
from typing import Any

import torch
from torch import nn

from .base import Explainer, ExplainerInputError, minmax

#: pytorch-grad-cam class -> (family, nominal #FW rule, paper). Rules (docs/protocol.md 2.4:
#: a one-pass method's #FW is its single pass; a masking method's, its masked forwards beside
#: the clean one): "one"; "channels": K; "channels+1": K + 1 (pytorch-grad-cam 1.5.7's
#: Ablation-CAM runs the unablated batch once more beside the K ablations, as counted)
PGC_METHODS: dict[str, tuple[str, str, str]] = {
    "GradCAM": ("gradient", "one", "Selvaraju et al., Grad-CAM, ICCV 2017"),
    "HiResCAM": ("gradient", "one", "Draelos & Carin, HiResCAM, arXiv 2011.08891"),
    "GradCAMPlusPlus": ("gradient", "one", "Chattopadhay et al., Grad-CAM++, WACV 2018"),
    "XGradCAM": ("gradient", "one", "Fu et al., XGrad-CAM, BMVC 2020"),
    "LayerCAM": ("gradient", "one", "Jiang et al., LayerCAM, IEEE TIP 2021"),
    "GradCAMElementWise": ("gradient", "one", "pytorch-grad-cam's element-wise Grad-CAM"),
    "EigenGradCAM": ("gradient", "one", "pytorch-grad-cam's Eigen-Grad-CAM"),
    "EigenCAM": ("perturbation", "one", "Muhammad & Yeasin, Eigen-CAM, IJCNN 2020"),
    "KPCA_CAM": ("perturbation", "one", "Karmani et al., KPCA-CAM, arXiv 2410.00267"),
    "ScoreCAM": ("perturbation", "channels", "Wang et al., Score-CAM, CVPR-W 2020"),
    "AblationCAM": ("perturbation", "channels+1", "Desai & Ramaswamy, Ablation-CAM, WACV 2020"),
}
#: methods that ignore the explained class by definition (principal components of A)
CLASS_AGNOSTIC = frozenset({"EigenCAM", "KPCA_CAM"})
PREFIX = "pgc"


class _Leaf(nn.Module):
    """A as a leaf that requires grad: the CAM's gradients stop here (head only)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.detach().requires_grad_(True)


class _Whole(nn.Module):
    """body -> leaf -> head on normalised images: the model the library is given."""

    def __init__(self, backbone):
        super().__init__()
        self.body, self.leaf, self.tail = backbone.body, _Leaf(), backbone.tail

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return self.tail(self.leaf(self.body(z)))


class _Count:
    """Images entering the backbone's first layer while open (every forward pass)."""

    def __init__(self, backbone):
        self.n, self.layer = 0, backbone.first_layer

    def __enter__(self) -> "_Count":
        self.handle = self.layer.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, inputs) -> None:
        self.n += int(inputs[0].shape[0])

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class PgcMethod(Explainer):
    """A pytorch-grad-cam CAM class run as a harness method (module docstring).
    Subclassed once per class by ``pgc_method``; ``pgc_class`` names it."""

    pgc_class = ""
    count_rule = "one"
    class_agnostic = False
    normalise_at = "input"
    variants = ("library",)

    @classmethod
    def planned_forward_passes(cls, params: dict[str, Any], backbone: dict[str, Any]) -> int:
        k = int(backbone["feature_shape"][0])
        return {"one": 1, "channels": k, "channels+1": k + 1}[cls.count_rule]

    def setup(self) -> None:
        library = importlib.import_module("pytorch_grad_cam")
        self._targets = importlib.import_module("pytorch_grad_cam.utils.model_targets")
        self._model = _Whole(self.backbone)
        self._cam = getattr(library, self.pgc_class)(model=self._model,
                                                     target_layers=[self._model.leaf])

    def _saliency(self, images, feats, logits, targets):       # explain() does it all
        raise NotImplementedError

    def explain(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Saliency (B, H, W) in [0, 1] for ``targets`` (default: each image's top-1)."""
        images, targets = self.check_inputs(images, targets)
        images = images.to(self.backbone.device)
        z = self.backbone.normalize(images)
        chosen = None
        if targets is not None:
            chosen = [self._targets.ClassifierOutputTarget(int(c)) for c in targets]
        with torch.enable_grad(), _Count(self.backbone) as count, \
                contextlib.redirect_stderr(io.StringIO()):
            raw = self._cam(input_tensor=z, targets=chosen)          # (its tqdm bars muted)
        self.last_logits = self._cam.outputs.detach()
        per_image = count.n / max(len(images), 1)
        self.last_forward_passes = per_image if self.count_rule == "one" else per_image - 1
        maps, degenerate = minmax(torch.as_tensor(raw, dtype=torch.float32,
                                                  device=images.device))
        self.last_degenerate = degenerate.cpu()
        return maps.clamp_(0, 1)


def pgc_method(class_name: str) -> type[PgcMethod]:
    """The ``Explainer`` subclass for pytorch-grad-cam's ``class_name`` (``pgc:<class_name>``);
    ``ExplainerInputError`` naming the choices when it is not one, or the install when the
    library is missing."""
    if class_name not in PGC_METHODS:
        from backbones.registry import did_you_mean
        raise ExplainerInputError(
            f"{PREFIX}:{class_name} is not a pytorch-grad-cam method the harness runs."
            f"{did_you_mean(class_name, sorted(PGC_METHODS))} Available: "
            + ", ".join(f"{PREFIX}:{n}" for n in PGC_METHODS))
    try:
        library = importlib.import_module("pytorch_grad_cam")
    except ImportError:
        raise ExplainerInputError(f"{PREFIX}:{class_name} needs pytorch-grad-cam: pip install "
                                  "'lcam-bench[pgc]' (or grad-cam==1.5.7)") from None
    family, rule, paper = PGC_METHODS[class_name]
    version = getattr(library, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            version = dist_version("grad-cam")
        except PackageNotFoundError:
            version = "unknown"
    attrs = {"name": f"{PREFIX}_{class_name.lower()}", "pgc_class": class_name,
             "display_name": f"{class_name} (pgc)", "family": family, "count_rule": rule,
             "paper": f"{paper}; run by pytorch-grad-cam {version}",
             "class_agnostic": class_name in CLASS_AGNOSTIC, "params": {},
             "library": f"grad-cam {version}",       # part of its cells' identity
             "__doc__": f"pytorch-grad-cam's {class_name} as a harness method "
                        "(methods.ecosystem)."}
    return type(f"Pgc{class_name}", (PgcMethod,), attrs)
