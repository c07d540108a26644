"""Bulk encoding: stream spectra files through a trained encoder and write latents to HDF5 (DESIGN §2).

The output ("fastspec-latents" layout), one row per input spectrum, in input order::

    latents      (N, S) float32   the encoder's latents s
    Z            (N,)   float64   redshift, copied from the input
    object_id    (N,)   uint64    copied from the input
    source_file  (N,)   int32     index into `source_files` (the input paths, as given)
    source_row   (N,)   int64     row in that file
    chi2         (N,)   float32   optional (--chi2): reduced χ² of `latents`, see fastspec.losses.CHI2_DEFINITION
    chi2_before  (N,)   float32   with --refine N: reduced χ² of the encoder's own latents
    chi2_after   (N,)   float32   with --refine N: reduced χ² of the refined latents written in `latents`
    refine_steps (N,)   int32     with --refine N: optimiser steps each spectrum used (≤ N; it stops early
                                  once its χ² no longer improves), see fastspec.fit.refine
    spec_rest    (N, R) float32   optional (--restframe): the restframe model on `wave_rest` (R,)
    attrs: format, format_version, complete, rows_done, fingerprint, model, model_sha256, precision, ...

Nothing partial is mistaken for complete: the output is built in ``<out>.partial`` and renamed when done, and
only a finished file has ``complete = True``. After each flushed block the partial file's ``rows_done``
attribute advances; its datasets are preallocated and contiguous, so a kill (even ``kill -9``) leaves a file
whose metadata never changes after creation and whose rows below ``rows_done`` are final. A restart checks
the partial file's fingerprint (model weights, input paths/sizes/mtimes, options that change the numbers)
and continues from ``rows_done``; anything it cannot trust is discarded and redone.

Speed: rows are read in contiguous blocks by the training loader in file order (background workers and a
side-stream copy on CUDA), encoded in large batches in inference mode (optionally bf16 / fp16 autocast) by
the model's own encoder (whose conv blocks run as fused kernel ops, `ModelConfig.fused_blocks`), and written
by a background thread.

Sharding: ``shard=(i, n)`` (or torchrun's RANK / WORLD_SIZE) encodes the contiguous global row range
``[N·i/n, N·(i+1)/n)`` into ``<out>.shard-i-of-n``; `merge_shards` (rank 0 under torchrun, or
``fastspec encode --merge``) concatenates them in order into `<out>`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import h5py
import numpy as np
import torch

from . import __version__, fit
from .atomic import publish
from .errors import FastspecError
from .losses import CHI2_DEFINITION, reduced_chi2
from .spectra import H5Reader, as_object_id
from .spectra_io import open_spectra

LATENTS_FORMAT = "fastspec-latents"
LATENTS_VERSION = 1
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class EncodeError(FastspecError, RuntimeError):
    """Encoding cannot proceed (bad options, inputs that do not fit the model, inconsistent shards)."""


# ---- model identity ------------------------------------------------------------------------------------


def weights_sha256(model) -> str:
    """Hash of the model's parameters and buffers (names, dtypes, shapes, bytes) and its config."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().reshape(-1) if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()


def _model_meta(model) -> tuple[int, float, str]:
    """(n_latent, z_max, instrument name) of a SpectrumAutoencoder."""
    cfg = model.config
    inst = cfg.instrument["name"] if isinstance(cfg.instrument, dict) else str(cfg.instrument)
    return int(cfg.n_latent), float(cfg.z_max), inst


# ---- one batch -----------------------------------------------------------------------------------------


