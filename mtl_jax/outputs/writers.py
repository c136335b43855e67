"""Where metrics records go: each sink is a :class:`Writer` (``write(record)``, ``close()``).

metrics.jsonl, TensorBoard and the progress bar are writers; a new sink (a database, a
tracking service) is one more writer handed to the trainer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Protocol

from mtl_jax.errors import writing
from mtl_jax.outputs.report import scalar_series


class Writer(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """metrics.jsonl, one record per line, flushed as written; a resumed run rewrites the records its
    checkpoint had written and continues after them."""

    def __init__(self, path: Path | str, earlier: list[dict] = ()):
        self.path = path
        with writing(path):
            self.file = open(path, "w")
            for rec in earlier:
                self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def write(self, record: dict) -> None:
        with writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # (its last write already failed and was reported)
            pass


class TensorBoardWriter:
    """Event files for ``tensorboard --logdir``: every number of a record, tagged ``split/task/metric``."""

    def __init__(self, folder: Path, resumed_at: int | None = None):
        from tensorboardX import SummaryWriter

        # a resumed run: TensorBoard drops the earlier files' events from the first re-logged step on
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at, flush_secs=10)

    def write(self, record: dict) -> None:
        for tag, value in scalar_series(record):
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError:  # a full disk: metrics.jsonl's writer reports it, and the event files are a copy
            self._abandon()

    def _abandon(self) -> None:
        """Stop the event writer's worker thread and mark it closed, so that tensorboardX's own exit
        hook does not try the failing flush again (tensorboardX 2.x)."""
        events = self.writer.file_writer.event_writer
        events._worker.stop()
        events._closed = True


class ProgressWriter:
    """The progress bar's postfix: each task's training loss and the labelled examples per second
    since the previous training record."""

    def __init__(self, bar, names):
        self.bar, self.names, self.since = bar, names, time.perf_counter()

    def write(self, record: dict) -> None:
        if record["split"] != "train":
            return
        now = time.perf_counter()
        seconds, self.since = now - self.since, now
        losses = " ".join(f"{t}={record[t]['loss']:.3f}" for t in self.names if record[t]["loss"] is not None)
        examples = sum(record[t]["examples"] for t in self.names)
        self.bar.set_postfix_str(f"{losses} {examples / max(seconds, 1e-9):.0f}ex/s")

    def close(self) -> None:
        pass


def run_writers(out: Path, records: list[dict], primary: bool) -> list[Writer]:
    """metrics.jsonl (holding ``records``, those of the run so far) and TensorBoard, in process 0 only."""
    if not primary:
        return [JsonlWriter(os.devnull)]
    resumed = records[-1]["step"] + 1 if records else None
    return [JsonlWriter(out / "metrics.jsonl", records), TensorBoardWriter(out / "tensorboard", resumed)]
