"""The one error type users see: a single line naming the file and the problem (exit code 2)."""


class TqsError(Exception):
    """A problem with the user's input (file, spec, plan, option), reported in one line."""
