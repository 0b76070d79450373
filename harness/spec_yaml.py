"""Reading a spec file's YAML and applying ``key=value`` overrides to the raw mapping.

``_parse_yaml`` uses a ``yaml.SafeLoader`` subclass (nothing is ever constructed, imported or
run) that also reports keys repeated within one mapping; ``_apply_overrides`` sets dotted
paths (``train.epochs=2``, ``methods[0].params.batch_size=8``) before validation, reporting
any path it cannot apply.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import yaml

from harness.spec_fields import _Checker, _join, describe

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that records keys repeated within one mapping."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any, int]] = []


def _construct_mapping(loader: _Loader, node, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                loader.duplicates.append((key_node.start_mark.line + 1, key, seen[key]))
            else:
                seen[key] = key_node.start_mark.line + 1
        except TypeError:
            pass                      # unhashable: the base constructor reports it
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> tuple[Any, list[tuple[str, str]]]:
    try:
        loader = _Loader(text)       # the reader refuses control characters (a NUL byte) here
    except yaml.reader.ReaderError as err:
        return None, [_reader_problem(text, err)]
    try:
        data = loader.get_single_data()
    except yaml.reader.ReaderError as err:
        return None, [_reader_problem(text, err)]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(x) for x in (getattr(err, "context", None),
                                         getattr(err, "problem", None)) if x) or str(err)
        return None, [(where, f"not valid YAML: {what}")]
    finally:
        loader.dispose()
    return data, [(f"line {line}", f"key '{key}' is repeated (first at line {first}); YAML would "
                   "silently keep only the last one. Remove one of them.")
                  for line, key, first in loader.duplicates]


def _reader_problem(text: str, err: yaml.reader.ReaderError) -> tuple[str, str]:
    """A character YAML does not allow (a NUL byte, another control character)."""
    before = text[:max(0, err.position)]
    line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
    char = err.character if isinstance(err.character, int) else ord(str(err.character)[:1] or "?")
    return (f"line {line}, column {column}",
            f"not valid YAML: control character #x{char:04x} is not allowed in a spec file "
            "(is it a binary file, or was it saved with the wrong encoding?)")


def _apply_overrides(raw: dict, overrides: Iterable[str], ck: _Checker) -> None:
    for text in overrides:
        path, eq, value = str(text).partition("=")
        path = path.strip()
        if not eq or not _OVERRIDE.match(path):
            ck.problems.append(("overrides", f"'{text}' is not key=value with a dotted key "
                                "(e.g. train.epochs=2, methods[0].params.batch_size=8)"))
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        steps: list[str | int] = []
        for part in path.split("."):
            name, _, rest = part.partition("[")
            steps.append(name)
            steps += [int(i) for i in re.findall(r"\d+", "[" + rest if rest else "")]
        node, where = raw, ""
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list):
                    ck.problems.append((where, f"override '{text}': {where} is "
                                        f"{describe(node)}, not a list; cannot take [{step}]"))
                    break
                if step >= len(node):
                    ck.problems.append((_join(where, step), f"override '{text}': there is no "
                                        f"{_join(where, step)}; {where} has {len(node)} "
                                        f"entr{'y' if len(node) == 1 else 'ies'}"))
                    break
            elif not isinstance(node, dict):
                ck.problems.append((where, f"override '{text}': {where} is {describe(node)}, "
                                    f"not a mapping; cannot set '{step}'"))
                break
            if last:
                node[step] = parsed
                ck.overrides[_join_all(steps)] = text
            else:
                if isinstance(step, str) and node.get(step) is None:
                    if isinstance(steps[i + 1], int):
                        ck.problems.append((_join(where, step), f"override '{text}': "
                                            f"{_join(where, step)} is not set; cannot index it"))
                        break
                    node[step] = {}
                node, where = node[step], _join(where, step)


def _join_all(steps: list[str | int]) -> str:
    where = ""
    for s in steps:
        where = _join(where, s)
    return where

