"""JSON lines (``.jsonl``, ``.json``, ``.ndjson``; optionally .gz / .bz2): one object per line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from mtl_jax.data.readers.base import Row, json_field, register, text_lines
from mtl_jax.errors import MtlError


@register("jsonl", [".jsonl", ".json", ".ndjson"])
def read_jsonl(path: Path, columns: Sequence[str], options=None, optional: Sequence[str] = ()) -> Iterator[Row]:
    wanted = list(columns) + list(optional)
    seen: set = set()  # the wanted fields some record has
    any_rows = False
    for n, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        any_rows = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(n, {}, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            yield Row(n, {}, "expected a JSON object")
            continue
        fields = {c: json_field(obj[c]) for c in wanted if c in obj}
        if len(seen) < len(wanted):
            seen.update(fields)
        yield Row(n, fields)
    missing = [c for c in columns if c not in seen]
    if any_rows and missing:
        raise MtlError(f"{path}: no field {', '.join(map(repr, missing))} in any record")
