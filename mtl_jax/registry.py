"""Registries of pluggable kinds (task types, loss-weighting methods): a new kind is a new module
whose class registers itself under its name."""

from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict, attribute: str) -> Callable:
    """``register(name)``, a class decorator that puts the class into ``table`` under ``name`` and
    sets its ``attribute`` to the name (the registration order is the order ``table`` lists)."""

    def register(name: str):
        def add(cls):
            setattr(cls, attribute, name)
            table[name] = cls
            return cls

        return add

    return register
