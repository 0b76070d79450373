"""The conformance kit: the contract every method and backbone of the benchmark fulfils.

For plugin authors (docs/plugins.md) and for our own tests, which run it on the six built-in
methods and every registered backbone::

    from harness.testing import check_backbone, check_explainer
    check_explainer(MyExplainer)                        # on the kit's tiny CNN
    check_explainer(MyExplainer, backbone=backbones.load("resnet18", weights=None), size=64)
    check_backbone(my_factory)                          # or a registry name: "resnet18"

Each runs every check, then raises ``ConformanceError`` listing each failed one with what
was found (or returns a dict of what it measured).

``check_explainer(cls)``: the class's declarations (``methods.plugins``); bad input refused
with ``ExplainerInputError`` and a message naming ``images:`` or ``targets:``; maps of shape
(B, H, W), float32, finite, in [0, 1], no autograd graph; two instances created with the
same seed give the same maps; the declared #FW (``forward_passes`` =
``planned_forward_passes``) equals the rows reaching the backbone's first layer per image
(docs/protocol.md 2.4: a one-pass method's single pass; otherwise the clean pass plus
``last_forward_passes`` <= #FW, less only by an exact saving); targets honoured (the maps of
two classes differ, unless the class declares ``class_agnostic``, and a batch with mixed
targets equals one call per image); batch
independence (image a explained with b equals a alone); nothing left on the backbone (hooks,
``requires_grad``, gradients, training mode).

``check_backbone(factory)``: ``factory(weights=None)`` (random init) returns a
``SplitBackbone``; frozen (no parameter requires grad) and in eval mode, also after
``.train()``; normalisation inside (``normalize`` = (x - mean) / std, mean and std for [0, 1]
pixels); ``features(x)`` = A of shape (B, K, P, Q) (the declared ``feature_shape`` at the
input size); ``head(A) == forward(x)`` and ``forward_normalized(normalize(x))``; the head
differentiable in A and leaving A unchanged (Grad-CAM's gradient is taken through it);
``first_layer`` sees every image once per forward and none in the head; batch independence;
no hooks left.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import SplitBackbone

ATOL = 1e-5
HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs")


class ConformanceError(AssertionError):
    """Failed contract checks, one line each (``failed``: [(check, what was found)])."""

    def __init__(self, subject: str, failed: list[tuple[str, str]]):
        self.failed = failed
        lines = "\n".join(f"  {name}: {why}" for name, why in failed)
        super().__init__(f"{subject}: {len(failed)} contract check(s) failed\n{lines}")


class _Checks:
    """Runs named checks (each returns None or what is wrong), collecting the failures."""

    def __init__(self, subject: str):
        self.subject, self.failed, self.passed = subject, [], []

    def run(self, name: str, check: Callable[[], str | None]) -> None:
        try:
            problem = check()
        except Exception as err:       # a check that crashes is a failed check, named
            problem = f"raised {type(err).__name__}: {err}"
        (self.failed.append((name, problem)) if problem else self.passed.append(name))

    def finish(self, measured: dict) -> dict:
        if self.failed:
            raise ConformanceError(self.subject, self.failed)
        return {"passed": list(self.passed), **measured}


# -- shared helpers ----------------------------------------------------------------------------
def sample_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random images in [0, 1]: a coarse noise field upsampled, plus fine noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(h // 8, 2), max(w // 8, 2), generator=gen)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(b, 3, h, w, generator=gen)).clamp(0, 1)


def tiny_backbone(seed: int = 0, channels: int = 6, classes: int = 5) -> SplitBackbone:
    """A small frozen CNN for method checks: 16x16 input -> A (B, channels, 4, 4) -> global
    average pool -> linear (``classes``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, channels, 3, stride=2, padding=1), nn.ReLU())
        fc = nn.Linear(channels, classes)
        with torch.no_grad():
            fc.weight.mul_(4.0)                               # logits with some spread
        tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)
    return SplitBackbone(name="kit_tiny", body=body, tail=tail, feature_layer="body.3",
                         feature_channels=channels, num_classes=classes,
                         weights_id="random-init", input_size=(16, 16))


def leftover_hooks(module: nn.Module) -> dict[str, int]:
    """Every hook registered on ``module``, its submodules and parameters, or globally."""
    found = {}
    for name, m in module.named_modules():
        for attr in HOOK_ATTRS:
            if getattr(m, attr, None):
                found[f"{name or '<root>'}.{attr}"] = len(getattr(m, attr))
        for pname, p in m.named_parameters(recurse=False):
            if getattr(p, "_backward_hooks", None):
                found[f"{name}.{pname}._backward_hooks"] = len(p._backward_hooks)
    from torch.nn.modules import module as mod
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks"):
        if getattr(mod, attr, None):
            found[f"torch.nn.modules.module.{attr}"] = len(getattr(mod, attr))
    return found


