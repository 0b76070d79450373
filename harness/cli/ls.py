"""``python -m harness ls``: the registered methods and backbones, and the jobs folder's specs."""
from __future__ import annotations

import argparse
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser                                       # no options


def first_comment(path: Path) -> str:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("#"):
                return line.strip().lstrip("#").strip()
    except OSError:
        pass
    return ""


def methods_table():
    """Every method with its variants and parameters (default and accepted values, from the
    same declarations the spec checks them against)."""
    from rich.table import Table

    import methods
    from harness.spec import method_params_rows
    t = Table(title="methods", title_justify="left")
    for col in ("name", "display", "family", "variants", "params (default, accepted)", "paper"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    for name, variants, params in method_params_rows():
        cls = methods.method_class(name)
        t.add_row(name, cls.display_name, cls.family, variants, params, cls.paper)
    return t


def backbones_table():
    from rich.table import Table

    import backbones
    t = Table(title="backbones", title_justify="left")
    for col in ("name", "family", "feature layer", "feature shape", "weights", "paper"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    for entry in backbones.REGISTRY:
        meta = entry.meta
        shape = meta.get("feature_shape")
        weights = meta.get("default_weights") or ("IMAGENET1K_V1" if meta.get("weights_enum")
                                                   else "embedded")
        t.add_row(entry.name, str(meta.get("family", "")), str(meta.get("feature_layer", "")),
                  "x".join(map(str, shape)) if shape else "", weights, str(meta.get("paper", "")))
    return t


def jobs_table():
    from rich.table import Table
    jobs_dir = Path.cwd() / "jobs"
    if not jobs_dir.is_dir():
        jobs_dir = PACKAGE_ROOT / "jobs"
    t = Table(title=f"jobs ({jobs_dir})", title_justify="left")
    t.add_column("file", no_wrap=True)
    t.add_column("command (first comment line)", overflow="fold")
    for path in sorted(jobs_dir.glob("*.yaml")):
        t.add_row(path.name, first_comment(path))
    return t


def main(args: argparse.Namespace) -> int:
    from harness.terminal import make_console
    console = make_console()
    for table in (methods_table(), backbones_table(), jobs_table()):
        console.print(table)
    return 0
