"""What every script shares: user errors become one message and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main``; an :class:`MtlError` prints its message (no traceback) and returns 2."""
    from mtl_jax.errors import Interrupted, MtlError

    try:
        return main()
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except MtlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