def autocast_context(device: torch.device, precision: str):
    """Mixed precision for inference: bf16 on CPU or CUDA, fp16 on CUDA only, fp32 = no autocast."""
    if precision not in PRECISIONS:
        raise EncodeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise EncodeError("precision fp16 needs a CUDA device (on CPU use bf16 or fp32)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def encode_batch(model, y, w, z, precision: str = "fp32", chi2: bool = False, restframe: bool = False,
                 observed: bool = False, refine: int = 0) -> dict:
    """Encode one batch on the model's device. y, w: (n, L); z: (n,). Masked pixels (w = 0) of `y` must
    already be zeroed, as the loader feeds them in training.

    refine: if > 0, the encoder's latents are then optimised for up to that many steps per spectrum through
    the frozen decoder (`fastspec.fit.refine`, fp32) and the refined ones are returned as "latents".
    Returns float32 tensors on the batch's device: "latents" (n, S), and on request "chi2" (n,),
    "spec_rest" (n, R), "spec_obs" and "valid" (n, L) (the model in the observed frame); with refine also
    "chi2_before", "chi2_after" (n,) and "refine_steps" (n,) int32.
    """
    device = y.device
    out = {}
    with torch.inference_mode(), autocast_context(device, precision):
        s = model.encode(y, z).float()
    if refine:
        r = fit.refine(model, y, w, z, s=s.clone(), steps=refine)  # clone: a normal tensor, not an inference one
        s = r.latents
        out.update(chi2_before=r.chi2_before, chi2_after=r.chi2_after, refine_steps=r.steps.int())
    out["latents"] = s
    with torch.inference_mode(), autocast_context(device, precision):
        if chi2 or restframe or observed:
            x_rest = model.decode(s)
            if restframe:
                out["spec_rest"] = x_rest.float()
            if chi2 or observed:
                # as model.forward, but reusing x_rest rather than decoding twice
                y_model, valid = model.redshift(x_rest, z)
                if observed:
                    out["spec_obs"], out["valid"] = y_model.float(), valid
    if chi2:
        with torch.inference_mode():
            out["chi2"] = reduced_chi2(y, w, y_model.float(), valid, model.n_latent)
    return out


