"""``include:``: a spec built on a base spec, with its own values over the base's.

A spec may name one base file, or a list of them, at the top level::

    include: presets/table1.yaml          # relative to the file that writes it
    name: table1_vgg16
    backbones: [{name: vgg16, weights: IMAGENET1K_V1}]
    train: {epochs: 8}                    # train's other keys come from the base

The bases are read first (in the order listed, each later one over the earlier), then the
spec's own mapping over them: a **mapping merges key by key** (recursively), **any other
value replaces** the base's (a list is replaced whole: ``methods`` is never appended to), and
``key: null`` sets null (the field's default then applies where null means "default"). A
base may include further bases. Overrides (``key=value``) apply after every include.

Refused, naming the file and the fix (exit 2, nothing started): a base that is missing or
unreadable, an ``include`` that is not a path or a list of paths, a file included by itself
(directly or through others), more than ``MAX_INCLUDE_DEPTH`` (8) levels. Each base is read
with the same limits as a spec (``harness.spec.loader``: size, nesting, alias bombs).

Relative paths among a spec's *values* (``data.list_file``, ``weights``, ...) are read
relative to the spec given on the command line, wherever they were written: bases meant to be
shared write none (``builtin:`` lists, weights enums and ``data.root`` overrides need none).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

MAX_INCLUDE_DEPTH = 8


class IncludeProblem(Exception):
    """An ``include`` that cannot be followed: ``message`` names the file and the fix."""


def merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return over


def _where(file: Path, nested: bool) -> str:
    """A problem in a base names that base (one in the spec itself is at its ``include``)."""
    return f"in {file}: " if nested else ""


def _names(value: Any, file: Path, nested: bool) -> list[str]:
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip()
                                                 for v in value):
        return list(value)
    raise IncludeProblem(f"{_where(file, nested)}include must be a path to a base spec or a list of paths "
                         "(e.g. include: presets/table1.yaml), relative to this file")


def resolve(raw: dict, file: Path, read: Callable[[Path], dict],
            chain: tuple[Path, ...] = ()) -> dict:
    """``raw`` (read from ``file``) with its bases merged under it and ``include`` removed.
    ``read(path)`` returns a base file's top-level mapping (raising the loader's refusal)."""
    if "include" not in raw:
        return raw
    here, nested = file.resolve(), bool(chain)
    chain = chain + (here,)
    if len(chain) > MAX_INCLUDE_DEPTH:
        raise IncludeProblem(f"{_where(file, nested)}include goes more than {MAX_INCLUDE_DEPTH} files deep "
                             f"({' -> '.join(p.name for p in chain)}); flatten the bases")
    merged: dict = {}
    for name in _names(raw["include"], file, nested):
        base_file = (here.parent / name).resolve()
        if base_file in chain:
            raise IncludeProblem(f"{_where(file, nested)}{name} comes back to a file already "
                                 f"being included ({' -> '.join(p.name for p in chain)} -> "
                                 f"{base_file.name}); remove the cycle")
        if not base_file.is_file():
            raise IncludeProblem(f"{_where(file, nested)}{name} is not a file (looked for "
                                 f"{base_file}); give the base spec's path relative to "
                                 f"{here.parent}")
        merged = merge(merged, resolve(read(base_file), base_file, read, chain))
    own = {k: v for k, v in raw.items() if k != "include"}
    return merge(merged, own)
