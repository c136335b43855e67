"""The CoNLL reader (``format: conll``, or a ``.conll`` file): one token per line with its tag in
the last column (the token in the first), a blank line between sentences, ``-DOCSTART-`` lines
skipped. A sentence becomes one record whose "line" is its first token's line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtl_jax.data.readers.base import Row, read_text, register


@register("conll", [".conll"])
def read_conll(path: Path, columns: Sequence[str], options=None, optional: Sequence[str] = ()) -> list[Row]:
    """Records ``{columns[0]: words, columns[1]: tags}`` (the tagging task's tokens and label columns)."""
    text = read_text(path)
    tokens_col, tags_col = columns
    rows, words, tags, start = [], [], [], 0
    for n, line in enumerate(text.splitlines() + [""], start=1):
        parts = line.split()
        if parts and parts[0] == "-DOCSTART-":
            continue
        if not parts:
            if words:
                rows.append(Row(start, {tokens_col: tuple(words), tags_col: tuple(tags)}))
            words, tags = [], []
            continue
        if not words:
            start = n
        if len(parts) < 2:
            rows.append(Row(n, {}, f"expected a token and a tag, got {line.strip()!r}"))
            continue
        words.append(parts[0])
        tags.append(parts[-1])
    return rows
