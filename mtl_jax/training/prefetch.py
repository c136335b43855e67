"""The next step's batch built on a background thread while the current step runs, so the host
never holds the device up (packing and placing a batch is host work)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BatchAhead:
    """One batch built ahead. ``ahead(key, build)`` starts building it; ``get(key, build)`` returns it
    when ``key`` is the one built ahead (else builds it now: a phase change replaced the data)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtl-next-batch")
        self._pending: tuple[Hashable, Future] | None = None

    def ahead(self, key: Hashable, build: Callable[[], Any]) -> None:
        self.drop()
        self._pending = (key, self._pool.submit(build))

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if self._pending is not None and self._pending[0] == key:
            pending, self._pending = self._pending, None
            return pending[1].result()
        self.drop()  # (another batch's, not used: the thread is free again)
        return build()

    def drop(self) -> None:
        """Forget a batch built ahead that will not be asked for (the loop stops early)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].result()

    def close(self) -> None:
        self.drop()
        self._pool.shutdown(wait=True)
