"""The one exception type users see: a message that names the file and the reason."""

import contextlib


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


@contextlib.contextmanager
def writing(path):
    """An ``OSError`` while writing ``path`` (disk full, quota, a file-size limit, permissions) becomes
    one :class:`MtlError` naming it: the run stops with exit status 2, its checkpoints intact."""
    try:
        yield
    except OSError as e:
        raise MtlError(f"{path}: cannot write ({e.strerror or e}); free space and resume with --resume") from None
