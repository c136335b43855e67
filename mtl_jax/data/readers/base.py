"""What every reader shares: the record it yields (:class:`Row`), a JSON value as a column's
text, a file's text, and the registry that picks a reader by a file's suffix (or ``format:``).

A reader is a function ``read(path, columns, options) -> Iterable[Row]`` that streams its file (a
generator: no reader holds a whole file; a keyword
``optional``: columns it reads where the file has them) registered with
:func:`register` under a name, the suffixes it reads and, when it has options of its own (a CSV's
``header``), their frozen dataclass (see :mod:`mtl_jax.options`): a task's config keys of that
name reach the reader as that dataclass. A new format is one new module.
"""

from __future__ import annotations

import bz2
import gzip
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mtl_jax.errors import MtlError
from mtl_jax.options import declared, parsed

COMPRESSED = (".gz", ".bz2")  # a reader's suffix may end with one of these


@dataclass
class Row:
    line: int  # 1-based line where the record starts (a columnar file's row number)
    fields: dict[str, Any]
    problem: str | None = None  # set when the record itself is malformed


class Reader(NamedTuple):
    read: Callable[..., Iterable[Row]]  # (path, columns, options[, optional=columns read where present])
    suffixes: tuple[str, ...]  # lower case, with the dot (a folder reader: none)
    options: type | None = None  # the frozen dataclass of its options
    folder: bool = False  # reads a folder, not a file
    optional: bool = False  # takes ``optional=`` columns (read where a file has them)


READERS: dict[str, Reader] = {}


def register(name: str, suffixes: Sequence[str] = (), options: type | None = None, folder: bool = False):
    """``@register("csv", [".csv"], CsvOptions)``: the function reads format ``name``."""

    def add(read):
        READERS[name] = Reader(read, tuple(s.lower() for s in suffixes), options, folder, takes_optional(read))
        return read

    return add


def takes_optional(read: Callable) -> bool:
    """Whether a reader function takes the ``optional`` keyword."""
    return "optional" in inspect.signature(read).parameters


def option_names() -> set[str]:
    """Every option a registered reader declares (a task's config may set them)."""
    return {f.name for r in READERS.values() for f in declared(r.options)}


def suffixes() -> list[str]:
    """Every suffix a reader reads, in registration order."""
    return [s for r in READERS.values() for s in r.suffixes]


def format_of(path: Path) -> str:
    """The reader of ``path`` by its suffix (a compressed suffix aside), or a folder's reader."""
    if path.is_dir():
        return next((name for name, r in READERS.items() if r.folder), "")
    name = path.name.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    for fmt, reader in READERS.items():
        if any(name.endswith(s) for s in reader.suffixes):
            return fmt
    folder = [n for n, r in READERS.items() if r.folder]
    known = (
        ", ".join(suffixes())
        + f" (optionally {'/'.join(COMPRESSED)})"
        + (f", or a {folder[0]} folder" if folder else "")
    )
    raise MtlError(f"{path}: unknown format (use {known})")


def read_rows(
    path: Path,
    columns: Sequence[str],
    fmt: str | None = None,
    options: Mapping | None = None,
    optional: Sequence[str] = (),
) -> Iterable[Row]:
    """Every record of a file (or folder), read as it is iterated, with the line (row) it starts on; ``fmt`` (default: from the
    suffix) picks the reader; ``options``: a task's reader options by name (the reader takes its own);
    ``optional``: columns read where the file has them (a row without one has no such field).

    Missing columns are a file-level error; malformed records come back with ``problem`` set.
    """
    if not path.exists():
        raise MtlError(f"{path}: file not found")
    fmt = fmt or format_of(path)
    if fmt not in READERS:
        raise MtlError(f"{path}: unknown format {fmt!r} (known: {', '.join(READERS)})")
    reader = READERS[fmt]
    own = None
    if reader.options is not None:
        names = {f.name for f in declared(reader.options)}
        own = reader.options(**parsed(reader.options, {k: v for k, v in (options or {}).items() if k in names}))
    if not optional:
        return reader.read(path, columns, own)
    if not reader.optional:
        raise MtlError(f"{path}: the {fmt} reader cannot read optional columns ({', '.join(optional)})")
    return reader.read(path, columns, own, optional=optional)


def json_field(value) -> str | tuple | None:
    """A JSON (or Arrow) value as the text a column holds: a number as written in a CSV (``1.0`` is
    ``1``), NaN and null as a missing value, a list as a tuple of such texts (tokens, tags, label sets)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, list):
        return tuple(json_field(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def text_lines(path: Path) -> Iterator[str]:
    """A file's lines as they are read (endings kept, a byte-order mark dropped); undecodable bytes
    become lone surrogates so the row can be named."""
    if not path.is_file():
        raise MtlError(f"{path}: file not found")
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            yield from f
    except EOFError as e:  # gzip / bz2: the archive ends early
        raise MtlError(f"{path}: cannot read (truncated archive: {e})") from None
    except OSError as e:
        raise MtlError(f"{path}: cannot read ({e})") from None
