"""Options declared beside what they configure.

A task type, a loss-weighting method or a reader lists its options as fields of a small frozen
dataclass with :func:`option` (default, help text, the range a value must be in); the command
line's flags, the config file's keys, the checks of their values and what an export keeps are
derived from those declarations (:mod:`mtl_jax.config`), so a new kind with options of its own is
one new module. A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class Rule(NamedTuple):
    """A value's range: ``test(value)`` holds for a good one; ``want`` says it in words."""

    test: Callable[[Any], bool]
    want: str


AT_LEAST_1 = Rule(lambda v: v >= 1, "at least 1")
POSITIVE = Rule(lambda v: v > 0, "positive")
NON_NEGATIVE = Rule(lambda v: v >= 0, "0 or more")
FRACTION = Rule(lambda v: 0 <= v <= 1, "between 0 and 1")


def option(default, doc: str, rule: Rule | None = None, parse: Callable[[Any], Any] | None = None):
    """A declared option: its default, its help text, its range (None passes any rule) and how a
    config file's value becomes the option's (``parse``: a list into a tuple, say)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "rule": rule, "parse": parse})


def declared(cls) -> tuple[dataclasses.Field, ...]:
    """The options ``cls`` declares (its fields made with :func:`option`), in order."""
    if not dataclasses.is_dataclass(cls):
        return ()
    return tuple(f for f in dataclasses.fields(cls) if "doc" in f.metadata)


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def parsed(cls, values: Mapping[str, Any]) -> dict:
    """``values`` (of ``cls``'s options) as the options take them (see :func:`option`'s ``parse``; a
    ``ValueError`` it raises becomes ``ValueError("<option>: <reason>")``)."""
    parse = {f.name: f.metadata["parse"] for f in declared(cls)}
    out = {}
    for key, value in values.items():
        try:
            out[key] = parse[key](value) if parse.get(key) and value is not None else value
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None
    return out


def names(value) -> tuple[str, ...]:
    """A list of names (columns, labels) as a tuple of strings."""
    if isinstance(value, str):
        raise ValueError(f"expected a list, got {value!r}")
    return tuple(str(x) for x in value)


def sizes(value) -> tuple[int, ...]:
    """A list of positive whole numbers (embedding sizes), largest first."""
    if isinstance(value, (str, int)):
        raise ValueError(f"expected a list, got {value!r}")
    out = tuple(int(x) for x in value)
    if not out or min(out) < 1 or any(float(x) != int(x) for x in value):
        raise ValueError(f"expected positive whole numbers, got {value!r}")
    return tuple(sorted(set(out), reverse=True))


def weights(value) -> tuple[float, ...]:
    """A list of non-negative numbers (loss weights), in the order given."""
    if isinstance(value, (str, int, float)):
        raise ValueError(f"expected a list, got {value!r}")
    try:
        out = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"expected numbers, got {value!r}") from None
    if not out or min(out) < 0:
        raise ValueError(f"expected non-negative numbers, got {value!r}")
    return out


def number_pair(value) -> tuple[float, float]:
    """``[low, high]`` as two floats, low below high."""
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"expected [low, high], got {value!r}") from None
    if not lo < hi:
        raise ValueError(f"low {lo} must be below high {hi}")
    return lo, hi


def violations(cls, values: Mapping[str, Any], flag: Callable[[str], str]) -> list[str]:
    """``"<flag> <value>: must be <want>"`` for each option of ``cls`` whose value in ``values`` (its
    default when absent) breaks its rule; ``flag(name)`` names the option as the user wrote it."""
    out = []
    for f in declared(cls):
        value, rule = values.get(f.name, default_of(f)), f.metadata["rule"]
        if rule is not None and value is not None and not rule.test(value):
            out.append(f"{flag(f.name)} {value}: must be {rule.want}")
    return out
