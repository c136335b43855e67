"""JSON lines (``.jsonl``, ``.json``, ``.ndjson``; optionally .gz / .bz2): one object per line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mtl_jax.data.readers.base import Row, json_field, read_text, register
from mtl_jax.errors import MtlError


@register("jsonl", [".jsonl", ".json", ".ndjson"])
def read_jsonl(path: Path, columns: Sequence[str], options=None, optional: Sequence[str] = ()) -> list[Row]:
    wanted = list(columns) + list(optional)
    rows: list[Row] = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(Row(n, {}, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            rows.append(Row(n, {}, "expected a JSON object"))
            continue
        rows.append(Row(n, {c: json_field(obj[c]) for c in wanted if c in obj}))
    seen = set().union(*(r.fields.keys() for r in rows if r.problem is None)) if rows else set()
    missing = [c for c in columns if c not in seen]
    if rows and missing:
        raise MtlError(f"{path}: no field {', '.join(map(repr, missing))} in any record")
    return rows
