"""The one error type that reaches the user as a single line (exit code 2), never a traceback."""


class UserError(Exception):
    """A mistake in the command line or its inputs that the user can fix."""
