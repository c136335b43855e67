"""Readers of columnar files: Parquet, and a Hugging Face ``datasets`` folder written by
``save_to_disk`` (its Arrow files read with pyarrow: no ``datasets`` package, no network).

A record's "line" is its row number (1-based). Values come back as the text readers give them: a
number as text, a list as a tuple; a ``datasets`` ClassLabel id as its name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet

from mtl_jax.data.readers.base import Row, json_field, register
from mtl_jax.errors import MtlError

BATCH_ROWS = 65_536  # rows converted to Python at a time


@register("parquet", [".parquet"])
def read_parquet(path: Path, columns: Sequence[str], options=None, optional: Sequence[str] = ()) -> Iterator[Row]:
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        columns = _check_columns(path, columns, parquet.schema_arrow.names, optional)
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise MtlError(f"{path}: cannot read as Parquet ({e})") from None
    yield from _rows(_arrow_errors(path, batches, "as Parquet"), columns, {})


@register("datasets", folder=True)
def read_datasets_folder(
    path: Path, columns: Sequence[str], options=None, optional: Sequence[str] = ()
) -> Iterator[Row]:
    """A ``Dataset.save_to_disk`` folder: ``state.json`` lists its Arrow files (stream format), read
    memory-mapped a record batch at a time."""
    state, info = path / "state.json", path / "dataset_info.json"
    if not state.is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file()) if path.is_dir() else []
        hint = f" (a DatasetDict: name one of its splits, {', '.join(splits)})" if splits else ""
        raise MtlError(f"{path}: not a datasets folder: no state.json{hint}")
    try:
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        readers = [pyarrow.ipc.open_stream(pa.memory_map(str(f))) for f in files]
        features = json.loads(info.read_text()).get("features", {}) if info.is_file() else {}
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise MtlError(f"{path}: cannot read the datasets folder ({e})") from None
    columns = _check_columns(path, columns, readers[0].schema.names if readers else [], optional)
    names = {c: f["names"] for c, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"}
    batches = (b for r in readers for b in r)
    yield from _rows(_arrow_errors(path, batches, "the datasets folder"), columns, names)


def _arrow_errors(path: Path, batches: Iterable, what: str) -> Iterator:
    """``batches`` with a read error as the project's error naming the file."""
    try:
        yield from batches
    except (OSError, pa.ArrowException) as e:
        raise MtlError(f"{path}: cannot read {what} ({e})") from None


def _check_columns(path: Path, columns: Sequence[str], have: Sequence[str], optional: Sequence[str]) -> list[str]:
    """The columns to read: every one of ``columns`` (else an error), the ``optional`` ones the file has."""
    missing = [c for c in columns if c not in have]
    if missing:
        raise MtlError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(have)})")
    return list(columns) + [c for c in optional if c in have]


def _rows(batches: Iterable, columns: Sequence[str], class_names: dict) -> Iterator[Row]:
    line = 0
    for batch in batches:
        data = [batch.column(c).to_pylist() for c in columns]
        for values in zip(*data):
            line += 1
            fields = {}
            for c, value in zip(columns, values):
                if c in class_names and isinstance(value, int) and 0 <= value < len(class_names[c]):
                    value = class_names[c][value]
                fields[c] = json_field(value)
            yield Row(line, fields)
