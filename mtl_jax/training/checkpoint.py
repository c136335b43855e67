"""Training checkpoints (orbax) for exact resume.

Checkpoints live in ``<run>/checkpoints/<step>/`` and hold the train state (params,
optimizer state, step), the running metric sums, and a JSON ``meta`` with the data
pipeline's position (epoch, batches done in it), the best epoch so far and timing.
orbax writes each into a temporary folder and renames it when complete, so a
checkpoint cut short by a crash is never listed nor restored. The newest ``keep``
and the best (by the mean of the tasks' validation primary scores) are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax

from mtl_jax.errors import MtlError


class Checkpoints:
    """A thin layer over ``orbax.checkpoint.CheckpointManager`` with the fallbacks a user needs."""

    def __init__(self, folder: Path, keep: int = 2):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.ERROR)
        self.folder = Path(folder).absolute()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            create=True,
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=keep),
                    policies.BestN(
                        get_metric_fn=lambda m: m["score"],
                        reverse=False,
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
        )
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, score: float | None = None) -> None:
        ocp = self._ocp
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=None if score is None else {"score": score},
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:  # disk full, permissions, ...: the previous checkpoints are untouched
            for partial in self.folder.glob(f"{step}.orbax-checkpoint-tmp*"):  # frees what the failed write took
                shutil.rmtree(partial, ignore_errors=True)
            previous = [s for s in self.steps() if s != step]
            kept = f"; the checkpoint at step {previous[-1]} is intact" if previous else ""
            raise MtlError(
                f"{self.folder / str(step)}: could not save checkpoint ({type(e).__name__}: {e}){kept}"
            ) from None

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["meta"])

    def restore_meta(self, step: int) -> dict:
        path = self.folder / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MtlError(f"{path}: unreadable checkpoint metadata ({e})") from None

    def close(self) -> None:
        self.manager.close()


def restore_latest(ckpts: Checkpoints, make_target, check_meta, log) -> tuple[Any, dict, int] | None:
    """The newest checkpoint that restores, falling back (and saying so) past damaged ones, which are
    moved aside to ``damaged-<step>`` and kept.

    ``check_meta(meta, where)`` raises :class:`MtlError` for a checkpoint this version cannot resume
    (another format): that stops the restore with nothing moved. ``make_target(meta)`` builds the
    pytree whose structure the saved state has.
    """
    for step in reversed(ckpts.steps()):
        where = ckpts.folder / str(step)
        try:
            meta = ckpts.restore_meta(step)
        except MtlError as e:
            _set_aside(ckpts, where, step, str(e), log)
            continue
        check_meta(meta, where)
        try:
            state, meta = ckpts.restore(step, make_target(meta))
            return state, meta, step
        except Exception as e:
            _set_aside(ckpts, where, step, str(e).splitlines()[0] if str(e) else type(e).__name__, log)
    return None


def _set_aside(ckpts: Checkpoints, where: Path, step: int, reason: str, log) -> None:
    aside = where.with_name(f"damaged-{step}")
    shutil.rmtree(aside, ignore_errors=True)
    where.rename(aside)  # kept for inspection, out of the manager's way
    ckpts.manager.reload()
    log(f"{where}: checkpoint is damaged or unreadable ({reason[:200]}); moved to {aside.name}, trying an older one")
