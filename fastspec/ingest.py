"""Ingest of survey files into one HDF5 spectra file (DESIGN §2, "Data"): which files, onto which grid, read
by a process pool, written in input order, with a report of what happened to every file.

Reading a file is its survey's job (`fastspec.surveys`: SDSS/BOSS spec and spec-lite, DESI coadd + redrock);
every spectrum is snapped onto the instrument grid by an integer pixel offset (no interpolation), masked
(pipeline mask, ivar ≤ 0, bright sky lines, grid pixels without data), normalised by its median flux in the
restframe window (DESIGN §1) and written through `fastspec.h5format.SpectraWriter`. A file that cannot be read,
or a spectrum that cannot be used, is skipped with its reason in the report; nothing is dropped silently.

Spectra held as arrays take the same path without a file: `from_arrays(wave, flux, ivar, z, ...)`.

Public API: `ingest(paths, output, ...) -> IngestReport`, `from_arrays`, `plan`, `classify`, `expand_paths`,
`format_summary`, `IngestError`, `FileReport`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import write_json
from .fits import FitsError, open_fits
from .h5format import SpectraWriter
from .instruments import InstrumentError, get_instrument, infer_instrument
from .prep import bad_pixel_mask
from .spectra import Spectra, SpectraFormatError, as_object_id
from .surveys import SURVEYS, survey_of
from .surveys.base import (
    DEFAULT_SPECTYPES,
    FileReport,
    IngestError,
    IngestTask,
    normalised,
    sky_mask,
    source_columns,
)
from .surveys.other import describe

FITS_SUFFIXES = (".fits", ".fits.gz", ".fit", ".fts")
# What a file that cannot be used raises; the worker turns it into the file's error in the report.
FILE_ERRORS = (IngestError, FitsError)


def _run_task(task: IngestTask):
    """Worker: read one file; every failure becomes the report's error (no traceback crosses the pool)."""
    try:
        return survey_of(task.kind).read(task)
    except FILE_ERRORS as err:
        return FileReport(file=task.path, kind=task.kind, instrument=task.instrument, error=str(err)), None
    except Exception as err:  # a failure we did not foresee: still reported per file, with its type
        msg = f"{task.path}: unexpected {type(err).__name__}: {err}"
        return FileReport(file=task.path, kind=task.kind, instrument=task.instrument, error=msg), None


# ---------------------------------------------------------------------------------------------- planning


def expand_paths(paths) -> list[str]:
    """Files as given, directories searched recursively for FITS files (sorted); duplicates dropped."""
    out, seen = [], set()
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(
                str(f) for f in Path(p).rglob("*") if f.is_file() and f.name.lower().endswith(FITS_SUFFIXES)
            )
        else:
            found = [p]
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def classify(path: str, reader: str = "fast") -> tuple[str, str | None]:
    """(kind, instrument guess) of a file, by its name, else by its FITS headers; each survey decides
    (`fastspec.surveys`). IngestError saying what the file looks like when no survey recognises it."""
    name = os.path.basename(path)
    for s in SURVEYS:
        hit = s.recognise_name(name)
        if hit:
            return hit
    with open_fits(path, reader) as f:
        for s in SURVEYS:
            hit = s.recognise(f)
            if hit:
                return hit
        what = describe(f)
    raise IngestError(f"{path}: {what}")


def _auto_instrument(readable) -> str | None:
    """The output grid for instrument "auto": the grid family with the most files (a tie goes to the earlier
    survey in SURVEYS), and within it the widest grid any file asks for (BOSS covers SDSS)."""
    families = {s.INSTRUMENTS: [] for s in SURVEYS}  # in SURVEYS order, which max() keeps for equals
    for _, _, guess, s in readable:
        families[s.INSTRUMENTS].append(guess)
    guesses = max(families.values(), key=len)
    return max(guesses, key=lambda g: get_instrument(g).L) if guesses else None


