"""The child process of :mod:`mtl_jax.data.apart`: reads ``(store, tasks, tokenizer, key)`` pickled
on stdin and writes the store; bad input: its message on stdout, exit status ``BAD_INPUT``.
(Its own module, so that apart.py, which store.py imports, imports nothing of store.py.)"""

from __future__ import annotations

import pickle
import sys

from mtl_jax.data.apart import BAD_INPUT
from mtl_jax.data.store import write_store
from mtl_jax.errors import MtlError


def main() -> int:
    store, tasks, tokenizer, key = pickle.load(sys.stdin.buffer)
    try:
        write_store(store, tasks, tokenizer, key)
    except MtlError as e:
        sys.stdout.write(str(e))
        return BAD_INPUT
    except KeyboardInterrupt:  # (Ctrl-C reaches both processes: the trainer says it)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
