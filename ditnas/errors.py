"""The one exception type for errors a user can cause.

Every message says what is wrong, which file or field, and what to do; the CLI prints it
without a traceback and exits non-zero.
"""


class DitnasError(Exception):
    """A user-facing error: bad input file, bad layout string, mismatched checkpoint, ..."""


class ConfigFieldError(DitnasError):
    """A bad value of one config field (`section.field`). The message names the field; the CLI, which
    knows which flag sets it, says `--flag (section.field)` instead."""

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(f"{field}: {detail}")

    def with_flag(self, flag: str | None) -> str:
        return f"{flag} ({self.field}): {self.detail}" if flag else str(self)