def plan(paths, instrument="auto", spectypes=DEFAULT_SPECTYPES, zwarn_zero=False, reader="fast"):
    """Decide the output instrument and what to do with each file.

    Returns (instrument name or None, [IngestTask or FileReport] in input order): a FileReport where the
    file is not ingested (unreadable, incompatible, a redshift catalog), an IngestTask otherwise.
    With instrument "auto": SDSS files → sdss; BOSS (or SDSS mixed with BOSS) → boss (SDSS spectra fit on
    the BOSS grid); DESI → desi. DESI mixed with SDSS/BOSS: the minority (DESI on a tie) is skipped with a
    reason telling the user to ingest it separately.
    """
    entries = []
    for f in expand_paths(paths):
        if not os.path.exists(f):
            entries.append(FileReport(file=f, error=f"{f}: no such file or directory"))
            continue
        try:
            kind, guess = classify(f, reader)
        except FILE_ERRORS as err:
            entries.append(FileReport(file=f, error=str(err)))
            continue
        entries.append((f, kind, guess, survey_of(kind)))
    classified = [e for e in entries if isinstance(e, tuple)]
    readable = [e for e in classified if e[1] in e[3].KINDS]
    auto = instrument in (None, "auto")
    inst = _auto_instrument(readable) if auto else get_instrument(instrument).name

    catalogs_of: dict = {}
    for s in SURVEYS:
        if s.CATALOG_KINDS:
            catalogs = [f for f, kind, _, _ in classified if kind in s.CATALOG_KINDS]
            catalogs_of.update(s.pair_catalogs([f for f, _, _, s2 in readable if s2 is s], catalogs))
    families = " and ".join(sorted({s.FAMILY for s in SURVEYS}))
    tasks, used = [], set()
    for e in entries:
        if isinstance(e, FileReport):
            tasks.append(e)
            continue
        f, kind, guess, s = e
        if kind in s.CATALOG_KINDS:
            tasks.append(e)  # placeholder, resolved below once every pairing is known
        elif inst not in s.INSTRUMENTS:
            why = "mixed with more files of the other survey" if auto else f"the output instrument is {inst}"
            hint = s.INSTRUMENTS[0] if len(s.INSTRUMENTS) == 1 else "auto"
            tasks.append(FileReport(file=f, kind=kind, instrument=guess, error=(
                f"{f}: {s.LABEL} skipped: {why}; ingest {families} files into separate outputs "
                f"(fastspec ingest ... --instrument {hint})")))
        else:
            catalogs = catalogs_of.get(f, ())
            used.update(catalogs)
            tasks.append(IngestTask(path=f, kind=kind, instrument=inst, catalogs=catalogs, spectypes=spectypes,
                                    zwarn_zero=zwarn_zero, reader=reader))
    out = []
    for e in tasks:
        if isinstance(e, tuple):
            f, kind, guess, s = e
            e = FileReport(file=f, kind=kind, instrument=guess, notes=[s.catalog_note(f in used)])
        out.append(e)
    return inst, out


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class IngestReport:
    output: str
    instrument: str | None
    files: list  # [FileReport] in input order
    written: bool = False

    @property
    def n_ingested(self) -> int:
        return sum(f.n_ingested for f in self.files)

    @property
    def n_skipped(self) -> int:
        return sum(len(f.skipped) for f in self.files)

    @property
    def n_failed_files(self) -> int:
        return sum(1 for f in self.files if f.error)

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "written": self.written,
            "instrument": self.instrument,
            "n_files": len(self.files),
            "n_ingested": self.n_ingested,
            "n_skipped_spectra": self.n_skipped,
            "n_failed_files": self.n_failed_files,
            "files": [asdict(f) for f in self.files],
        }

    def write_json(self, path) -> None:
        write_json(path, self.to_dict())


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def ingest(paths, output, instrument="auto", jobs=None, spectypes=DEFAULT_SPECTYPES, zwarn_zero=False,
           append=False, progress=True, reader="fast", block_rows=512) -> IngestReport:
    """Ingest FITS files (or folders of them) into the spectra file `output`; returns the report.

    `output` is written only if at least one spectrum was ingested (atomically, through SpectraWriter).
    `spectypes`: classes to keep (CLASS for SDSS, SPECTYPE for DESI), None for all.
    """
    from tqdm import tqdm

    output = os.fspath(output)
    spectypes = None if spectypes is None else tuple(s.strip().upper() for s in spectypes)
    inst_name, entries = plan(paths, instrument, spectypes, zwarn_zero, reader)
    tasks = [e for e in entries if isinstance(e, IngestTask)]
    jobs = default_jobs() if not jobs else max(1, int(jobs))
    jobs = min(jobs, max(1, len(tasks)))

    writer = None
    pending: list[Spectra] = []
    n_pending = 0

    def flush():
        nonlocal writer, pending, n_pending
        if not pending:
            return
        if writer is None:
            writer = SpectraWriter(output, inst_name, append=append, attrs={"source": "fastspec ingest"})
        writer.write_spectra(Spectra.concat(pending))
        pending, n_pending = [], 0

    results = iter(())
    pool = None
    if jobs > 1:
        import multiprocessing as mp

        pool = mp.get_context().Pool(jobs)
        chunk = max(1, min(16, len(tasks) // (jobs * 8)))
        results = pool.imap(_run_task, tasks, chunksize=chunk)
    else:
        results = map(_run_task, tasks)
    reports = {}
    n_spectra = 0
    bar = tqdm(total=len(tasks), unit="file", disable=not progress, desc="ingest", dynamic_ncols=True)
    try:
        for task, (rep, spec) in zip(tasks, results):
            reports[id(task)] = rep
            if spec is not None and len(spec):
                spec.extra["source/file"] = np.array([task.path.encode()] * len(spec), dtype=object)
                pending.append(spec)
                n_pending += len(spec)
                n_spectra += len(spec)
                if n_pending >= block_rows:
                    flush()
            bar.update(1)
            bar.set_postfix(spectra=n_spectra, refresh=False)
        flush()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if writer is not None:
        writer.close()
    files = [reports[id(e)] if isinstance(e, IngestTask) else e for e in entries]
    return IngestReport(output=output, instrument=inst_name, files=files, written=writer is not None)


# ---------------------------------------------------------------------------------------------- arrays


def _first_bad(source: str, name: str, arr: np.ndarray, nonneg: bool = False) -> None:
    bad = ~np.isfinite(arr) | (arr < 0) if nonneg else ~np.isfinite(arr)
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), arr.shape)
        at = f"row {where[0]}: field {name}: pixel {where[1]}" if arr.ndim == 2 else f"field {name}: element {where[0]}"
        what = "negative or not finite" if nonneg else "not finite"
        raise IngestError(f"{source}: {at} is {arr[where]} ({what}; {int(bad.sum())} such value(s))")


