"""The CoNLL reader (``format: conll``, or a ``.conll`` file): one token per line with its tag in
the last column (the token in the first), a blank line between sentences, ``-DOCSTART-`` lines
skipped. A sentence becomes one record whose "line" is its first token's line."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from mtl_jax.data.readers.base import Row, register, text_lines


@register("conll", [".conll"])
def read_conll(path: Path, columns: Sequence[str], options=None, optional: Sequence[str] = ()) -> Iterator[Row]:
    """Records ``{columns[0]: words, columns[1]: tags}`` (the tagging task's tokens and label columns)."""
    tokens_col, tags_col = columns
    words, tags, start = [], [], 0
    for n, line in enumerate(itertools.chain(text_lines(path), [""]), start=1):
        parts = line.split()
        if parts and parts[0] == "-DOCSTART-":
            continue
        if not parts:
            if words:
                yield Row(start, {tokens_col: tuple(words), tags_col: tuple(tags)})
            words, tags = [], []
            continue
        if not words:
            start = n
        if len(parts) < 2:
            yield Row(n, {}, f"expected a token and a tag, got {line.strip()!r}")
            continue
        words.append(parts[0])
        tags.append(parts[-1])