def prepare(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, w, z) from a SpectraBatch exactly as the training loader makes them: w = ivar with masked and
    ivar ≤ 0 pixels zeroed, y = flux with those pixels zeroed, z as float32."""
    w = np.where(batch.mask | ~(batch.ivar > 0), np.float32(0), batch.ivar).astype(np.float32)
    y = np.where(w > 0, batch.flux, np.float32(0)).astype(np.float32)
    return y, w, batch.z.astype(np.float32)


def encode_arrays(model, y, w, z, batch_size: int = 256, precision: str = "fp32", chi2: bool = False,
                  restframe: bool = False, observed: bool = False, refine: int = 0) -> dict:
    """`encode_batch` over in-memory numpy arrays in batches; returns numpy arrays (for reports, notebooks)."""
    device = next(model.parameters()).device
    autocast_context(device, precision)
    parts: dict[str, list] = {}
    for a in range(0, len(z), batch_size):
        b = a + batch_size
        res = encode_batch(
            model,
            torch.as_tensor(y[a:b], device=device),
            torch.as_tensor(w[a:b], device=device),
            torch.as_tensor(np.asarray(z[a:b], dtype=np.float32), device=device),
            precision=precision, chi2=chi2, restframe=restframe, observed=observed, refine=refine,
        )
        for k, v in res.items():
            parts.setdefault(k, []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---- inputs, fingerprint, shards -------------------------------------------------------------------------


@dataclass
class InputFile:
    path: str
    n: int
    size: int
    mtime_ns: int
    instrument: str
    offset: int = 0  # global row index of the file's row 0


def inspect_inputs(paths: Sequence[str | os.PathLike], instrument: str | None = None,
                   wave_obs: np.ndarray | None = None) -> list[InputFile]:
    """Row counts and identity of the input files; each must hold spectra of `instrument` on `wave_obs`."""
    if not paths:
        raise EncodeError("no input files given")
    infos, offset = [], 0
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p):
            raise EncodeError(f"{p}: input file not found")
        with open_spectra(p) as f:
            inst, n = f.instrument.name, len(f)
            if instrument and inst != instrument:
                raise EncodeError(
                    f"{p}: spectra of instrument {inst!r}, but the model was trained on {instrument!r} spectra"
                )
            if wave_obs is not None:
                grid = f.wave_obs
                # 0.01 Å: spender-compatible models carry float32 grids up to 0.005 Å off the float64 one
                if grid.shape != wave_obs.shape or np.max(np.abs(grid - wave_obs)) > 0.01:
                    raise EncodeError(f"{p}: field wave_obs ({grid.shape[0]} pixels, {grid[0]:.2f}–{grid[-1]:.2f} Å) "
                                      f"is not the model's grid ({wave_obs.shape[0]} pixels, "
                                      f"{wave_obs[0]:.2f}–{wave_obs[-1]:.2f} Å)")
        st = os.stat(p)
        infos.append(InputFile(p, n, st.st_size, st.st_mtime_ns, inst, offset))
        offset += n
    return infos


def job_fingerprint(model_sha: str, inputs: list[InputFile], precision: str, chi2: bool, restframe: bool,
                    refine: int = 0) -> str:
    """What makes two encodings the same job: model, inputs, and the options that change the numbers."""
    payload = {
        "format_version": LATENTS_VERSION,
        "model": model_sha,
        "inputs": [[os.path.abspath(i.path), i.n, i.size, i.mtime_ns] for i in inputs],
        "precision": precision,
        "chi2": bool(chi2),
        "restframe": bool(restframe),
    }
    if refine:  # absent when 0, so jobs fingerprinted before --refine existed still resume
        payload["refine"] = int(refine)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 ≤ i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise EncodeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise EncodeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_from_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    return (rank, world, local) if world > 1 else None


def shard_range(n_total: int, i: int, n: int) -> tuple[int, int]:
    return n_total * i // n, n_total * (i + 1) // n


def shard_path(out, i: int, n: int) -> str:
    return f"{os.fspath(out)}.shard-{i}-of-{n}"


def partial_path(path) -> str:
    return f"{os.fspath(path)}.partial"


# ---- the output file ------------------------------------------------------------------------------------


def _dcpl():
    # Contiguous storage allocated at creation and never filled: the file's metadata is final before the
    # first row is written (a kill cannot leave half-updated metadata) and allocation costs no writes.
    p = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    p.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    p.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return p


def _columns(n: int, S: int, R: int, chi2: bool, restframe: bool, refine: bool = False) -> dict:
    cols = {
        "latents": ((n, S), np.float32),
        "Z": ((n,), np.float64),
        "object_id": ((n,), np.uint64),
        "source_file": ((n,), np.int32),
        "source_row": ((n,), np.int64),
    }
    if chi2:
        cols["chi2"] = ((n,), np.float32)
    if refine:
        cols["chi2_before"] = ((n,), np.float32)
        cols["chi2_after"] = ((n,), np.float32)
        cols["refine_steps"] = ((n,), np.int32)
    if restframe:
        cols["spec_rest"] = ((n, R), np.float32)
    return cols


def _create_output(path: str, n: int, S: int, wave_rest: np.ndarray | None, chi2: bool, restframe: bool,
                   attrs: dict, sources: list[str], refine: bool = False) -> h5py.File:
    R = 0 if wave_rest is None else len(wave_rest)
    extra = {"wave_rest": np.asarray(wave_rest, dtype=np.float64)} if restframe else {}
    return create_rows_file(path, _columns(n, S, R, chi2, restframe, refine), attrs, sources, LATENTS_FORMAT,
                            LATENTS_VERSION, extra)


def create_rows_file(path: str, columns: dict, attrs: dict, sources: list[str], fmt: str, version: int,
                     extra: dict | None = None) -> h5py.File:
    """A new row-output file (open for writing): one preallocated contiguous dataset per column
    ``{name: (shape, dtype)}`` (first dimension = rows), `source_files`, the datasets `extra` (not per row),
    and attributes format/format_version/complete=False/rows_done=0 plus `attrs`. Shared by every command
    that writes one row per input spectrum (encode, redshift, outliers)."""
    f = h5py.File(path, "w")
    try:
        for name, (shape, dtype) in columns.items():
            f.create_dataset(name, shape=shape, dtype=dtype, dcpl=_dcpl())
        f.create_dataset("source_files", data=np.array(sources, dtype=object), dtype=h5py.string_dtype())
        for name, arr in (extra or {}).items():
            f.create_dataset(name, data=arr)
        f.attrs["format"] = fmt
        f.attrs["format_version"] = version
        f.attrs["complete"] = False
        f.attrs["rows_done"] = np.int64(0)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def finish_output(f: h5py.File, tmp: str, final: str) -> None:
    """Mark a row-output file complete, close it and rename it from its temporary name to `final`."""
    f.attrs.modify("complete", True)
    f.attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    f.flush()
    f.close()
    publish(tmp, final)


def is_complete(path: str, fingerprint: str) -> bool:
    """True if `path` is a finished output of the job `fingerprint`."""
    if not os.path.exists(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete")) and f.attrs.get("fingerprint") == fingerprint
    except Exception:
        return False


def open_resumable(path: str, fingerprint: str, n: int, row_start: int, fmt: str = LATENTS_FORMAT,
                   version: int = LATENTS_VERSION, key: str = "latents") -> tuple[h5py.File | None, int, str]:
    """Reopen a partial output of the same job; (file, rows_done, why-not) — file None when unusable.
    fmt, version: the output's format; key: a per-row dataset whose length must be n."""
    if not os.path.exists(path):
        return None, 0, ""
    try:
        f = h5py.File(path, "r+")
    except OSError as err:
        return None, 0, f"cannot be opened ({err})"
    try:
        a = f.attrs
        if a.get("format") != fmt or int(a.get("format_version", -1)) != version:
            why = f"not a {fmt} file of version {version}"
        elif a.get("fingerprint") != fingerprint:
            why = "made by a different model, inputs or options"
        elif int(a.get("row_start", -1)) != row_start or f[key].shape[0] != n:
            why = "covers different rows"
        else:
            done = int(a.get("rows_done", 0))
            if 0 <= done <= n:
                return f, done, ""
            why = f"rows_done = {done} is out of range"
    except Exception as err:  # a damaged file: redo it rather than trust it
        why = f"unreadable ({err})"
    f.close()
    return None, 0, why


