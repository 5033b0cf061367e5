"""The one error type a user can cause and fix.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2. It subclasses
``ValueError`` so library callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input (path, key, shape, config value) with the fix in its text."""


def one_line(text: object) -> str:
    """``text`` with its line breaks folded, for messages quoting a library's exception."""
    return " ".join(str(text).split())
