"""Stable hashes the loader and training depend on: seeds from several integers, and the validation split by
`object_id` — the same on every run, machine and Python version (unlike hash()), which exact resume and a
stable validation set need.
"""
from __future__ import annotations

import hashlib

import numpy as np

_MASK64 = (1 << 64) - 1


def stable_seed(*parts: int) -> int:
    """One 64-bit seed from several integers, independent of Python's hash randomisation."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & _MASK64


def stable_fraction(object_id: np.ndarray, salt: str = "fastspec-val") -> np.ndarray:
    """A number in [0, 1) per object_id from blake2b of its 8 little-endian bytes (integer ids) or of the
    id string (MMU files may store strings): stable across runs, machines and Python versions (unlike
    hash()), so a spectrum stays on its side of the validation split whatever files it comes in."""
    ids = np.asarray(object_id)
    key = salt.encode()
    if ids.dtype.kind in "iub":
        raw = [int(v).to_bytes(8, "little") for v in ids.astype(np.uint64).tolist()]
    else:
        raw = [v if isinstance(v, bytes) else str(v).encode() for v in ids.tolist()]
    out = np.empty(len(raw), dtype=np.float64)
    for i, b in enumerate(raw):
        h = hashlib.blake2b(b, digest_size=8, key=key).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out


def validation_mask(object_id: np.ndarray, fraction: float, salt: str = "fastspec-val") -> np.ndarray:
    """True for the rows whose object_id hashes into the validation fraction."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return np.zeros(len(object_id), dtype=bool)
    return stable_fraction(object_id, salt) < fraction