class RowCounter:
    """Counts the image rows reaching ``module`` (a forward hook, removed on exit)."""

    def __init__(self, module: nn.Module):
        self.module, self.rows = module, 0

    def _hook(self, module, inputs, output) -> None:
        self.rows += int(inputs[0].shape[0])

    def __enter__(self) -> "RowCounter":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _hygiene(bb: nn.Module, hooks_before: dict) -> str | None:
    """What a method or check left on the backbone (None: nothing)."""
    problems = []
    hooks = {k: v for k, v in leftover_hooks(bb).items() if hooks_before.get(k) != v}
    if hooks:
        problems.append(f"hooks left: {hooks}")
    grads = [n for n, p in bb.named_parameters() if p.requires_grad or p.grad is not None]
    if grads:
        problems.append(f"parameters with requires_grad or .grad: {grads[:5]}")
    training = [n or "<root>" for n, m in bb.named_modules() if m.training]
    if training:
        problems.append(f"modules in training mode: {training[:5]}")
    return "; ".join(problems) or None


def _differs(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> str | None:
    """None when ``a`` equals ``b`` within ``atol`` times max(1, max |b|), else how not."""
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    if not a.numel():
        return None
    tol = atol * max(1.0, float(b.abs().max()))
    diff = float((a - b).abs().max())
    return f"max abs difference {diff:.3g} > {tol:.3g}" if diff > tol else None


# -- methods -----------------------------------------------------------------------------------
def _resolve_method(cls: Any) -> type:
    if isinstance(cls, str):
        import methods
        return methods.method_class(cls)
    return cls


def _input_problems(ex, x: torch.Tensor) -> str | None:
    """Bad inputs must raise ExplainerInputError naming the argument."""
    from methods import ExplainerInputError
    r = ex.backbone.num_classes
    bad = [("images", x.numpy(), None), ("images", x[0], None), ("images", x * 255, None),
           ("images", (x * 255).to(torch.uint8), None),
           ("images", ex.backbone.normalize(x) - 1, None),
           ("targets", x, [0] * (len(x) + 1)), ("targets", x, torch.zeros(len(x))),
           ("targets", x, [r] * len(x)), ("targets", x, [-1] * len(x))]
    problems = []
    for i, (arg, images, targets) in enumerate(bad):
        try:
            ex.explain(images, targets)
            problems.append(f"case {i} (bad {arg}) was accepted")
        except ExplainerInputError as err:
            if not str(err).startswith(f"{arg}:"):
                problems.append(f"case {i}: message {str(err)[:60]!r} does not start with "
                                f"'{arg}:'")
        except Exception as err:
            problems.append(f"case {i} (bad {arg}): {type(err).__name__} instead of "
                            f"ExplainerInputError: {err}")
    return "; ".join(problems) or None


def _output_problems(maps: torch.Tensor, x: torch.Tensor, ex) -> str | None:
    b, _, h, w = x.shape
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != (b, h, w):
        return f"expected a tensor of shape {(b, h, w)}, got {getattr(maps, 'shape', maps)}"
    if maps.dtype != torch.float32 or maps.requires_grad:
        return (f"expected float32 without grad, got {maps.dtype}, "
                f"requires_grad={maps.requires_grad}")
    if not bool(torch.isfinite(maps).all()) or maps.min() < 0 or maps.max() > 1:
        return f"values must be finite and in [0, 1], got [{maps.min():.3g}, {maps.max():.3g}]"
    flags = ex.last_degenerate
    if tuple(flags.shape) != (b,) or flags.dtype != torch.bool:
        return f"last_degenerate: expected a bool tensor of shape ({b},)"
    return None


def _forward_pass_problems(cls, ex, bb, x: torch.Tensor) -> tuple[str | None, dict]:
    feats_shape = tuple(bb.features(x[:1]).shape[1:])
    meta = {"name": getattr(bb, "name", ""), "feature_shape": feats_shape}
    planned, nominal = cls.planned_forward_passes(dict(ex.config), meta), ex.forward_passes
    with torch.no_grad(), RowCounter(bb.first_layer) as counter:
        ex.explain(x)
    per_image, last = counter.rows / len(x), ex.last_forward_passes
    measured = {"forward_passes": nominal, "rows_per_image": per_image,
                "last_forward_passes": last}
    if planned != nominal:
        return f"planned_forward_passes {planned} != forward_passes {nominal}", measured
    if nominal == 1 and per_image != 1:
        return f"a one-pass method (#FW 1) ran {per_image:g} forwards per image", measured
    if nominal > 1 and not (last <= nominal and per_image == last + 1):
        return (f"#FW {nominal}: {per_image:g} rows per image reached the first layer, "
                f"last_forward_passes {last}; expected the clean pass + last_forward_passes "
                "(<= #FW)"), measured
    return None, measured


def _targets_problems(make, x: torch.Tensor, c: torch.Tensor,
                      class_agnostic: bool = False) -> str | None:
    a = x[:1]
    mixed = make().explain(a.expand(2, -1, -1, -1).clone(), c)
    one = make().explain(a, c[:1])
    two = make().explain(a, c[1:])
    problems = [f"mixed-target batch row {i} vs its own call: {d}" for i, d in
                ((0, _differs(mixed[0], one[0])), (1, _differs(mixed[1], two[0]))) if d]
    if not class_agnostic and float((one - two).abs().max()) <= 1e-3:
        problems.append(f"the maps of classes {int(c[0])} and {int(c[1])} are the same")
    return "; ".join(problems) or None


def check_explainer(cls: Any, backbone: SplitBackbone | None = None, *,
                    params: dict | None = None, size: int | tuple[int, int] | None = None,
                    seed: int = 0) -> dict:
    """Run the method contract on ``cls`` (a class or a registry name); see the module doc.

    ``backbone``: default the kit's ``tiny_backbone()``; ``params``: the method's parameters
    (e.g. few RISE masks); ``size``: the images' H, W (default the backbone's input size).
    Returns what it measured; raises ``ConformanceError`` listing every failed check.
    """
    from methods.plugins import declaration_problems
    cls = _resolve_method(cls)
    checks = _Checks(f"{getattr(cls, '__name__', cls)}")
    declared = declaration_problems(cls)
    checks.run("declarations", lambda: "; ".join(declared) or None)
    if declared:
        return checks.finish({})
    bb = backbone if backbone is not None else tiny_backbone()
    hooks_before = leftover_hooks(bb)
    h, w = (size, size) if isinstance(size, int) else tuple(size or bb.input_size)
    x = sample_images(2, h, w, seed=seed + 11)

    def make():
        torch.manual_seed(seed)
        return cls(bb, **(params or {}))

    with torch.no_grad():
        c = bb(x[:1]).topk(2, dim=1).indices[0]
    measured: dict = {}
    ex, found = make(), {}

    def explain():
        found["maps"] = ex.explain(x)

    checks.run("explain", explain)
    if "maps" not in found:
        return checks.finish({})
    maps = found["maps"]
    checks.run("input checks", lambda: _input_problems(make(), x))
    checks.run("output", lambda: _output_problems(maps, x, ex))
    checks.run("determinism", lambda: _differs(make().explain(x), maps, 1e-6))

    def forward_passes():
        problem, found = _forward_pass_problems(cls, make(), bb, x)
        measured.update(found)
        return problem

    checks.run("forward passes", forward_passes)
    checks.run("targets", lambda: _targets_problems(make, x, c,
                                                    bool(getattr(cls, "class_agnostic", False))))
    checks.run("batch independence", lambda: _differs(make().explain(x[:1])[0], maps[0]))
    checks.run("backbone left clean", lambda: _hygiene(bb, hooks_before))
    return checks.finish(measured)


# -- backbones ---------------------------------------------------------------------------------
def _resolve_backbone(factory: Any, feature_shape) -> tuple[Callable, Any]:
    if isinstance(factory, str):
        import backbones
        entry = backbones.REGISTRY.get(factory)
        return entry.factory, feature_shape or entry.meta.get("feature_shape")
    return factory, feature_shape


def _frozen_problems(bb: SplitBackbone) -> str | None:
    problems = []
    if any(p.requires_grad for p in bb.parameters()):
        problems.append("parameters require grad (freeze them)")
    bb.train()
    if any(m.training for m in bb.modules()):
        problems.append("train() put modules in training mode (the backbone stays in eval)")
    bb.eval()
    return "; ".join(problems) or None


def _normalisation_problems(bb: SplitBackbone, x: torch.Tensor) -> str | None:
    mean, std = bb.mean, bb.std
    if tuple(mean.shape) != (1, 3, 1, 1) or tuple(std.shape) != (1, 3, 1, 1):
        return f"mean/std buffers of shape (1, 3, 1, 1) expected, got {tuple(mean.shape)}"
    if not (0 <= float(mean.min()) and float(mean.max()) <= 1 and 0 < float(std.min()) <= 1):
        return (f"mean {mean.flatten().tolist()} / std {std.flatten().tolist()} are not for "
                "[0, 1] pixels (the backbone takes [0, 1] images and normalises inside)")
    return _differs(bb.normalize(x), (x - mean) / std, 1e-6)


def _split_problems(bb: SplitBackbone, x: torch.Tensor) -> str | None:
    with torch.no_grad():
        a = bb.features(x)
        logits, full = bb.head(a), bb(x)
        normalized = bb.forward_normalized(bb.normalize(x))
        a_norm = bb.features_normalized(bb.normalize(x))
    if a.dim() != 4 or tuple(a.shape[:2]) != (len(x), bb.feature_channels):
        return f"features(x): expected (B, K={bb.feature_channels}, P, Q), got {tuple(a.shape)}"
    if tuple(logits.shape) != (len(x), bb.num_classes):
        return f"head(A): expected (B, {bb.num_classes}) logits, got {tuple(logits.shape)}"
    if not bool(torch.isfinite(logits).all()):
        return "head(A) is not finite"
    for what, other, ref in (("head(features(x)) vs forward(x)", logits, full),
                             ("forward_normalized(normalize(x)) vs forward(x)", normalized, full),
                             ("features_normalized(normalize(x)) vs features(x)", a_norm, a)):
        problem = _differs(other, ref, 1e-6)
        if problem:
            return f"{what}: {problem}"
    return None


def _head_gradient_problems(bb: SplitBackbone, x: torch.Tensor) -> str | None:
    with torch.no_grad():
        a = bb.features(x)
    kept = a.clone()
    with torch.enable_grad():
        leaf = a.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(bb.head(leaf)[:, 0].sum(), leaf)
    if tuple(grad.shape) != tuple(a.shape) or not bool(torch.isfinite(grad).all()):
        return "the gradient of the head w.r.t. A is missing or not finite"
    return "the head modified A in place" if _differs(leaf.detach(), kept, 0) else None


def _first_layer_problems(bb: SplitBackbone, x: torch.Tensor) -> str | None:
    with torch.no_grad(), RowCounter(bb.first_layer) as counter:
        a = bb.features(x)
        after_features = counter.rows
        bb.head(a)
        after_head = counter.rows
    if after_features != len(x) or after_head != after_features:
        return (f"first_layer saw {after_features} rows for {len(x)} images in features(x) "
                f"and {after_head - after_features} in head(A); expected {len(x)} and 0")
    return None


def _shape_problems(bb: SplitBackbone, feature_shape) -> str | None:
    if feature_shape is None:
        return None
    x = sample_images(1, *bb.input_size, seed=5)
    with torch.no_grad():
        found = tuple(bb.features(x).shape[1:])
    if found != tuple(feature_shape):
        return (f"A at the input size {tuple(bb.input_size)} is {found}, declared "
                f"{tuple(feature_shape)}")
    return None


def check_backbone(factory: Any, *, size: int | tuple[int, int] | None = None,
                   feature_shape: tuple[int, int, int] | None = None, seed: int = 0) -> dict:
    """Run the backbone contract on ``factory`` (a callable or a registry name); see the
    module doc. ``size``: the images' H, W for the numeric checks (default the input size;
    smaller is faster); ``feature_shape``: the declared (K, P, Q) at the input size (a
    registry name brings its own); it is checked with one image at the input size.
    """
    from backbones.plugins import call_factory
    factory, feature_shape = _resolve_backbone(factory, feature_shape)
    checks = _Checks(getattr(factory, "__name__", str(factory)))
    bb = call_factory(factory, weights=None)
    if not isinstance(bb, SplitBackbone):
        checks.run("SplitBackbone", lambda: f"returned a {type(bb).__name__}, not a "
                                            "backbones.base.SplitBackbone")
        return checks.finish({})
    hooks_before = leftover_hooks(bb)
    h, w = (size, size) if isinstance(size, int) else tuple(size or bb.input_size)
    x = sample_images(2, h, w, seed=seed + 3)
    checks.run("frozen, eval mode", lambda: _frozen_problems(bb))
    checks.run("normalisation inside", lambda: _normalisation_problems(bb, x))
    checks.run("split", lambda: _split_problems(bb, x))
    checks.run("declared feature shape", lambda: _shape_problems(bb, feature_shape))
    checks.run("head differentiable, A unchanged", lambda: _head_gradient_problems(bb, x))
    checks.run("first layer", lambda: _first_layer_problems(bb, x))
    with torch.no_grad():
        checks.run("batch independence", lambda: _differs(bb(x[:1])[0], bb(x)[0]))
    checks.run("backbone left clean", lambda: _hygiene(bb, hooks_before))
    return checks.finish({"feature_layer": bb.feature_layer, "input_size": tuple(bb.input_size),
                          "feature_channels": bb.feature_channels})


__all__ = ["ConformanceError", "check_backbone", "check_explainer", "leftover_hooks",
           "RowCounter", "sample_images", "tiny_backbone"]
