"""Reading a spec file: the YAML, the ``key=value`` overrides, then ``load_spec``.

The YAML is read with a ``yaml.SafeLoader`` subclass (nothing is ever constructed, imported
or run) that also reports a key repeated within one mapping (plain YAML silently keeps the
last one) and a character YAML refuses (a NUL byte: a binary file or a wrong encoding).
Overrides (``train.epochs=2``, ``methods[0].params.batch_size=8``; the value is read with
``yaml.safe_load``) are applied to the raw mapping before validation; the report remembers
which field each set, and a path it cannot apply is itself a problem.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from harness.spec.problems import Report, SpecError, field_path
from harness.spec.values import describe

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*$")


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = (), sweep: bool = False):
    """Read, override, validate and resolve a spec file; raises ``SpecError``.

    ``sweep=True`` reads a sweep spec (``harness tune``): its ``sweep`` section is required
    and validated (``spec.sweep``); otherwise a ``sweep`` key is refused."""
    from harness.spec.build import build_spec

    shown, file = str(path), Path(path)
    raw, yaml_problems = _read(shown, file)
    report = Report(file.resolve().parent)
    report.problems += yaml_problems
    apply_overrides(raw, overrides, report)
    spec = build_spec(raw, report, file, sweep=sweep)
    if report.problems:
        raise SpecError(shown, report.ordered(raw))
    spec.path = shown
    return spec


def _read(shown: str, file: Path) -> tuple[dict, list]:
    """(the top-level mapping, the YAML's own problems); SpecError when there is none."""
    if not file.is_file():
        raise SpecError(shown, [("", "file not found" if not file.exists() else "not a file")])
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(shown, [("", f"cannot read the file: {err}")]) from None
    raw, problems = parse_yaml(text)
    if problems and raw is None:
        raise SpecError(shown, problems)
    if raw is None:
        raise SpecError(shown, [("", "the file is empty; a spec starts with 'schema: 1' "
                                 "(see jobs/quickstart.yaml)")])
    if not isinstance(raw, dict):
        raise SpecError(shown, problems + [("", f"expected a mapping of keys at the top level, "
                                            f"got {describe(raw)} (see jobs/quickstart.yaml)")])
    return raw, problems


# -- YAML ------------------------------------------------------------------------------------
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


def parse_yaml(text: str) -> tuple[Any, list[tuple[str, str]]]:
    """(the data or None, [(where, message)]) for a spec file's text."""
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


# -- overrides -------------------------------------------------------------------------------
def apply_overrides(raw: dict, overrides: Iterable[str], report: Report) -> None:
    """Set each ``key=value`` in ``raw``; ``report.origins`` notes the field it set."""
    for text in overrides:
        key, eq, value = str(text).partition("=")
        key = key.strip()
        if not eq or not _OVERRIDE.match(key):
            report.problems.append(("overrides", f"'{text}' is not key=value with a dotted key "
                                    "(e.g. train.epochs=2, methods[0].params.batch_size=8)"))
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        steps = _steps(key)
        problem = _set(raw, steps, parsed, text)
        if problem:
            report.problems.append(problem)
        else:
            report.origins[field_path(tuple(steps))] = text


def _steps(key: str) -> list[str | int]:
    """'methods[0].params.n' -> ['methods', 0, 'params', 'n']."""
    steps: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        steps.append(name)
        steps += [int(i) for i in re.findall(r"\d+", "[" + rest if rest else "")]
    return steps


def _set(raw: dict, steps: list[str | int], value: Any, text: str) -> tuple | None:
    """Set ``value`` at ``steps`` (creating missing mappings); a problem if it cannot."""
    node, where = raw, ()
    for i, step in enumerate(steps):
        shown = field_path(where)
        if isinstance(step, int):
            if not isinstance(node, list):
                return (where, f"override '{text}': {shown} is {describe(node)}, not a list; "
                        f"cannot take [{step}]")
            if step >= len(node):
                return (where + (step,), f"override '{text}': there is no "
                        f"{field_path(where + (step,))}; {shown} has {len(node)} "
                        f"entr{'y' if len(node) == 1 else 'ies'}")
        elif not isinstance(node, dict):
            return (where, f"override '{text}': {shown} is {describe(node)}, not a mapping; "
                    f"cannot set '{step}'")
        if i == len(steps) - 1:
            node[step] = value
            return None
        if isinstance(step, str) and node.get(step) is None:
            if isinstance(steps[i + 1], int):
                return (where + (step,), f"override '{text}': {field_path(where + (step,))} "
                        "is not set; cannot index it")
            node[step] = {}
        node, where = node[step], where + (step,)
    return None
