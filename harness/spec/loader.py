"""Reading a spec file: the YAML, its ``include:`` bases (``harness.spec.includes``), the
``key=value`` overrides, then ``load_spec``.

The YAML is read with a ``yaml.SafeLoader`` subclass (nothing is ever constructed, imported
or run) that also reports a key repeated within one mapping (plain YAML silently keeps the
last one) and a character YAML refuses (a NUL byte: a binary file or a wrong encoding).
Overrides (``train.epochs=2``, ``methods[0].params.batch_size=8``; the value is read with
the same loader) are applied to the raw mapping before validation; the report remembers
which field each set, and a path it cannot apply is itself a problem.

Hostile or mistaken files are refused before they can exhaust the machine, each as one
problem naming the file (exit 2):

- a file over ``MAX_SPEC_BYTES`` (1 MiB; specs are a few KB) is not read;
- values nested deeper than ``MAX_DEPTH`` (50; specs nest about 5), or more than
  ``MAX_VALUES`` (100,000) of them, are refused while the YAML is composed, before
  Python's recursion limit is reached;
- anchors and aliases (``&name``, ``*name``) are allowed, but a document whose aliases
  expand it to more than ``MAX_VALUES`` (100,000) values (an "alias bomb": each alias
  repeats a value made of aliases), nest it deeper than ``MAX_DEPTH``, or make a value
  contain itself is refused; the expanded size is counted over the composed nodes, shared
  nodes once each, without building anything;
- messages quote at most an excerpt of a long value: a string of the file or an override
  longer than ``EXCERPT`` (200) characters, or a bracketed rendering of a list or mapping
  that long, is shown as its start and end with the count of characters left out; a
  message is at most ``MAX_MESSAGE`` characters and at most ``MAX_LISTED`` problems are
  listed (with the count of the others).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from harness.spec.problems import Report, SpecError, field_path
from harness.spec.values import describe

MAX_SPEC_BYTES = 1 << 20       # 1 MiB
MAX_DEPTH = 50                 # nesting of lists and mappings
MAX_VALUES = 100_000           # YAML nodes of a document with its aliases expanded
EXCERPT = 200                  # characters of a long value a message quotes
MAX_MESSAGE = 2_000            # characters of one problem (the longest real one: ~1,100)
MAX_LISTED = 20                # problems listed in one report

_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*$")


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = (), sweep: bool = False):
    """Read, override, validate and resolve a spec file; raises ``SpecError``.

    ``sweep=True`` reads a sweep spec (``harness tune``): its ``sweep`` section is required
    and validated (``spec.sweep``); otherwise a ``sweep`` key is refused."""
    from harness.spec.build import build_spec

    from harness.spec.includes import IncludeProblem, resolve

    shown, file = str(path), Path(path)
    raw, yaml_problems = _read(shown, file)

    def read_base(base: Path) -> dict:          # a base spec: the same limits, its own name
        base_raw, base_problems = _read(str(base), base)
        if base_problems:
            raise refusal(str(base), base_problems, base_raw)
        return base_raw

    try:
        raw = resolve(raw, file, read_base)
    except IncludeProblem as err:
        raise refusal(shown, [("include", str(err))]) from None
    report = Report(file.resolve().parent)
    report.problems += yaml_problems
    overrides = [str(o) for o in overrides]
    apply_overrides(raw, overrides, report)
    spec = build_spec(raw, report, file, sweep=sweep)
    if report.problems:
        raise refusal(shown, report.ordered(raw), raw, overrides)
    spec.path = shown
    return spec


def _read(shown: str, file: Path) -> tuple[dict, list]:
    """(the top-level mapping, the YAML's own problems); SpecError when there is none."""
    if not file.is_file():
        raise refusal(shown, [("", _not_found(shown, file))])
    try:
        size = file.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise refusal(shown, [("", _too_large(size))])
        with file.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:              # it grew since stat()
            raise refusal(shown, [("", _too_large(len(data)))])
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise refusal(shown, [("", f"cannot read the file: {err}")]) from None
    raw, problems = parse_yaml(text)
    if problems and raw is None:
        raise refusal(shown, problems, text=text)
    if raw is None:
        raise refusal(shown, [("", "the file is empty; a spec starts with 'schema: 1' "
                               "(see jobs/quickstart.yaml)")])
    if not isinstance(raw, dict):
        raise refusal(shown, problems + [("", f"expected a mapping of keys at the top level, "
                                          f"got {describe(raw)} (see jobs/quickstart.yaml)")],
                      raw)
    return raw, problems


def _not_found(shown: str, file: Path) -> str:
    if file.exists():
        return "not a file"
    if _OVERRIDE.match(shown) and not shown.endswith((".yaml", ".yml")):
        return (f"file not found; if '{shown}' is meant as an override, give it a value: "
                f"{shown}=VALUE (e.g. train.epochs=2)")
    return "file not found"


def _too_large(size: int) -> str:
    return (f"the file is {size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,} bytes (1 MiB), "
            "and a few KB in practice: is this the spec file? (a short YAML file such as "
            "jobs/quickstart.yaml; images and lists of images are given by path)")


# -- YAML ------------------------------------------------------------------------------------
class LimitError(yaml.YAMLError):
    """A document over one of the loader's limits (module docstring), at ``mark``."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.problem_mark, self.message = mark, message


class _Loader(yaml.SafeLoader):
    """SafeLoader that records keys repeated within one mapping and refuses documents
    nested deeper than ``MAX_DEPTH`` or whose aliases expand them past the limits."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any, int]] = []
        self.depth, self.aliases, self.nodes = 0, 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        else:
            self.nodes += 1
            if self.nodes > MAX_VALUES:
                raise LimitError(self.peek_event().start_mark, _too_many())
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise LimitError(self.peek_event().start_mark, _too_deep())
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if self.aliases:
            _check_expansion(node)
        return node


def _too_many(aliases: bool = False) -> str:
    return ((f"aliases (*name) expand this value to more than {MAX_VALUES:,} values (an alias "
             "bomb?)" if aliases else f"the file holds more than {MAX_VALUES:,} values")
            + "; a spec has a few hundred: " + ("write the values out, or repeat fewer aliases"
                                                if aliases else "is this the spec file?"))


def _too_deep() -> str:
    return (f"values nested more than {MAX_DEPTH} levels deep; a spec nests a few (see "
            "jobs/quickstart.yaml)")


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root) -> None:
    """Refuse a composed document whose aliases expand it past ``MAX_VALUES`` values or
    ``MAX_DEPTH`` levels, or make a value contain itself (LimitError). Iterative, each
    shared node visited once: (expanded size, depth) of every node, children first."""
    done: dict[int, tuple[int, int]] = {}
    active: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = [done[id(k)] for k in _children(node)]
            size = 1 + sum(k[0] for k in kids)
            depth = 1 + max((k[1] for k in kids), default=0)
            active.discard(key)
            if size > MAX_VALUES:
                raise LimitError(node.start_mark, _too_many(aliases=True))
            if depth > MAX_DEPTH:
                raise LimitError(node.start_mark, _too_deep() + " once its aliases are "
                                 "expanded")
            done[key] = (size, depth)
            continue
        if key in done:
            continue
        if key in active:
            raise LimitError(node.start_mark, "an alias (*name) is used inside the value it "
                             "names, so the value would contain itself; write it out")
        active.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in done)


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
    except LimitError as err:
        mark = err.problem_mark
        return None, [(f"line {mark.line + 1}, column {mark.column + 1}" if mark else "",
                       f"refused: {err.message}")]
    except RecursionError:                   # not reached within MAX_DEPTH; a safety net
        return None, [("", f"refused: {_too_deep()}")]
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


