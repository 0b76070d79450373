"""Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

An explanation that depends on what the classifier learned must change when the learned
parameters are destroyed. The cascading test re-initialises the network's parameterised
layers from the top (logits) down, one more layer per step, and compares the maps of the
randomised model with the original maps of the same images and the same classes:

    step 0:  nothing randomised (a deep copy; must give identical maps: similarity 1)
    step s:  the s top-most parameterised layers re-initialised (cascading)

Layers are taken from the backbone's tail (the head after A, last layer first), then from its
body (the feature extractor, last layer first); ``steps`` bounds how many. Re-initialisation
calls each layer's own ``reset_parameters`` (PyTorch's default init; BatchNorm gets identity
weights and fresh running statistics) under ``torch.manual_seed(seed + step)``, on a deep copy
of the backbone (the original is never touched). The explainer is reused through a shallow
copy whose ``backbone`` is the randomised copy, so its own state (an L-CAM head, RISE masks)
is kept: L-CAM's head g reads only A, so its maps change only once a body layer is reset;
``include_explainer_head=True`` adds a first step that re-initialises the explainer's head.

Similarities, per image, between the original map V and the randomised map V':
- Spearman rank correlation rho = Pearson correlation of the ranks of V and V' (average ranks
  for ties) over all pixels. Identical maps give 1; otherwise, if either map is constant
  (e.g. a degenerate all-zero map) rho := 0.
- SSIM (Wang et al. 2004) on the maps as [0, 1] images: 7x7 uniform windows ("valid"
  positions only), C1 = 0.01^2, C2 = 0.03^2, mean over windows. Identical maps give 1.

``randomisation_test`` returns a ``SanityResult``; ``as_metrics()`` gives MLflow-safe keys
``sanity_spearman_<layer>`` and ``sanity_ssim_<layer>`` (mean over images; ``<layer>`` is the
module name of the layer randomised at that step, e.g. ``tail.6``), plus ``..._none`` for
step 0. Lower similarity after randomisation = the method passes the check.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def _has_own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def parameterised_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with parameters, top first: the tail's (last first), then the body's.

    Falls back to every module of ``backbone`` (last first) when it has no body/tail split.
    """
    parts = [p for p in ("tail", "body") if isinstance(getattr(backbone, p, None), nn.Module)]
    if not parts:
        return [(n, m) for n, m in reversed(list(backbone.named_modules())) if _has_own_params(m)]
    out = []
    for part in parts:
        mods = [(f"{part}.{n}", m) for n, m in getattr(backbone, part).named_modules()
                if n and _has_own_params(m)]
        out += list(reversed(mods))
    return out


def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s own parameters (and BatchNorm statistics) with ``seed``."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                p.normal_(0.0, 0.01)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) of each row of (B, N), float64."""
    b, n = x.shape
    order = x.argsort(dim=1, stable=True)
    sorted_x = x.gather(1, order)
    ranks = torch.empty_like(x, dtype=torch.float64)
    for i in range(b):  # tie groups: average their positions
        uniq, inverse, counts = torch.unique_consecutive(sorted_x[i], return_inverse=True,
                                                         return_counts=True)
        ends = counts.cumsum(0).to(torch.float64)
        mean_pos = ends - (counts.to(torch.float64) + 1) / 2
        ranks[i, order[i]] = mean_pos[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Spearman rank correlation of (B, H, W) maps; see the module doc for ties."""
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    b = b.reshape(b.shape[0], -1).to(torch.float64)
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = torch.where(den > 0, (ra * rb).sum(1) / torch.where(den > 0, den, 1.0),
                      torch.zeros_like(den))
    same = (a == b).all(1)
    return torch.where(same, torch.ones_like(rho), rho.clamp(-1, 1))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image SSIM of (B, H, W) maps in [0, 1] (uniform windows, valid positions)."""
    x = a.to(torch.float64)[:, None]
    y = b.to(torch.float64)[:, None]
    win = min(window, x.shape[-1], x.shape[-2])
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    pool = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    n = win * win
    cov_norm = n / (n - 1) if n > 1 else 1.0           # sample covariance, as scikit-image
    vx = (pool(x * x) - mx * mx) * cov_norm
    vy = (pool(y * y) - my * my) * cov_norm
    cxy = (pool(x * y) - mx * my) * cov_norm
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    out = s.mean(dim=(1, 2, 3))
    same = (a == b).reshape(a.shape[0], -1).all(1)
    return torch.where(same, torch.ones_like(out), out)


@dataclass
class SanityStep:
    """One cascade step: the layer randomised at it and the per-image similarities."""

    step: int
    layer: str                       # 'none' for step 0
    spearman: list[float]
    ssim: list[float]

    @property
    def mean_spearman(self) -> float:
        return float(sum(self.spearman) / len(self.spearman)) if self.spearman else float("nan")

    @property
    def mean_ssim(self) -> float:
        return float(sum(self.ssim) / len(self.ssim)) if self.ssim else float("nan")


@dataclass
class SanityResult:
    """The whole cascade for one method; ``as_metrics()`` for MLflow."""

    method: str
    steps: list[SanityStep] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)     # (B, H, W) per step

    def as_metrics(self, prefix: str = "sanity_") -> dict[str, float]:
        out = {}
        for s in self.steps:
            out[f"{prefix}spearman_{s.layer}"] = s.mean_spearman
            out[f"{prefix}ssim_{s.layer}"] = s.mean_ssim
        return out


