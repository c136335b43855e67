"""Readers: a file (or folder) to records, by its suffix or a task's ``format``. Each module
registers its formats (see :mod:`mtl_jax.data.readers.base`); a new format is one new module
imported here."""

# ruff: noqa: I001  (the modules register their formats in this order: the error messages list them so)
from mtl_jax.data.readers import delimited  # noqa: F401
from mtl_jax.data.readers import jsonl  # noqa: F401
from mtl_jax.data.readers import columnar  # noqa: F401
from mtl_jax.data.readers import conll  # noqa: F401

from mtl_jax.data.readers.base import READERS, Row, format_of, json_field, option_names, read_rows, register, suffixes

__all__ = ["READERS", "Row", "format_of", "json_field", "option_names", "read_rows", "register", "suffixes"]
