"""The prepared token store: every split's token ids, labels and sources written once to disk as
flat arrays (ids as uint16 where the vocabulary allows) and memory-mapped while training, so a
second run, a ``--resume`` and every evaluation start without reading or tokenizing the files.

A store is a folder named by the fingerprint of what it was made from (the task settings, each
input file's path, size and modification time, the tokenizer, ``max_length``, the split seed and
``--skip-bad-rows``) in the cache folder (``--data-cache``: ``$MTL_JAX_DATA_CACHE``, else
``~/.cache/mtl_jax/data``). It is written beside its final name and renamed into place, its
``meta.json`` last: a preparation killed at any moment leaves no store a later run would use. A
store that cannot be read back is named, removed and prepared again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mtl_jax.data.apart import APART_BYTES, write_store_apart
from mtl_jax.data.batching import token_labels
from mtl_jax.data.load import SPLITS, Examples, OfTasks, load_tasks, resolve_path
from mtl_jax.data.packing import StoredUnits, offsets
from mtl_jax.data.spool import Spooled, TokenSpool, take_sizes, take_units
from mtl_jax.data.text import TextTokenizer
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.errors import MtlError
from mtl_jax.tasks import Task, TaskConfig, build

FORMAT = 3
META = "meta.json"


@dataclasses.dataclass
class Prepared(OfTasks):
    """A run's data, tokenized: the tasks (label names resolved), each split, what was left out, and
    what it was made from (its :class:`DataKey`) and where it is stored."""

    tasks: tuple[Task, ...]
    splits: dict[str, Tokenized]
    notes: list[str]
    key: DataKey
    folder: Path | None = None  # the store (None: --data-cache off)
    reused: bool = False  # read from a store an earlier run prepared


def cache_folder(setting: str) -> Path | None:
    """``--data-cache``: ``auto`` ($MTL_JAX_DATA_CACHE, else ~/.cache/mtl_jax/data), a folder, or ``off``."""
    if setting == "off":
        return None
    if setting == "auto":
        return Path(os.environ.get("MTL_JAX_DATA_CACHE") or Path.home() / ".cache" / "mtl_jax" / "data")
    return Path(setting).expanduser()


def input_files(tasks: Sequence[TaskConfig]) -> dict[str, list[int]]:
    """Every file a run reads (a folder's files), with its size and modification time (ns)."""
    out = {}
    for t in tasks:
        for spec in filter(None, (t.train, t.validation, t.test)):
            path = resolve_path(spec)
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if f.is_file():
                    st = f.stat()
                    out[str(f.resolve())] = [st.st_size, st.st_mtime_ns]
                elif not path.is_dir():
                    raise MtlError(f"{f}: file not found")
    return out


@dataclasses.dataclass(frozen=True)
class DataKey:
    """What a store is made from: its fingerprint, and the input files' sizes and times (to say which changed)."""

    fingerprint: str
    files: dict[str, list[int]]
    max_length: int
    split_seed: int
    skip_bad_rows: bool


def data_key(
    tasks: Sequence[TaskConfig], tokenizer: TextTokenizer, max_length: int, split_seed: int, skip_bad_rows: bool
) -> DataKey:
    """The key of the tasks' data as these settings prepare it: a change to any of it is another store."""
    files = input_files(tasks)
    spec = json.loads(tokenizer.backend.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)  # (set per call: not the tokenizer itself)
    vocab = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    key = {
        "format": FORMAT,
        "tasks": [t.flat() for t in tasks],
        "files": files,
        "tokenizer": [vocab, tokenizer.lowercase],
        "max_length": max_length,
        "split_seed": split_seed,
        "skip_bad_rows": skip_bad_rows,
    }
    fp = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:24]
    return DataKey(fp, files, max_length, split_seed, skip_bad_rows)


