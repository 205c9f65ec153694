"""The one exception type for errors a user can cause.

Every message says what is wrong, which file or field, and what to do; the CLI prints it
without a traceback and exits non-zero.
"""


class DitnasError(Exception):
    """A user-facing error: bad input file, bad layout string, mismatched checkpoint, ..."""