# ---- reading the output ---------------------------------------------------------------------------------


class RowsFile(H5Reader):
    """Read a finished row-output file (one row per input spectrum) of format `FORMAT`, whose per-row dataset
    `KEY` gives the row count. Refuses partial files and shards-in-progress by their `complete` flag."""

    FORMAT = ""
    KEY = ""
    COMMAND = ""  # the command that finishes an incomplete file
    ERROR = FastspecError

    def __init__(self, path, allow_partial: bool = False):
        self.path = os.fspath(path)
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise self.ERROR(f"{self.path}: cannot open as HDF5 ({err})") from None
        a = self.h5.attrs
        if a.get("format") != self.FORMAT:
            self.h5.close()
            raise self.ERROR(f"{self.path}: not a {self.FORMAT} file (format {a.get('format')!r})")
        self.complete = bool(a.get("complete", False))
        if not self.complete and not allow_partial:
            done, n = int(a.get("rows_done", 0)), self.h5[self.KEY].shape[0]
            self.h5.close()
            raise self.ERROR(
                f"{self.path}: incomplete output ({done} of {n} rows); run `{self.COMMAND}` again to finish it"
            )
        self.attrs = dict(a)

    def __len__(self) -> int:
        return int(self.h5[self.KEY].shape[0])

    def row_columns(self) -> list[str]:
        """The per-row datasets (first dimension = rows), in file order."""
        n = len(self)
        return [k for k, d in self.h5.items() if isinstance(d, h5py.Dataset) and d.ndim >= 1
                and d.shape[0] == n and k != "source_files"]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.h5:
            raise KeyError(f"{self.path}: no dataset {name!r} (have {', '.join(sorted(self.h5))})")
        return self.h5[name][()]

    def __contains__(self, name: str) -> bool:
        return name in self.h5

    @property
    def source_files(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else str(s) for s in self.h5["source_files"][()]]


class LatentsFile(RowsFile):
    """A finished latents file of `fastspec encode`."""

    FORMAT = LATENTS_FORMAT
    KEY = "latents"
    COMMAND = "fastspec encode"
    ERROR = EncodeError



# ---- the pipeline ---------------------------------------------------------------------------------------


