"""The one exception type users see: a message that names the file and the reason."""


class MtlError(Exception):
    """A user-facing error (bad input, missing asset, unsupported checkpoint).

    Command-line scripts print ``str(error)`` as one line and exit with status 2;
    library callers can catch it. Never raised for programming errors.
    """