def randomisation_test(explainer, images: torch.Tensor, targets: torch.Tensor | None = None,
                       steps: int | None = None, seed: int = 0,
                       include_explainer_head: bool = False,
                       keep_maps: bool = False) -> SanityResult:
    """Run the cascading randomisation test of ``explainer`` on ``images`` (see module doc).

    ``targets``: the classes explained (default: the original model's top-1, kept fixed for
    every step). ``steps``: how many layers to randomise (default: every tail layer plus two
    body layers; 0 = only the identity step). Cost: (steps + 1) explanations of the images.
    """
    bb = explainer.backbone
    images = images.to(bb.device)
    if targets is None:
        with torch.no_grad():
            targets = bb(images).argmax(1)
    targets = torch.as_tensor(targets, device=images.device).long()
    original = explainer.explain(images, targets).cpu()
    copy_bb = copy.deepcopy(bb)
    ex = copy.copy(explainer)
    ex.backbone = copy_bb
    layers = parameterised_layers(copy_bb)
    if steps is None:
        n_tail = sum(1 for name, _ in layers if name.startswith("tail."))
        steps = min(len(layers), n_tail + 2)
    plan: list[tuple[str, nn.Module | None]] = [("none", None)]
    head = getattr(explainer, "head", None)
    if include_explainer_head and isinstance(head, nn.Module):
        ex.head = copy.deepcopy(head)
        plan.append(("explainer_head", ex.head))
    plan += layers[: max(0, int(steps))]
    result = SanityResult(method=getattr(explainer, "name", type(explainer).__name__))
    for k, (name, module) in enumerate(plan):
        if module is not None:
            for sub in module.modules():   # reset_parameters may not cover children
                if _has_own_params(sub) or isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    reinitialise(sub, seed + k)
        maps = ex.explain(images, targets).cpu()
        result.steps.append(SanityStep(k, name, spearman(original, maps).tolist(),
                                       ssim(original, maps).tolist()))
        if keep_maps:
            result.maps.append(maps)
    if keep_maps:
        result.maps.insert(0, original)
    return result


def sanity_metrics(explainer, images: torch.Tensor, targets: torch.Tensor | None = None,
                   steps: int | None = None, seed: int = 0) -> dict[str, float]:
    """``randomisation_test(...).as_metrics()``: {'sanity_spearman_<layer>': ..., ...}."""
    return randomisation_test(explainer, images, targets, steps, seed).as_metrics()


__all__ = ["SanityResult", "SanityStep", "parameterised_layers", "randomisation_test",
           "reinitialise", "sanity_metrics", "spearman", "ssim"]


# -- the registry entry (harness.metrics.registry) --------------------------------------------
from harness.metrics.base import Metric, Reported  # noqa: E402
from harness.metrics.registry import register  # noqa: E402


@register
class SanityCheck(Metric):
    """The cascading randomisation test (module docstring), once per cell in its analysis
    job (``harness.results.analysis.analyse``), not per image: ``sanity_spearman_<layer>``
    and ``sanity_ssim_<layer>``, lower is better (the maps must change when the learned
    parameters are destroyed; ``..._none``, step 0, is 1 by construction)."""

    name = "sanity"
    display_name = "Sanity check"
    paper = "Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018"
    stage = "cell"
    always = True
    reported = (Reported("sanity_spearman_{k}", "lower", "Spearman({k})", table=False,
                         digits=3, k_pattern=r".+"),
                Reported("sanity_ssim_{k}", "lower", "SSIM({k})", table=False, digits=3,
                         k_pattern=r".+"))

    def identity(self) -> dict:
        return {}