@dataclass
class EncodeStats:
    """Where the time of one `encode_files` call went (seconds; stages overlap, so they need not add up)."""

    n: int = 0  # spectra encoded by this call (resumed rows not counted)
    seconds: float = 0.0  # wall time of the loop
    wait_s: float = 0.0  # main thread waiting for the loader (read + prepare + copy not hidden by prefetch)
    compute_s: float = 0.0  # encoder (+ decoder) and the copy of results back to the host
    write_s: float = 0.0  # writer thread: copying Z/object_id, writing and flushing the output
    rows_skipped: int = 0  # rows already done by an earlier, interrupted run
    already_complete: bool = False  # the final (merged) output of this job existed already
    out: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def spectra_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


class RowWriter(threading.Thread):
    """Writes finished rows in input order; after each flushed block it advances `rows_done`."""

    def __init__(self, f: h5py.File, inputs: list[InputFile], row_start: int, flush_rows: int):
        super().__init__(daemon=True, name="fastspec-encode-writer")
        self.f = f
        self.inputs = inputs
        self.offsets = np.array([i.offset for i in inputs], dtype=np.int64)
        self.row_start = row_start
        self.flush_rows = flush_rows
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.cancelled = False
        self.busy = 0.0
        self._pending: list[tuple[int, dict]] = []
        self._files: dict = {}

    def put(self, first_row: int, arrays: dict):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put((first_row, arrays), timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self):
        self.put(-1, {})
        self.join()
        if self.error is not None:
            raise self.error

    def cancel(self, timeout: float = 60.0):
        """Stop without writing what is pending (the run failed); returns when the thread no longer
        touches the file, so the caller may close it."""
        self.cancelled = True
        try:
            self.q.put_nowait((-1, {}))
        except queue.Full:
            pass
        self.join(timeout)

    def run(self):
        try:
            while True:
                first, arrays = self.q.get()
                if self.cancelled:
                    return
                t0 = time.perf_counter()
                if first < 0:
                    self._flush()
                    self.busy += time.perf_counter() - t0
                    return
                self._pending.append((first, arrays))
                if sum(len(next(iter(a.values()))) for _, a in self._pending) >= self.flush_rows:
                    self._flush()
                self.busy += time.perf_counter() - t0
        except BaseException as err:  # handed to the main thread by put()/finish()
            self.error = err
            while True:  # drain so the producer never blocks on a dead writer
                try:
                    if self.q.get(timeout=0.1)[0] < 0:
                        return
                except queue.Empty:
                    if not threading.main_thread().is_alive():
                        return
        finally:
            for sf in self._files.values():
                sf.close()

    def _copy_columns(self, a: int, b: int) -> dict:
        """Z, object_id, source_file, source_row of global rows [a, b), read from the inputs."""
        cols = {k: [] for k in ("Z", "object_id", "source_file", "source_row")}
        pos = a
        while pos < b:
            fi = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            info = self.inputs[fi]
            lo, hi = pos - info.offset, min(b, info.offset + info.n) - info.offset
            sf = self._files.get(fi)
            if sf is None:
                sf = self._files[fi] = open_spectra(info.path)
            cols["Z"].append(sf.read_column("Z", lo, hi).astype(np.float64))
            cols["object_id"].append(as_object_id(sf.read_column("object_id", lo, hi), info.path, lo))
            cols["source_file"].append(np.full(hi - lo, fi, np.int32))
            cols["source_row"].append(np.arange(lo, hi, dtype=np.int64))
            pos = info.offset + hi
        return {k: np.concatenate(v) for k, v in cols.items()}

    def _flush(self):
        if not self._pending:
            return
        first = self._pending[0][0]
        arrays = {k: np.concatenate([p[1][k] for p in self._pending]) for k in self._pending[0][1]}
        self._pending = []
        b = first + len(next(iter(arrays.values())))
        arrays.update(self._copy_columns(first, b))
        lo, hi = first - self.row_start, b - self.row_start
        for name, arr in arrays.items():
            self.f[name][lo:hi] = arr
        self.f.flush()  # the rows are in the file before rows_done says so
        self.f.attrs.modify("rows_done", np.int64(hi))
        self.f.flush()


def _locate(inputs: list[InputFile], index: int) -> tuple[str, int]:
    """(path, row) of global row `index`."""
    for info in inputs:
        if info.offset <= index < info.offset + info.n:
            return info.path, index - info.offset
    raise IndexError(index)


