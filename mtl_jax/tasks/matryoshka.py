"""Matryoshka embeddings, what the embedding types share (retrieval, bi-encoded similarity): the
``matryoshka_dims`` option, the check against the encoder's size, and each size's primary score in
report.md and a plot. The types' losses add, for each size, their own loss over the re-normalised
first dimensions of the one forward pass, times the size's weight (``matryoshka_weights``, as
sentence-transformers' MatryoshkaLoss weighs them; 1 each by default)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from mtl_jax.errors import MtlError
from mtl_jax.options import option, sizes, weights


@dataclasses.dataclass(frozen=True)
class MatryoshkaOptions:
    matryoshka_dims: Optional[tuple[int, ...]] = option(
        None, "Matryoshka: the loss summed over these leading sizes of the embedding, each re-normalised", parse=sizes
    )
    matryoshka_weights: Optional[tuple[float, ...]] = option(
        None, "Matryoshka: each size's weight in that sum, largest size first (default: 1 each)", parse=weights
    )


class Matryoshka:
    """For a task type whose options include :class:`MatryoshkaOptions`; ``sized``: its primary
    metric's name in reports and the key it has at each size (``{key}@{d}``)."""

    sized: tuple[str, str] = ("", "")

    @property
    def dims(self) -> tuple[int, ...]:
        """The Matryoshka sizes (none: the whole embedding only)."""
        return self.options.matryoshka_dims or ()

    def weight(self, d: int) -> float:
        """The loss weight of the leading size ``d`` (1 for a size not listed: the whole embedding's)."""
        return dict(zip(self.dims, self.options.matryoshka_weights or ())).get(d, 1.0)

    def check_weights(self) -> None:
        given = self.options.matryoshka_weights
        if given is not None and len(given) != len(self.dims):
            raise MtlError(
                f"task {self.name}: matryoshka_weights needs one weight per size of matryoshka_dims "
                f"{list(self.dims)}, got {list(given)}"
            )

    def sized_keys(self) -> tuple[str, ...]:
        return tuple(f"{self.sized[1]}@{d}" for d in self.dims)

    def check_encoder(self, dim: int) -> None:
        if self.dims and self.dims[0] > dim:
            raise MtlError(f"task {self.name}: matryoshka_dims {list(self.dims)} exceed the encoder's {dim} dimensions")

    def sized_report(self, summary: dict, count: str) -> list[str]:
        """report.md's lines for the sizes (none without them)."""
        if not self.dims:
            return []
        label, key = self.sized
        columns = tuple((f"{label} at {d}", f"{key}@{d}") for d in self.dims)
        return [
            "",
            "Matryoshka: the embedding cut to its first dimensions (re-normalised):",
            "",
            *self.split_table(summary, columns, count=count),
            "",
            f"![matryoshka](matryoshka_{self.name}.png)",
        ]

    def plots(self, result: dict, folder: Path) -> list[str]:
        if not self.dims:
            return []
        from mtl_jax.outputs.plots import plot_sizes

        label, key = self.sized
        name = f"matryoshka_{self.name}.png"
        scores = {d: result[f"{key}@{d}"] for d in self.dims}
        plot_sizes(scores, result[key], f"{self.name} (test): {label} by embedding size", folder / name)
        return [name]
