"""What the training loop does besides stepping, and when: hooks every N steps.

Each hook runs after a step whose count divides by ``every`` (or, ``before``, ahead of such a
step); at the last step of an epoch only when ``at_epoch_end`` (the end of an epoch evaluates
and checkpoints anyway). The trainer's default hooks log, evaluate, checkpoint, probe the task
gradients and honour SIGINT / SIGTERM; a new cadence is one more :class:`Hook`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    name: str
    every: int  # steps; 0: never
    run: Callable  # run(trainer, epoch)
    before: bool = False  # ahead of the step (the state it sees has not taken it)
    at_epoch_end: bool = False  # also after the last step of an epoch (else never then)

    def due(self, step: int, end_of_epoch: bool = False) -> bool:
        """Whether the hook runs at ``step`` (steps taken: after a step, its count; before, the count so far)."""
        if end_of_epoch and not self.before:
            return self.at_epoch_end
        return self.every > 0 and step % self.every == 0


def default_hooks(cfg) -> list[Hook]:
    """The loop's cadences from a :class:`mtl_jax.config.TrainConfig`, in the order they run."""
    return [
        Hook(
            "gradient probe", cfg.grad_diagnostics, lambda trainer, epoch: trainer.probe_gradients(epoch), before=True
        ),
        Hook("log", cfg.log_every, lambda trainer, epoch: trainer.log_training(epoch), at_epoch_end=True),
        Hook("evaluate", cfg.eval_every, lambda trainer, epoch: trainer.evaluate_and_checkpoint(epoch)),
        Hook("checkpoint", cfg.save_every, lambda trainer, epoch: trainer.save_once()),
        Hook("signal", 1, lambda trainer, epoch: trainer.stop_on_signal()),
    ]