def from_arrays(wave, flux, ivar, z, z_err=None, object_id=None, mask=None, instrument=None, output=None,
                append: bool = False, source: str = "arrays"):
    """Spectra already held as arrays → (Spectra or None, FileReport): put on an instrument grid with the checks,
    masks and normalisation ingest applies to survey files, and written to `output` when given (atomically;
    ``append=True`` extends an existing file of the same instrument, e.g. an ingest output).

    wave: (L_in,) shared by every row, or (N, L_in), vacuum Å on an instrument's lattice (SDSS/BOSS: steps of
        1e-4 in log10, DESI: 0.8 Å): pixels are snapped by an integer offset and never interpolated, pixels off
        the grid are dropped, grid pixels without data are masked.
    flux, ivar: (N, L_in), or (L_in,) for one spectrum; ivar ≥ 0. mask: optional, nonzero = bad pixel.
    z: (N,). z_err: (N,), default NaN (unknown). object_id: (N,) integers ≥ 0, default the row numbers (pass
        real ids: the validation split hashes them).
    instrument: "sdss", "boss" or "desi"; None infers it from the wavelengths as for MMU files.
    source: names the arrays in messages, the report and the `source/file` column.
    Raises IngestError naming `source`, the row and the field. Rows without a finite z or a valid normalisation
    are skipped with their reason in the report.
    """
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    n, length = flux.shape
    ivar = np.atleast_2d(np.asarray(ivar, np.float64))
    wave = np.asarray(wave, np.float64)
    z = np.atleast_1d(np.asarray(z, np.float64))
    z_err = np.full(n, np.nan) if z_err is None else np.atleast_1d(np.asarray(z_err, np.float64))
    pipe = np.zeros((n, length), np.int64) if mask is None else np.atleast_2d(np.asarray(mask)).astype(np.int64)
    for name, arr, shapes in (("ivar", ivar, [(n, length)]), ("mask", pipe, [(n, length)]),
                              ("wave", wave, [(length,), (n, length)]), ("z", z, [(n,)]), ("z_err", z_err, [(n,)])):
        if arr.shape not in shapes:
            raise IngestError(f"{source}: field {name} has shape {arr.shape}, expected "
                              f"{' or '.join(map(str, shapes))} (from flux {flux.shape})")
    try:
        ids = as_object_id(np.arange(n) if object_id is None else np.atleast_1d(object_id), source)
    except SpectraFormatError as err:
        raise IngestError(str(err)) from None
    if ids.shape != (n,):
        raise IngestError(f"{source}: field object_id has shape {ids.shape}, expected ({n},)")
    _first_bad(source, "wave", wave)
    _first_bad(source, "flux", flux)
    _first_bad(source, "ivar", ivar, nonneg=True)
    waves = np.broadcast_to(wave, (n, length))
    try:
        inst = get_instrument(instrument) if instrument is not None else \
            infer_instrument(waves[0], float(waves.min()), float(waves.max()), f"{source}: row 0: field wave")
    except InstrumentError as err:
        raise IngestError(str(err)) from None
    report = FileReport(file=source, kind="arrays", instrument=inst.name, n_spectra=n)

    raw_flux = np.zeros((n, inst.L))
    raw_ivar = np.zeros((n, inst.L))
    raw_pipe = np.ones((n, inst.L), np.int64)  # grid pixels without data count as masked
    for r in range(n) if wave.ndim == 2 else [slice(None)]:
        try:
            offset = inst.snap_offset(waves[r if wave.ndim == 2 else 0],
                                      where=f"{source}: {f'row {r}: ' if wave.ndim == 2 else ''}field wave")
        except InstrumentError as err:
            raise IngestError(f"{err}; fastspec never interpolates (it would correlate the noise): resample the "
                              f"spectra onto the {inst.name} grid first") from None
        idx = offset + np.arange(length)
        keep = (idx >= 0) & (idx < inst.L)
        raw_flux[r, idx[keep]] = flux[r][..., keep]
        raw_ivar[r, idx[keep]] = ivar[r][..., keep]
        raw_pipe[r, idx[keep]] = pipe[r][..., keep]
    bad = bad_pixel_mask(raw_ivar, raw_pipe, sky_mask(inst.name)[None, :])

    rows = np.flatnonzero(np.isfinite(z))
    for r in np.flatnonzero(~np.isfinite(z)):
        report.skipped.append({"row": int(r), "object_id": int(ids[r]), "reason": f"z is {z[r]}"})
    extra = source_columns(rows, -1, -1, -1, [""] * rows.size, -1)
    extra["source/file"] = np.array([source.encode()] * rows.size, dtype=object)
    spectra = normalised(report, inst, raw_flux[rows], raw_ivar[rows], bad[rows], z[rows], z_err[rows], ids[rows],
                         rows, extra)
    if spectra is not None and output is not None:
        with SpectraWriter(output, inst, append=append, attrs={"source": "fastspec.ingest.from_arrays"}) as w:
            w.write_spectra(spectra)
    return spectra, report


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if len(rel) < len(path) else path


