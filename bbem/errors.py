"""The one error type a user can cause and fix.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2. It subclasses
``ValueError`` so library callers that already catch ``ValueError`` keep working.
"""


class UserError(ValueError):
    """A mistake in the user's input (path, key, shape, config value) with the fix in its text."""