def _load_value(text: str) -> Any:
    """An override's value, read as ``yaml.safe_load`` would, under the loader's limits."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise LimitError(None, _too_deep()) from None
    finally:
        loader.dispose()


# -- refusals: short messages ----------------------------------------------------------------
def refusal(shown: str, problems: list, raw: Any = None, overrides: Iterable[str] = (),
            text: str = "") -> SpecError:
    """The ``SpecError`` of ``problems``, every long value quoted as an excerpt (strings of
    ``raw`` and the ``overrides`` longer than ``EXCERPT``, bracketed renderings that long),
    each message at most ``MAX_MESSAGE`` characters, at most ``MAX_LISTED`` listed (the
    others are kept in ``problems`` as they are)."""
    long = _long_strings(raw) | {o for o in overrides if len(o) > EXCERPT}
    if len(text) > EXCERPT:
        long.add(text)
    ordered = sorted(long, key=len, reverse=True)
    short = [(_shorten(field_path(where), ordered), _shorten(msg, ordered))
             for where, msg in problems[:MAX_LISTED]] + list(problems[MAX_LISTED:])
    return SpecError(shown, short) if len(short) <= MAX_LISTED else _Listed(shown, short)


class _Listed(SpecError):
    """A SpecError of more than ``MAX_LISTED`` problems: the first ones, then the count."""

    def format(self) -> str:
        n, rest = len(self.problems), len(self.problems) - MAX_LISTED
        lines = [f"{self.path}: {n} problems; nothing was started."]
        lines += [f"  {where}: {msg}" if where else f"  {msg}"
                  for where, msg in self.problems[:MAX_LISTED]]
        lines.append(f"  ... and {rest:,} more problem{'' if rest == 1 else 's'} not listed "
                     f"(the first {MAX_LISTED} are)")
        return "\n".join(lines)


def excerpt(value: str) -> str:
    """``value`` if at most ``EXCERPT`` characters, else its start and end around the
    count of characters left out."""
    if len(value) <= EXCERPT:
        return value
    head, tail = value[:EXCERPT * 3 // 4], value[-(EXCERPT // 5):]
    return f"{head}[... {len(value) - len(head) - len(tail):,} characters ...]{tail}"


def _long_strings(raw: Any) -> set[str]:
    """The strings of ``raw`` (keys and values, at any depth) longer than ``EXCERPT``."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [raw]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if len(value) > EXCERPT:
                found.add(value)
        elif isinstance(value, (dict, list)) and id(value) not in seen:   # alive: ids hold
            seen.add(id(value))
            stack.extend([*value.keys(), *value.values()] if isinstance(value, dict) else value)
    return found


