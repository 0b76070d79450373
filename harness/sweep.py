"""The ``sweep`` section of a sweep spec (a benchmark spec plus a search space).

```yaml
sweep:
  backbone: tiny_vgg            # default: the spec's first backbone
  method: lcam_img              # a learned method id of the spec (default: the first learned)
  space:                        # keys: lambda1..lambda4, lr, lr_decay, epochs
    lambda1: {loguniform: [0.001, 0.1]}
    lr: {choice: [0.01, 0.05]}
    epochs: {grid: [2, 3]}
  num_samples: 4                # samples of the random part (grid values multiply it)
  metric: val_loss              # val_loss | val_ce | AD_<k> | IC_<k> (k = 100, 50, 15 ...)
  mode: min                     # default: max for IC_*, min otherwise
  scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: none}
  validation_images: 100        # held out of the training split (disjoint from evaluation)
  cpus_per_trial: 1
  gpus_per_trial: 0
```
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

SPACE_KEYS = ("lambda1", "lambda2", "lambda3", "lambda4", "lr", "lr_decay", "epochs")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "grid")
SWEEP_KEYS = ("backbone", "method", "space", "num_samples", "metric", "mode", "scheduler",
              "validation_images", "cpus_per_trial", "gpus_per_trial")
METRIC = re.compile(r"^(val_loss|val_ce|(AD|IC)_\d+(\.\d+)?)$")


@dataclass
class SweepSpec:
    """A validated ``sweep`` section (see the module docstring)."""

    backbone: str
    method: str
    space: dict[str, dict[str, list]]
    num_samples: int = 4
    metric: str = "val_loss"
    mode: str = "min"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    validation_images: int = 100
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def fraction(self) -> float | None:
        """The kept fraction of an AD/IC metric (e.g. AD_15 -> 0.15), else None."""
        if self.metric.startswith(("AD_", "IC_")):
            return float(self.metric.split("_", 1)[1]) / 100
        return None


def _num(ck, where: str, value: Any, integer: bool):
    from .spec import _BAD
    out = ck.number(where, value, integer=integer)
    return None if out is _BAD else out


def check_sweep(where: str, raw: Any, ck, spec) -> SweepSpec | None:
    """Validate the ``sweep`` section; problems go to ``ck.add(field_path, message)``."""
    if raw is None:
        ck.add(where, "required in a sweep spec: add a 'sweep:' section with a search 'space' "
               "(see jobs/sweeps/lcam_quickstart.yaml)")
        return None
    if not isinstance(raw, dict):
        ck.add(where, f"expected a mapping, got {type(raw).__name__}")
        return None
    ck.unknown_keys(where, raw, SWEEP_KEYS)
    learned = [m.id for m in spec.methods if m.learned] if spec.methods else []
    method = raw.get("method", learned[0] if learned else None)
    if method is None:
        ck.add(f"{where}.method", "the spec has no learned method (lcam_fm, lcam_img) to tune")
    elif method not in learned:
        ck.add(f"{where}.method", f"'{method}' is not a learned method id of this spec; "
               f"choose one of: {', '.join(learned) or '(none)'}")
    names = [b.name for b in spec.backbones] if spec.backbones else []
    backbone = raw.get("backbone", names[0] if names else None)
    if backbone not in names:
        ck.add(f"{where}.backbone", f"'{backbone}' is not a backbone of this spec; choose one "
               f"of: {', '.join(names) or '(none)'}")
    space = raw.get("space")
    clean: dict[str, dict[str, list]] = {}
    if not isinstance(space, dict) or not space:
        ck.add(f"{where}.space", "expected a non-empty mapping of parameters to distributions, "
               "e.g. {lr: {loguniform: [1.0e-3, 1.0e-1]}}")
    else:
        ck.unknown_keys(f"{where}.space", space, SPACE_KEYS)
        for key, dist in space.items():
            at = f"{where}.space.{key}"
            if key not in SPACE_KEYS:
                continue
            if not isinstance(dist, dict) or len(dist) != 1:
                ck.add(at, f"expected one of {{{': [...], '.join(DISTRIBUTIONS)}: [...]}}")
                continue
            (kind, values), = dist.items()
            if kind not in DISTRIBUTIONS:
                ck.add(f"{at}.{kind}", f"unknown distribution '{kind}'; use one of "
                       f"{', '.join(DISTRIBUTIONS)}")
                continue
            if not isinstance(values, list) or not values:
                ck.add(f"{at}.{kind}", "expected a non-empty list")
                continue
            nums = []
            for i, v in enumerate(values):
                n = _num(ck, f"{at}.{kind}[{i}]", v, key == "epochs")
                nums.append(n)
            if any(n is None for n in nums):
                continue
            if kind in ("uniform", "loguniform"):
                if len(nums) != 2 or nums[0] >= nums[1]:
                    ck.add(f"{at}.{kind}", "expected [low, high] with low < high")
                    continue
                if kind == "loguniform" and nums[0] <= 0:
                    ck.add(f"{at}.{kind}", "loguniform needs low > 0")
                    continue
                if key == "epochs":
                    ck.add(f"{at}.{kind}", "epochs take choice or grid (integers)")
                    continue
            clean[key] = {kind: nums}
    metric = raw.get("metric", "val_loss")
    if not isinstance(metric, str) or not METRIC.match(metric):
        ck.add(f"{where}.metric", f"{metric!r} is not val_loss, val_ce, AD_<percent> or "
               "IC_<percent> (e.g. AD_15)")
        metric = "val_loss"
    mode = raw.get("mode", "max" if metric.startswith("IC_") else "min")
    if mode not in ("min", "max"):
        ck.add(f"{where}.mode", f"expected 'min' or 'max', got {mode!r}")
    scheduler = raw.get("scheduler", {"name": "asha"})
    if not isinstance(scheduler, dict) or scheduler.get("name", "asha") not in ("asha", "none"):
        ck.add(f"{where}.scheduler", "expected {name: asha, grace_period: N, reduction_factor: "
               "N} or {name: none}")
        scheduler = {"name": "asha"}
    else:
        ck.unknown_keys(f"{where}.scheduler", scheduler, ("name", "grace_period",
                                                         "reduction_factor"))
        for k in ("grace_period", "reduction_factor"):
            if k in scheduler:
                _num(ck, f"{where}.scheduler.{k}", scheduler[k], True)
    ints = {}
    for key, default, lo in (("num_samples", 4, 1), ("validation_images", 100, 1)):
        v = _num(ck, f"{where}.{key}", raw.get(key, default), True)
        if v is not None and v < lo:
            ck.add(f"{where}.{key}", f"must be >= {lo}")
        ints[key] = v if v is not None else default
    floats = {}
    for key, default in (("cpus_per_trial", 1.0), ("gpus_per_trial", 0.0)):
        v = _num(ck, f"{where}.{key}", raw.get(key, default), False)
        floats[key] = float(v) if v is not None else default
    if floats["cpus_per_trial"] <= 0:
        ck.add(f"{where}.cpus_per_trial", "must be > 0")
    return SweepSpec(backbone=backbone, method=method, space=clean, metric=metric, mode=mode,
                     scheduler={"name": "asha", **scheduler}, **ints, **floats)
