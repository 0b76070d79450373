"""Rules that need more than one section's own values: the file system (paths that must
exist, the evaluation list's format), the machine (a GPU request) or other sections.

Each rule reports to the ``Report`` and returns the section with its paths resolved:
relative paths written in the file are relative to the file's folder, those given by
``key=value`` overrides relative to the working directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from harness.spec.problems import Report
from harness.spec.schema import BUILTIN_LISTS
from harness.spec.sections import (DataSection, RaySection, ShardingSection, StorageSection,
                                   TrainSection)
from harness.spec.values import did_you_mean

_LIST_LINE = re.compile(r"\d+")


def check_data(data: DataSection, needs_train: bool, report: Report) -> DataSection:
    """data.root (required for ImageNet; train/ and val/ where needed) and data.list_file."""
    root, list_file = data.root, data.list_file
    if data.kind in ("imagenet", "folder") and root is None:
        report.add(("data", "root"), f"required with data.kind: {data.kind}: the folder holding "
                   f"train/ and val/. Give it on the command line: data.root=/path/to/{data.kind}")
    elif root is not None and "://" in root:      # an object store (harness.data.sources)
        if list_file is not None and not list_file.startswith("builtin:"):
            report.add(("data", "list_file"), "a list file selects images of a local folder; "
                       f"with data.root {root.split('?')[0]} use the split's class folders "
                       "(data.limit, data.random_count select from them)")
    elif root is not None:
        found = report.existing(("data", "root"), root, "folder", folder=True)
        if found:
            root = found
            _check_root_layout(Path(found), needs_train, list_file is None, report)
    if list_file is not None and list_file.startswith("builtin:"):
        _check_builtin(list_file.split(":", 1)[1], data.kind, report)
    elif list_file is not None:
        found = report.existing(("data", "list_file"), list_file, "list file")
        if found:
            list_file = found
            check_list_file(Path(found), report)
    classes = data.classes
    if classes is not None:
        found = report.existing(("data", "classes"), classes, "class-list file")
        classes = found or classes
    return data.model_copy(update={"root": root, "list_file": list_file, "classes": classes})


def _check_root_layout(root: Path, needs_train: bool, needs_val: bool, report: Report) -> None:
    subs = (["train"] if needs_train else []) + (["val"] if needs_val else [])
    missing = [s for s in subs if not (root / s).is_dir()]
    if missing:
        report.add(("data", "root"), f"{root} has no {' and no '.join(m + '/' for m in missing)}"
                   + (" (train/ is needed to train the L-CAM heads; give each learned "
                      "method a checkpoint to skip training)" if "train" in missing else ""))


def _check_builtin(key: str, kind: str, report: Report) -> None:
    if key not in BUILTIN_LISTS:
        report.add(("data", "list_file"), f"unknown built-in list '{key}'."
                   f"{did_you_mean(key, BUILTIN_LISTS)} Available: "
                   f"{', '.join('builtin:' + b for b in BUILTIN_LISTS)}")
    elif kind != "imagenet":
        report.add(("data", "list_file"), f"builtin:{key} lists ImageNet validation images; "
                   "it needs data.kind: imagenet")


def check_list_file(path: Path, report: Report, show: int = 5) -> None:
    """Every line '<image file name> <integer label>' (blank lines and # comments aside)."""
    loc = ("data", "list_file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        report.add(loc, f"cannot read {path}: {err}")
        return
    bad, count = 0, 0
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        count += 1
        parts = line.split()
        if len(parts) != 2 or not _LIST_LINE.fullmatch(parts[1]):
            bad += 1
            if bad <= show:
                report.add(loc, f"line {n}: expected '<image file name> <integer label>', "
                           f"got {line.strip()!r}")
    if bad > show:
        report.add(loc, f"... and {bad - show} more malformed lines")
    if not count:
        report.add(loc, f"{path} lists no images")


def check_storage(storage: StorageSection, report: Report) -> StorageSection:
    """Local paths resolved like every path of the spec; URIs (s3://, gs://) kept as written;
    the cache is a folder on each node, never a URI."""
    update = {}
    if storage.uri is not None and "://" not in storage.uri:
        update["uri"] = str(report.path(("storage", "uri"), storage.uri))
    if storage.cache is not None:
        if "://" in storage.cache:
            report.add(("storage", "cache"), f"{storage.cache!r} is a URI: the cache is a "
                       "folder on each node's own disk (results go to storage.uri)")
        else:
            update["cache"] = str(report.path(("storage", "cache"), storage.cache))
    return storage.model_copy(update=update) if update else storage


def check_gpu(raw: dict, train: TrainSection, sharding: ShardingSection, ray: RaySection,
              report: Report) -> None:
    """A GPU request on a machine without one, when Ray will be local (not a cluster)."""
    if ray.address is not None or os.environ.get("RAY_ADDRESS"):
        return
    wanted = [("train", "use_gpu")] if train.use_gpu else []
    for section in ("backbones", "methods"):
        items = raw.get(section) if isinstance(raw.get(section), list) else []
        wanted += [(section, i, "train", "use_gpu") for i, item in enumerate(items)
                   if _item_train(item).get("use_gpu") is True]
    if sharding.gpus_per_task > 0:
        wanted.append(("sharding", "gpus_per_task"))
    if not wanted:
        return
    import torch
    if torch.cuda.is_available():
        return
    for loc in wanted:
        fix = "sharding.gpus_per_task: 0" if loc[0] == "sharding" else "use_gpu: false"
        report.add(loc, f"this machine has no GPU and ray.address is null (local Ray); set "
                   f"{fix}, or give ray.address of a cluster with GPUs")


def _item_train(item: Any) -> dict:
    train = item.get("train") if isinstance(item, dict) else None
    return train if isinstance(train, dict) else {}


def check_metrics(evaluation, report: Report):
    """``evaluation.metrics``: every name resolved by the metric registry (built in, an
    installed plugin, a class reference) and every entry's settings checked against the
    metric's ``Settings`` (its fields, types and ranges), each problem at its field
    (``evaluation.metrics[2].percentages[0]``). Returns the section unchanged."""
    from backbones.registry import UnknownNameError
    from harness.metrics import registry
    for i, item in enumerate(evaluation.metrics):
        loc = ("evaluation", "metrics", i)
        settings = {k: v for k, v in item.items() if k != "name"} if isinstance(item, dict) \
            else {}
        name = item.get("name") if isinstance(item, dict) else item
        if isinstance(item, dict) and not isinstance(name, str):
            report.add(loc + ("name",), "required: the metric's name (e.g. {name: road})")
            continue
        at = loc + (("name",) if isinstance(item, dict) else ())
        try:
            cls = registry.metric_class(name)
        except UnknownNameError as err:       # unknown, or a broken plugin
            report.add(at, str(err))
            continue
        if name == "ad_ic" and settings:
            report.add(loc, "ad_ic's settings are evaluation.keep_fractions and "
                            "evaluation.preset: write ad_ic alone")
        elif cls.always and name != "ad_ic":
            report.add(at, f"{name} is always computed (its numbers are in every run): "
                           "leave it out of evaluation.metrics")
        elif settings:
            report.check(cls.Settings, settings, loc)
    return evaluation
