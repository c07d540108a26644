"""Atomic output files: write under a temporary name in the same folder, sync, then rename over the target.

Readers never see a half-written file, and an interrupted writer leaves the old file (or none) plus nothing
but its own temporary, which the next run's `atomic_path` replaces. `sync=True` (the default) flushes the
data and the folder entry to disk before and after the rename, so a power cut cannot leave an empty file
under the final name; pass `sync=False` only for outputs that are cheap to make again.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def temporary_name(path) -> Path:
    """The temporary name `atomic_path` writes `path` under (hidden, per process, same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse to open or sync folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path, sync: bool = True):
    """Yield a temporary path to write `path` to; renamed to `path` when the block ends without an error.

    The caller opens and closes the temporary itself (h5py, torch.save, matplotlib, plain files). On an
    exception the temporary is removed and the target left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp, path, sync)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def publish(tmp, path, sync: bool = True) -> Path:
    """Rename the finished file `tmp` over `path` (same folder), syncing data and folder entry if `sync`.

    For writers whose temporary must keep a known name between runs (a resumable ``<out>.partial``);
    everything else uses `atomic_path`, which picks the name and cleans up.
    """
    tmp, path = Path(tmp), Path(path)
    if sync:
        _fsync_file(tmp)
    os.replace(tmp, path)
    if sync:
        _fsync_dir(path.parent)
    return path


def write_bytes(path, data: bytes, sync: bool = True) -> Path:
    with atomic_path(path, sync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, sync: bool = True) -> Path:
    with atomic_path(path, sync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, obj, sync: bool = True, **dump_kw) -> Path:
    dump_kw.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **dump_kw) + "\n", sync)


__all__ = ["atomic_path", "publish", "temporary_name", "write_bytes", "write_text", "write_json"]
