"""The one exception type users see: a message that names the file and the reason."""


class MtlError(Exception):
    """A user-facing error (bad input, missing asset, unsupported checkpoint).

    Command-line scripts print ``str(error)`` as one line and exit with status 2;
    library callers can catch it. Never raised for programming errors.
    """


class Interrupted(MtlError):
    """SIGINT / SIGTERM during training: a checkpoint was saved; exit with ``exit_code`` (130 / 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
