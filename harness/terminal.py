"""One place that decides how the harness writes to the terminal.

Every command prints through :func:`make_console`: tables use the terminal's width (or a
fixed width when stdout is a pipe, so logs and CI output stay readable), and plain lines are
never wrapped, so a printed path or command can be copied (or parsed) as one line.
"""
from __future__ import annotations

import sys

from rich.console import Console

PIPE_WIDTH = 160


def make_console(stderr: bool = False, width: int | None = None) -> Console:
    """A rich Console that wraps tables to the terminal but never wraps plain lines."""
    stream = sys.stderr if stderr else sys.stdout
    if width is None and not stream.isatty():
        width = PIPE_WIDTH
    return Console(stderr=stderr, width=width, soft_wrap=True)
