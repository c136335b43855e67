"""CSV and TSV files (optionally .gz / .bz2): a header row names the columns, unless the task's
``header`` option names them for a file without one; ``quoting: false`` reads quote characters as
text (GLUE's TSVs)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mtl_jax.data.readers.base import Row, register, text_lines
from mtl_jax.errors import MtlError
from mtl_jax.options import names, option


@dataclass(frozen=True)
class DelimitedOptions:
    header: Optional[tuple[str, ...]] = option(None, "the column names of a file without a header row", parse=names)
    quoting: bool = option(True, "false: quote characters are text (GLUE's TSVs)")


@register("csv", [".csv"], DelimitedOptions)
def read_csv(
    path: Path, columns: Sequence[str], options: DelimitedOptions, optional: Sequence[str] = ()
) -> Iterator[Row]:
    return delimited_rows(path, text_lines(path), columns, ",", options, optional)


@register("tsv", [".tsv"], DelimitedOptions)
def read_tsv(
    path: Path, columns: Sequence[str], options: DelimitedOptions, optional: Sequence[str] = ()
) -> Iterator[Row]:
    return delimited_rows(path, text_lines(path), columns, "\t", options, optional)


def delimited_rows(
    path: Path,
    lines: Iterable[str],
    columns: Sequence[str],
    delimiter: str,
    options: DelimitedOptions,
    optional: Sequence[str] = (),
) -> Iterator[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long text is data (the tokenizer truncates it)
    quoting = csv.QUOTE_MINIMAL if options.quoting else csv.QUOTE_NONE
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    try:
        header = list(options.header) if options.header else next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise MtlError(f"{path}:1: malformed header ({e})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise MtlError(f"{path}:1: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    index = {c: header.index(c) for c in [*columns, *optional] if c in header}
    start = reader.line_num + 1
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield Row(start, {}, f"malformed record ({e})")
            start = reader.line_num + 1
            continue
        if rec:
            if len(rec) != len(header):
                hint = " (an unterminated quote?)" if len(rec) < len(header) and "\n" in rec[-1] else ""
                yield Row(start, {}, f"{len(rec)} fields, header has {len(header)}{hint}")
            else:
                yield Row(start, {c: rec[i] for c, i in index.items()})
        start = reader.line_num + 1
