"""The one error type that crosses the core/UI boundary: it says what went wrong and what to do."""


class BricklabError(Exception):
    """A user-facing error; `str(err)` is a complete sentence with the fix."""

    def __init__(self, message: str, hint: str = ""):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip())
