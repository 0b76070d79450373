"""``python -m harness ls``: the methods and backbones (built in, then installed plugins, each
with its origin; the torchvision models refused as non-CNNs), and the jobs folder's specs."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

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


def _plugin_entries(registry) -> list[tuple[str, object]]:
    """(name, its registry entry or the error that makes it unusable) of each installed
    plugin of ``registry`` (imported and checked here, as a spec naming it would be)."""
    from backbones.registry import UnknownNameError
    out = []
    for name in registry.REGISTRY.plugin_names():
        try:
            out.append((name, registry.REGISTRY.get(name)))
        except UnknownNameError as err:
            out.append((name, err))
    return out


def methods_table():
    """Every method with its variants and parameters (default and accepted values, from the
    same declarations the spec checks them against) and its origin: built in, or the
    distribution of a plugin (a broken plugin is listed with what is wrong)."""
    from rich.table import Table

    import methods
    from harness.spec import method_params_rows
    t = Table(title="methods", title_justify="left")
    for col in ("name", "display", "family", "variants", "params (default, accepted)", "paper",
                "origin"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    plugins = _plugin_entries(methods)
    usable = [name for name, entry in plugins if not isinstance(entry, Exception)]
    for name, variants, params in method_params_rows(methods.names() + usable):
        cls, entry = methods.method_class(name), methods.REGISTRY.get(name)
        t.add_row(name, cls.display_name, cls.family, variants, params, cls.paper, entry.origin)
    for name, err in plugins:
        if isinstance(err, Exception):
            t.add_row(name, "", "", "", "", "", f"[red]unusable:[/red] {escape(str(err))}")
    return t


def backbones_table():
    """Every backbone: its family, where A is taken and its shape at the input size, the
    default weights, the origin; installed plugins after the built-in ones."""
    from rich.table import Table

    import backbones
    t = Table(title="backbones (A = features(x): the feature layer's output)",
              title_justify="left")
    for col in ("name", "family", "A layer", "A shape", "input", "weights", "paper", "origin"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    plugins = _plugin_entries(backbones)
    entries = list(backbones.REGISTRY) + [e for _, e in plugins if not isinstance(e, Exception)]
    for entry in entries:
        meta = entry.meta
        shape, size = meta.get("feature_shape"), meta.get("input_size")
        weights = meta.get("default_weights") or ("IMAGENET1K_V1" if meta.get("weights_enum")
                                                   else "embedded")
        t.add_row(entry.name, str(meta.get("family", "")), str(meta.get("feature_layer", "")),
                  "x".join(map(str, shape)) if shape else "",
                  "x".join(map(str, size)) if size else "", str(weights),
                  str(meta.get("paper", "")), entry.origin)
    for name, err in plugins:
        if isinstance(err, Exception):
            t.add_row(name, "", "", "", "", "", "", f"[red]unusable:[/red] {escape(str(err))}")
    return t


def adapted_line() -> str:
    """The other libraries' methods a spec may name by prefix (methods.ecosystem)."""
    from importlib.util import find_spec

    from methods.ecosystem import PGC_METHODS, PREFIX
    names = ", ".join(f"{PREFIX}:{n}" for n in PGC_METHODS)
    state = ("installed" if find_spec("pytorch_grad_cam") else
             "not installed: pip install 'lcam-bench[pgc]'")
    return f"pytorch-grad-cam's methods ({state}): {names}"


def refused_line() -> str:
    import backbones
    refused = sorted(backbones.REGISTRY.refused())
    return (f"refused (not CNNs: no convolutional A): {', '.join(refused)}" if refused else "")


def jobs_table():
    """The specs of ``./jobs`` (else the checkout's), or a line saying where they are: an
    installed wheel holds the packages only, the specs come with the project's files."""
    from rich.table import Table
    jobs_dir = Path.cwd() / "jobs"
    if not jobs_dir.is_dir():
        jobs_dir = PACKAGE_ROOT / "jobs"
    if not jobs_dir.is_dir():
        return ("jobs: no jobs/ folder here (the shipped specs are in the project's jobs/ "
                "folder; run ls from the project, or pass your own spec to validate and run)")
    t = Table(title=f"jobs ({jobs_dir})", title_justify="left")
    t.add_column("file", no_wrap=True)
    t.add_column("command (first comment line)", overflow="fold")
    for path in sorted(jobs_dir.glob("*.yaml")):
        t.add_row(path.name, first_comment(path))
    return t


def main(args: argparse.Namespace) -> int:
    from harness.terminal import make_console
    console = make_console()
    console.print(methods_table())
    console.print(adapted_line(), highlight=False)
    console.print(backbones_table())
    console.print(refused_line(), highlight=False)
    console.print(jobs_table())
    return 0