def format_summary(report: IngestReport, max_rows: int = 60) -> str:
    """The table printed at the end: file, instrument, spectra ingested, skipped, reason.

    With many files, only those with something to say are listed (up to `max_rows`); the JSON report has all.
    """
    rows = report.files
    if len(rows) > max_rows:
        rows = [f for f in rows if f.error or f.skipped or f.notes]
    shown = rows[:max_rows]
    header = ("file", "instrument", "ingested", "skipped", "reason")
    lines = []
    for f in shown:
        reason = f.reason
        if f.error and reason.startswith(f.file + ": "):
            reason = reason[len(f.file) + 2:]  # the file column already names it
        lines.append((_short(f.file), f.instrument or "-", str(f.n_ingested),
                      "file" if f.error else str(len(f.skipped)), reason))
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i < 4 else c for i, c in enumerate(r))  # noqa: E731
    out = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in lines]
    if len(rows) > len(shown) or len(report.files) > len(rows):
        out.append(f"... {len(report.files) - len(shown)} more files not listed (all in the JSON report)")
    out.append(
        f"total: {report.n_ingested} spectra ingested from {len(report.files)} files "
        f"({report.n_skipped} spectra skipped, {report.n_failed_files} files not usable) "
        f"→ {report.output if report.written else 'nothing written'}"
        + (f" [{report.instrument}]" if report.instrument else "")
    )
    return "\n".join(out)

