"""What every script shares: user errors become one message and exit status 2."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mtl_jax.data.readers import format_of, read_rows, suffixes
from mtl_jax.errors import Interrupted, MtlError


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main``; an :class:`MtlError` prints its message (no traceback) and returns 2."""
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
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141


def parse_config(cls, argv: list[str], description: str):
    """``cls`` (a :class:`TrainConfig` dataclass) from flags; a ``--config`` file sets defaults that flags override."""
    import dataclasses

    import tyro

    from mtl_jax.config import load_config_file

    defaults = cls()
    config_file = _config_arg(argv)
    if config_file:
        defaults = dataclasses.replace(defaults, config=config_file, **load_config_file(config_file))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            cfg = tyro.cli(cls, default=defaults, args=argv, description=description)
    except SystemExit as e:
        if e.code:  # tyro's framed error box becomes one line naming the flag
            raise MtlError(_one_line(captured.getvalue())) from None
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr.write(captured.getvalue())
    return cfg


def _one_line(box: str) -> str:
    """A framed terminal message on one line: without the frame, the flag's help text and the pointer to --help."""
    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", box).split())  # box-drawing characters out
    text = re.split(r"\s*(?:Argument helptext:|For full helptext,)", text)[0]
    return re.sub(r"^(?:Invalid choice|Parsing error|Value error|Required options|Unrecognized options?)\s+", "", text)


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def read_lines(path: str | None) -> list[str]:
    """Lines of a UTF-8 text file (stdin when ``path`` is None), or a one-line error naming the file."""
    try:
        if path is None:
            return sys.stdin.read().splitlines()
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MtlError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise MtlError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except OSError as e:
        raise MtlError(f"{path}: cannot read ({e.strerror})") from None


def add_dtype_option(parser) -> None:
    """``--dtype float32 | bfloat16``: the encoder's compute dtype when embedding or predicting."""
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype (bfloat16: faster on GPUs, TPUs and bf16 CPUs; default: %(default)s)",
    )


def read_input(path: str | None, columns: list[str]) -> list:
    """Texts (one column) or pairs (two) from a data file a reader reads; lines of a text file or stdin."""
    if path is None or not is_data_file(Path(path)):
        if len(columns) > 1:
            raise MtlError(f"--text-columns needs --input with a data file ({', '.join(suffixes())})")
        return read_lines(path)
    out = []
    for r in read_rows(Path(path), columns):
        missing = [c for c in columns if r.fields.get(c) is None or not str(r.fields[c]).strip()]
        if r.problem or missing:
            raise MtlError(f"{path}:{r.line}: {r.problem or f'no text in field {missing[0]!r}'}")
        out.append(r.fields[columns[0]] if len(columns) == 1 else tuple(r.fields[c] for c in columns))
    return out


def is_data_file(path: Path) -> bool:
    """Whether a reader reads ``path`` (else it is plain text, one input per line)."""
    try:
        return bool(format_of(path))
    except MtlError:
        return False