def _selection(inputs: list[InputFile], a: int, b: int) -> list[np.ndarray | None]:
    """Per-file row indices of global rows [a, b) (for SpectraLoader's `rows`)."""
    rows = []
    for info in inputs:
        lo, hi = max(a, info.offset) - info.offset, min(b, info.offset + info.n) - info.offset
        if lo == 0 and hi == info.n:
            rows.append(None)
        else:
            rows.append(np.arange(lo, max(hi, lo), dtype=np.int64))
    return rows


def stream_batches(inputs: list[InputFile], a: int, b: int, batch_size: int, workers: int, device,
                   check_z: bool = True):
    """Global rows [a, b) of the inputs as loader batches (y, w, z prepared as in training, on `device`), in
    order and without gaps (checked), each with the seconds spent waiting for it. With `check_z`, a row whose
    Z is not finite is an error naming file, row and field."""
    from .loader import SpectraLoader

    loader = SpectraLoader(
        [i.path for i in inputs], batch_size=batch_size, block_rows=min(1024, batch_size),
        shuffle_blocks=max(1, -(-batch_size // 1024)), shuffle=False, num_workers=workers,
        prefetch=2, device=device, drop_last=False, persistent_workers=False,
        rows=_selection(inputs, a, b),
    )
    expect = a
    try:
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t_wait = time.perf_counter() - t0
            if check_z and not bool(torch.isfinite(batch.z).all()):
                i = int(batch.index[~torch.isfinite(batch.z).cpu()][0])
                path, row = _locate(inputs, i)
                raise EncodeError(f"{path}: row {row}, field Z: not a finite redshift")
            first = int(batch.index[0])
            if first != expect:  # the loader must deliver rows in order, without gaps
                raise EncodeError(f"internal error: expected row {expect}, loader gave {first}")
            expect += len(batch.z)
            yield batch, t_wait
    finally:
        loader.close()
    if expect != b:
        raise EncodeError(f"internal error: read rows up to {expect}, expected {b}")


def encode_files(model, paths: Sequence[str | os.PathLike], out, *, shard: tuple[int, int] | None = None,
                 batch_size: int = 512, flush_rows: int | None = None, precision: str = "fp32",
                 chi2: bool = False, restframe: bool = False, workers: int | None = None,
                 progress: bool = True, model_path: str | None = None, resume: bool = True,
                 model_sha: str | None = None, refine: int = 0) -> EncodeStats:
    """Encode every spectrum of `paths` (in order) into the latents file `out` (or its shard file).

    model: a SpectrumAutoencoder on its device (see `fastspec.model.load_model`). shard: (i, n) to encode only the i-th of
    n contiguous row ranges into ``<out>.shard-i-of-n``. flush_rows: rows per flushed block (the resume
    granularity; rounded up to a multiple of `batch_size`, default ≈ 32 batches). workers: loader
    processes (default 0 on CPU, where reading is a small fraction of the time; 4 on CUDA). refine: optimise
    each spectrum's latents for up to this many steps after the encoder pass (see `encode_batch`).
    Returns the timing split (EncodeStats).
    """
    device = next(model.parameters()).device
    autocast_context(device, precision)  # validates precision for this device before any work
    if batch_size < 1:
        raise EncodeError(f"batch size must be positive, got {batch_size}")
    if refine < 0:
        raise EncodeError(f"refine steps must be ≥ 0, got {refine}")
    n_latent, z_max, instrument = _model_meta(model)
    inputs = inspect_inputs(paths, instrument, model.wave_obs.detach().cpu().double().numpy())
    n_total = sum(i.n for i in inputs)
    model_sha = model_sha or weights_sha256(model)
    fingerprint = job_fingerprint(model_sha, inputs, precision, chi2, restframe, refine)
    if shard is None:
        i_shard, n_shard = 0, 1
        target = os.fspath(out)
    else:
        i_shard, n_shard = shard
        target = shard_path(out, i_shard, n_shard)
    row_start, row_stop = shard_range(n_total, i_shard, n_shard)
    n_rows = row_stop - row_start
    stats = EncodeStats(out=target)

    for done_path in dict.fromkeys([os.fspath(out), target]):
        if is_complete(done_path, fingerprint):
            say_progress(progress, f"{done_path}: already complete, nothing to do")
            stats.rows_skipped = n_rows
            stats.already_complete = done_path == os.fspath(out)
            return stats
    if os.path.exists(target):
        say_progress(progress, f"{target}: exists from another job; it is replaced when this one completes")

    tmp = partial_path(target)
    f, done, why = open_resumable(tmp, fingerprint, n_rows, row_start) if resume else (None, 0, "")
    if why:
        say_progress(progress, f"{tmp}: discarding partial output ({why}); starting over")
    if f is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        wave_rest = model.wave_rest.detach().cpu().double().numpy() if restframe else None
        S = n_latent
        attrs = {
            "fingerprint": fingerprint,
            "model": os.path.abspath(model_path) if model_path else "",
            "model_sha256": model_sha,
            "instrument": instrument,
            "n_latent": S,
            "z_max": z_max,
            "precision": precision,
            "device": str(device),
            "batch_size": batch_size,
            "row_start": np.int64(row_start),
            "row_stop": np.int64(row_stop),
            "n_total": np.int64(n_total),
            "shard": f"{i_shard}/{n_shard}",
            "chi2_definition": CHI2_DEFINITION if chi2 or refine else "",
            "refine_steps_max": np.int64(refine),
            "fastspec_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        f = _create_output(tmp, n_rows, S, wave_rest, chi2, restframe, attrs, [i.path for i in inputs],
                           refine=bool(refine))
    elif done:
        say_progress(progress, f"{tmp}: resuming after {done} of {n_rows} spectra")
    stats.rows_skipped = done

    flush_rows = flush_rows or 32 * batch_size
    flush_rows = -(-flush_rows // batch_size) * batch_size
    todo = n_rows - done
    if workers is None:
        workers = 4 if device.type == "cuda" else 0
    t_start = time.perf_counter()
    writer = RowWriter(f, inputs, row_start, flush_rows)
    writer.start()
    bar = progress_bar(progress, n_rows, done, target)
    try:
        if todo > 0:
            n_outside = 0
            for batch, t_wait in stream_batches(inputs, row_start + done, row_stop, batch_size, workers, device):
                t1 = time.perf_counter()
                n_outside += int(((batch.z < 0) | (batch.z > z_max)).sum())
                res = encode_batch(model, batch.y, batch.w, batch.z, precision, chi2=chi2, restframe=restframe,
                                   refine=refine)
                host = {k: v.cpu().numpy() for k, v in res.items()}
                t2 = time.perf_counter()
                writer.put(int(batch.index[0]), host)
                stats.wait_s += t_wait
                stats.compute_s += t2 - t1
                stats.n += len(batch.z)
                if bar is not None:
                    bar.update(len(batch.z))
            if n_outside:
                say_progress(progress, f"note: {n_outside} spectra have z outside the model's range "
                                       f"[0, {z_max:g}]; their latents extrapolate beyond the training redshifts")
        writer.finish()
        stats.write_s = writer.busy
        finish_output(f, tmp, target)
    except BaseException:
        # Leave the partial file as it is: the next run resumes from its rows_done.
        with contextlib.suppress(Exception):
            writer.cancel()
            f.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t_start
    return stats


def say_progress(progress: bool, msg: str) -> None:
    """A progress message on stderr unless progress is off (the other row-writing commands use it too)."""
    if progress:
        print(msg, file=sys.stderr, flush=True)


def progress_bar(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="spec", unit_scale=True, desc=os.path.basename(desc),
                dynamic_ncols=True, smoothing=0.1)


# ---- merging shards -------------------------------------------------------------------------------------


def find_shards(out) -> list[str]:
    """The shard files `<out>.shard-i-of-n` that exist (complete ones; partials end in .partial)."""
    out = os.fspath(out)
    pat = re.compile(re.escape(os.path.basename(out)) + r"\.shard-(\d+)-of-(\d+)$")
    found = []
    for p in glob.glob(glob.escape(out) + ".shard-*-of-*"):
        m = pat.match(os.path.basename(p))
        if m:
            found.append((int(m.group(2)), int(m.group(1)), p))
    return [p for _, _, p in sorted(found)]


def merge_shards(out, n: int | None = None, remove: bool = True, progress: bool = True,
                 block_rows: int = 65536, reader: type[RowsFile] = LatentsFile) -> str:
    """Concatenate the complete shards `<out>.shard-i-of-n`, i = 0…n-1, in order into `out` (atomically).

    Checks that they are all present and complete, belong to one job (same fingerprint) and cover the rows
    without gap or overlap. Removes the shards afterwards unless `remove` is False.
    """
    out = os.fspath(out)
    found = find_shards(out)
    sizes = sorted({int(re.search(r"-of-(\d+)$", p).group(1)) for p in found})
    if n is None:
        if not sizes:
            partials = glob.glob(glob.escape(out) + ".shard-*-of-*.partial")
            hint = f" ({len(partials)} unfinished: {', '.join(sorted(partials))})" if partials else ""
            raise reader.ERROR(f"{out}: no finished shard files {out}.shard-i-of-n to merge{hint}")
        if len(sizes) > 1:
            raise reader.ERROR(f"{out}: shard files of several shard counts {sizes}; pass the count to merge")
        n = sizes[0]
    paths = [shard_path(out, i, n) for i in range(n)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise reader.ERROR(f"{out}: cannot merge, {len(missing)} of {n} shards not finished: {', '.join(missing)}")
    files = []
    try:
        for p in paths:
            files.append(reader(p))
        a0 = files[0].attrs
        pos = 0
        for i, lf in enumerate(files):
            a = lf.attrs
            if a.get("fingerprint") != a0.get("fingerprint"):
                raise reader.ERROR(f"{lf.path}: shard of a different job (model, inputs or options) than {paths[0]}")
            if a.get("shard") != f"{i}/{n}" or int(a["row_start"]) != pos:
                raise reader.ERROR(f"{lf.path}: covers rows from {int(a['row_start'])}, expected {pos}")
            pos = int(a["row_stop"])
        if pos != int(a0["n_total"]):
            raise reader.ERROR(f"{out}: shards cover {pos} rows, the inputs have {int(a0['n_total'])}")
        n_total = pos
        first = files[0]
        names = first.row_columns()
        columns = {k: ((n_total, *first.h5[k].shape[1:]), first.h5[k].dtype) for k in names}
        extra = {k: d[()] for k, d in first.h5.items()
                 if isinstance(d, h5py.Dataset) and k not in names and k != "source_files"}
        attrs = {k: v for k, v in a0.items() if k not in ("format", "format_version", "complete", "rows_done",
                                                          "completed")}
        attrs.update(row_start=np.int64(0), row_stop=np.int64(n_total), shard="0/1", merged_from=n)
        tmp = f"{out}.merge.partial"
        g = create_rows_file(tmp, columns, attrs, first.source_files, first.FORMAT,
                             int(first.attrs["format_version"]), extra)
        bar = progress_bar(progress, n_total, 0, out + " (merge)")
        try:
            for lf in files:
                lo = int(lf.attrs["row_start"])
                for a in range(0, len(lf), block_rows):
                    b = min(a + block_rows, len(lf))
                    for name in names:
                        g[name][lo + a:lo + b] = lf.h5[name][a:b]
                    if bar is not None:
                        bar.update(b - a)
            g.attrs.modify("rows_done", np.int64(n_total))
            finish_output(g, tmp, out)
        except BaseException:
            g.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        finally:
            if bar is not None:
                bar.close()
    finally:
        for lf in files:
            lf.close()
    if remove:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    return out


def wait_for_shards(out, n: int, poll_s: float = 1.0, timeout_s: float | None = None, progress: bool = True):
    """Block until all n shard files of `out` exist (they appear only when complete)."""
    paths = [shard_path(out, i, n) for i in range(n)]
    t0 = time.perf_counter()
    said = False
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return
        if not said:
            say_progress(progress, f"waiting for {len(missing)} other shard(s) to finish …")
            said = True
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            raise EncodeError(f"{out}: shards still missing after {timeout_s:.0f} s: {', '.join(missing)}")
        time.sleep(poll_s)