def _shorten(message: str, long: list[str]) -> str:
    """``message`` with the ``long`` strings (longest first) and long bracketed spans as
    excerpts, then cut to ``MAX_MESSAGE`` characters."""
    if len(message) <= EXCERPT:
        return message
    for value in long:
        if value in message:
            message = message.replace(value, excerpt(value))
    message = _shorten_brackets(message)
    if len(message) > MAX_MESSAGE:
        message = excerpt(message)
    return message


_CLOSE = {"[": "]", "{": "}", "(": ")"}


def _shorten_brackets(message: str) -> str:
    """Balanced ``[...]``/``{...}`` spans (the rendering of a list or a mapping) longer
    than ``EXCERPT`` replaced by their excerpt; quotes inside them are skipped."""
    out, i, n = [], 0, len(message)
    while i < n:
        if message[i] not in "[{":
            out.append(message[i])
            i += 1
            continue
        end = _closing(message, i)
        if end is None or end - i + 1 <= EXCERPT:
            out.append(message[i])
            i += 1
            continue
        out.append(excerpt(message[i:end + 1]))
        i = end + 1
    return "".join(out)


def _closing(text: str, start: int) -> int | None:
    """The index of the bracket closing the one at ``start``, or None."""
    stack, quote, i = [], None, start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"" and stack:
            quote = c
        elif c in _CLOSE:
            stack.append(_CLOSE[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
        elif c in ")]}":
            return None
        i += 1
    return None


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
            parsed = _load_value(value) if value.strip() else None
        except LimitError as err:
            report.problems.append(("overrides", f"override '{text}': refused: {err.message}"))
            continue
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
