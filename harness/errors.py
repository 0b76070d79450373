"""The one base class for problems the user can fix: a bad spec, input, location or option.

The command line catches ``UserError`` in one place (``harness.cli.main``), prints its message
and exits with code 2; by then nothing has been started or half-written. Anything else that
goes wrong is a runtime failure (exit 1). Subclasses live beside the code that raises them.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem in what the user asked for; ``str(err)`` says what is wrong and the fix."""

    exit_code = 2