def changed_files(before: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
    """The input files added, removed or modified between two :attr:`DataKey.files`."""
    return sorted(f for f in set(before) | set(now) if before.get(f) != now.get(f))


def prepare(
    tasks: Sequence[TaskConfig],
    tokenizer: TextTokenizer,
    key: DataKey,
    cache: str = "auto",
    log: Callable[[str], None] = print,
) -> Prepared:
    """The tasks' data tokenized: read from its store when one was prepared, else read, tokenized
    and stored for the next run (``cache`` off: in a scratch folder removed once the store is open)."""
    folder = cache_folder(cache)
    store = None if folder is None else folder / key.fingerprint
    if store is not None and store.exists():
        try:
            return dataclasses.replace(open_store(store, tasks, key), reused=True)
        except DamagedStore as e:
            log(f"{store}: damaged ({e}); removed, preparing it again")
            shutil.rmtree(store, ignore_errors=True)
    if store is None:  # --data-cache off: a store in a scratch folder, removed once open (its arrays stay mapped)
        scratch = Path(tempfile.mkdtemp(prefix="mtl_jax_data_"))
        try:
            write_store_from(scratch / key.fingerprint, tasks, tokenizer, key)
            return dataclasses.replace(open_store(scratch / key.fingerprint, tasks, key), folder=None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    write_store_from(store, tasks, tokenizer, key)
    return open_store(store, tasks, key)


def write_store_from(store: Path, tasks: Sequence[TaskConfig], tokenizer: TextTokenizer, key: DataKey) -> None:
    """:func:`write_store` here, or in a child process when the inputs are large (see :mod:`mtl_jax.data.apart`)."""
    if sum(size for size, _ in key.files.values()) >= APART_BYTES:
        write_store_apart(store, tasks, tokenizer, key)
    else:
        write_store(store, tasks, tokenizer, key)


# ---------------------------------------------------------------------------- writing


def write_store(store: Path, tasks: Sequence[TaskConfig], tokenizer: TextTokenizer, key: DataKey) -> None:
    """The tasks' data read, tokenized as it is read (:mod:`mtl_jax.data.spool`) and written as a
    store at ``store``: into a temporary folder beside it, ``meta.json`` last, then renamed into
    place (another process that got there first wins)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.parent / f".{store.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        dtype = np.uint16 if tokenizer.backend.get_vocab_size() <= 1 << 16 else np.int32
        data, spooled = _read_spooled(tmp / "spool.ids", tasks, tokenizer, key, dtype)
        splits = {s: _write_split(tmp / s, data.splits[s], data.tasks, spooled, dtype) for s in SPLITS}
        del spooled
        (tmp / "spool.ids").unlink()
        meta = {
            "format": FORMAT,
            "fingerprint": key.fingerprint,
            "files": key.files,
            "notes": data.notes,
            "tasks": [{"name": t.name, "labels": list(t.labels), "stats": list(t.stats)} for t in data.tasks],
            "splits": splits,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, store)
        except OSError:
            if not (store / META).is_file():
                raise
    except OSError as e:
        raise MtlError(f"{store}: cannot write the prepared data ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_spooled(path: Path, tasks: Sequence[TaskConfig], tokenizer: TextTokenizer, key: DataKey, dtype):
    """The tasks' data with each example's texts tokenized into the spool at ``path`` as they are read."""
    spool = TokenSpool(path, tokenizer, key.max_length, dtype)
    try:
        data = load_tasks(tasks, seed=key.split_seed, skip_bad_rows=key.skip_bad_rows, sink=spool.add)
        return data, spool.finish()
    except BaseException:
        spool.close()
        raise


def _units_files(folder: Path, dtype, tokens: int, segments: int, examples: int) -> StoredUnits:
    """Empty arrays for a split's units, each a ``.npy`` file in ``folder`` opened for writing."""

    def new(name: str, dtype, n: int) -> np.ndarray:
        if n == 0:  # (an empty file cannot be mapped)
            np.save(folder / f"{name}.npy", np.zeros(0, dtype))
            return np.zeros(0, dtype)
        return np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, (n,))

    return StoredUnits(
        new("ids", dtype, tokens),
        new("segment_starts", np.int64, segments + 1),
        new("example_starts", np.int64, examples + 1),
        new("is_tuple", bool, examples),
    )


def _write_split(folder: Path, data: Examples, tasks: Sequence[Task], spooled: Spooled, dtype) -> dict:
    """The examples of one split (``data.texts``: their spooled units) as flat arrays in ``folder``."""
    folder.mkdir()
    idx = np.asarray(data.texts, np.int64)
    tokens, segments = take_sizes(spooled.units, idx)
    units = take_units(spooled.units, idx, _units_files(folder, dtype, tokens, segments, len(idx)))
    arrays = {"source": np.asarray(data.source, np.int32)}
    for i, t in enumerate(tasks):
        y = data.labels[t.name]
        if y.dtype != object:
            arrays[f"label_{i}"] = y
            continue
        y = token_labels(y, units.lengths, [spooled.word_starts.get(u) for u in idx.tolist()])
        has = np.array([v is not None for v in y], bool)
        per = [np.asarray(v, np.int32) for v in y[has]]
        counts = np.zeros(len(y), np.int64)
        counts[has] = [len(v) for v in per]
        arrays[f"tokens_{i}"] = np.concatenate(per) if per else np.zeros(0, np.int32)
        arrays[f"token_starts_{i}"] = offsets(counts)
        arrays[f"has_{i}"] = has
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)
    return {"examples": len(idx), "truncated": int(spooled.truncated[idx].sum())}


