"""A small generic name -> entry registry with "did you mean" errors.

Two instances exist: ``methods.REGISTRY`` (explanation methods) and
``backbones.REGISTRY`` (classifiers split into feature extractor and head).
An entry is registered with a decorator; its registered name is its public,
MLflow-safe key (letters, digits, ``_ - . /``). Duplicate names are errors, and
an unknown name is answered with the closest names and the full list.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists close matches and all names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    low = {c.lower().replace("-", "").replace("_", ""): c for c in choices}
    key = str(name).lower().replace("-", "").replace("_", "")
    if key in low:
        return f" Did you mean '{low[key]}'?"
    close = difflib.get_close_matches(str(name), list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


@dataclass(frozen=True)
class Entry:
    """One registered object: its key, the factory, and its metadata."""

    name: str
    factory: Callable[..., Any]
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Maps public names to factories with metadata (e.g. family, paper, version)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable:
        def decorate(factory: Callable) -> Callable:
            key = name or factory.__name__
            if not _SAFE_KEY.match(key):
                raise ValueError(f"{self.kind} name {key!r} is not MLflow-safe")
            if key in self._entries:
                raise ValueError(f"duplicate {self.kind} name {key!r}")
            self._entries[key] = Entry(key, factory, dict(meta))
            return factory

        return decorate

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: Any) -> str:
        names = self.names()
        return (f"unknown {self.kind} {name!r}.{did_you_mean(str(name), names)}"
                f" Available: {', '.join(names)}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[k] for k in self.names())

    def __len__(self) -> int:
        return len(self._entries)
