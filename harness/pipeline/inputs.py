"""Stage 1 of a run: the inputs, made and checked before anything is started or recorded.

``prepare_data(plan)`` generates the quickstart data set if the plan needs it, builds every
backbone's evaluation set and decodes each image once into its prepared set
(``harness.data.prepared``, reused by every method, run and retry; a bad image under
``on_bad_image: stop``, or nothing left under ``skip``, raises ``InputRefused``: exit 2, no
MLflow run, no Ray), then ``load_backbones`` loads each backbone on the driver (training an
embedded one on first use) for what identifies it: the weights id, the feature layer, the
input size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.errors import UserError
from harness.pipeline.plan import Plan


class InputRefused(UserError):
    """Bad input data found before the run started anything."""


@dataclass
class Inputs:
    """What the run reads: each backbone's evaluation set and the loaded backbone itself."""

    datasets: dict = field(default_factory=dict)      # backbone name -> ImageDataset
    prepared: dict = field(default_factory=dict)      # backbone name -> Prepared (decoded)
    backbones: dict = field(default_factory=dict)     # backbone name -> SplitBackbone (CPU)

    refs: dict = field(default_factory=dict)          # backbone name -> PreparedRef
    train_files: dict = field(default_factory=dict)   # backbone name -> training listing digest

    def weights_id(self, name: str) -> str:
        return self.backbones[name].weights_id

    def prepared_ref(self, name: str):
        """``name``'s prepared set as the workers receive it (``PreparedRef``): on a Ray
        cluster of several nodes its files go into the object store once, so that no node
        decodes the images again (or needs them at all)."""
        if name not in self.refs:
            from harness.data.prepared import ref_of
            self.refs[name] = ref_of(self.prepared[name], ship=_several_nodes())
        return self.refs[name]

    def images(self, name: str) -> int:
        return len(self.datasets[name])


def _several_nodes() -> bool:
    import sys
    if "ray" not in sys.modules:
        return False
    import ray
    return ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def _quickstart(progress: Callable[[str, int, int | None], None]) -> None:
    from harness.data.quickstart import ensure_quickstart
    ensure_quickstart(progress=lambda done, total: progress("quickstart data", done, total))


def prepare_data(plan: Plan, progress: Callable[[str, int, int | None], None],
                 root: Path) -> Inputs:
    """Every evaluation set, built, checked and decoded once into ``root``'s prepared sets
    (``harness.data.prepared``; see the module docstring)."""
    from harness.data.images import DataError
    from harness.data.prepared import prepare
    inputs = Inputs()
    try:
        if any(s.kind == "quickstart" for s in plan.images.values()):
            _quickstart(progress)
        for name, images in plan.images.items():
            ds = images.build()
            label = f"decode {len(ds)} images for {name}"
            progress(label, 0, len(ds))
            inputs.prepared[name] = prepare(images, ds, root,
                                            progress=lambda d, t, lb=label: progress(lb, d, t))
            progress(label, len(ds), len(ds))
            if not len(ds):
                raise DataError(f"no images left to evaluate for {name}: all {ds.skipped} "
                                f"selected were skipped (first: {ds.bad[0][1]})" if ds.bad
                                else f"no images to evaluate for {name}")
            inputs.datasets[name] = ds
        for group in plan.head_groups:     # what the heads train on, by its listing
            if group.backbone not in inputs.train_files:
                progress(f"list training images for {group.backbone}", 0, None)
                inputs.train_files[group.backbone] = group.images.build().info["files"]
                progress(f"list training images for {group.backbone}", 1, 1)
    except DataError as err:
        raise InputRefused(f"{err}\nnothing was started: fix the data or set "
                           "data.on_bad_image: skip") from None
    return inputs


def load_backbones(plan: Plan, inputs: Inputs,
                   progress: Callable[[str, int, int | None], None]) -> None:
    """Load each backbone on the driver (CPU) and check its input size against its images."""
    import backbones
    from harness.data.models import default_weights, load_backbone
    for name, images in plan.images.items():
        dataset = inputs.datasets[name]
        declared = backbones.REGISTRY.get(name).meta.get("num_classes")
        if declared and plan.weights[name] in (default_weights(name), "embedded"):
            check_classes(name, int(declared), dataset)   # before an embedded one trains
        progress(f"backbone {name}", 0, None)
        try:
            bb = load_backbone(name, weights=plan.weights[name])
        except backbones.WeightsError as err:
            raise InputRefused(f"backbone {name}: {err}\nnothing was started") from None
        progress(f"backbone {name}", 1, 1)
        if tuple(bb.input_size) != tuple(images.input_size):
            raise RuntimeError(f"backbone {name}: its registry entry says input size "
                               f"{images.input_size}, the model {tuple(bb.input_size)}")
        check_classes(name, bb.num_classes, dataset)
        inputs.backbones[name] = bb


def check_classes(name: str, num_classes: int, dataset) -> None:
    """Refuse (``InputRefused``, exit 2) a backbone whose classifier has another number of
    classes than the data set: its top-1 would index other classes than the labels, and
    every number and figure would be about the wrong classes."""
    classes = getattr(dataset, "class_list", None)
    if classes is None or len(classes) == num_classes:
        return
    raise InputRefused(
        f"backbone {name} has {num_classes} output classes, but the data set "
        f"{dataset.name!r} has {len(classes)} ({classes.source}); nothing was started. "
        "Give a backbone trained on these classes (backbones[].weights: its state_dict), or "
        "the data set it was trained on (data.root, data.classes)")