# ---------------------------------------------------------------------------- reading


class DamagedStore(Exception):
    """A store that cannot be read back (the reason)."""


def open_store(store: Path, tasks: Sequence[TaskConfig], key: DataKey) -> Prepared:
    """The store at ``store`` (made from ``key``), its arrays memory-mapped; :class:`DamagedStore` when
    it cannot be read."""
    try:
        meta = json.loads((store / META).read_text())
    except (OSError, ValueError) as e:
        raise DamagedStore(f"{META}: {e}") from None
    if meta.get("format") != FORMAT or meta.get("fingerprint") != store.name:
        raise DamagedStore(f"{META}: format {meta.get('format')}, fingerprint {meta.get('fingerprint')}")
    by_name = {t["name"]: t for t in meta["tasks"]}
    objects = tuple(
        dataclasses.replace(build(t, tuple(by_name[t.name]["labels"])), stats=tuple(by_name[t.name]["stats"]))
        for t in tasks
    )
    splits = {s: _read_split(store / s, objects, meta["splits"][s]) for s in SPLITS}
    return Prepared(objects, splits, meta["notes"], key, store)


def _load(folder: Path, name: str) -> np.ndarray:
    try:
        return np.load(folder / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DamagedStore(f"{folder.name}/{name}.npy: {e}") from None


def _read_split(folder: Path, tasks: Sequence[Task], meta: dict) -> Tokenized:
    get = lambda name: _load(folder, name)  # noqa: E731
    units = StoredUnits(get("ids"), get("segment_starts"), get("example_starts"), get("is_tuple"))
    n = meta["examples"]
    consistent = (
        len(units) == n
        and len(units.example_starts) == n + 1
        and units.segment_starts[-1] == len(units.ids)
        and units.example_starts[-1] == len(units.segment_starts) - 1
    )
    if not consistent:
        raise DamagedStore(f"{folder.name}: arrays of inconsistent sizes")
    labels = {}
    for i, t in enumerate(tasks):
        if t.label_dtype is not object:
            labels[t.name] = get(f"label_{i}")
            continue
        flat, starts, has = get(f"tokens_{i}"), get(f"token_starts_{i}"), get(f"has_{i}")
        y = np.empty(n, object)
        for j in np.flatnonzero(has):
            y[j] = np.asarray(flat[starts[j] : starts[j + 1]])
        labels[t.name] = y
    if any(len(y) != n for y in labels.values()):
        raise DamagedStore(f"{folder.name}: labels of inconsistent sizes")
    return Tokenized(units, labels, get("source"), meta["truncated"])
