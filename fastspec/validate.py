"""Validation of spectra files (fastspec layout or Multimodal Universe): per-row checks the training loader runs
on every block (`find_bad_rows`), and a whole-file check with summary statistics (`validate_file`).

Every problem names the field and, for row problems, the file row, so a user can find it:
"<file>: row <r>: <field>: <message>".
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np

from .h5format import FORMAT_VERSION, SPECTRAL_COLUMNS, SpectraFile, grid_mismatch
from .instruments import InstrumentError, get_instrument
from .mmu import MMUSpectraFile
from .spectra import Spectra, SpectraFormatError, attr_str, datasets, open_hdf5
from .spectra_io import file_kind

# Rows per block: flux + ivar + mask of ~64 MiB, so a 1M-row file never sits in memory whole.
BLOCK_BYTES = 64 << 20
# Spectra per block whose median S/N is computed (a sort per row is the costliest statistic).
SNR_ROWS_PER_BLOCK = 256


def row_problems(batch: Spectra, z_max: float | None = None, path: str = "") -> list[tuple[int, str, str, str]]:
    """Every problem in `batch` as (file row, field, reason key, message), sorted by row.

    Vectorised over the whole block; Python touches only the bad rows. The reason key groups rows for the
    summary (the message without its numbers). Raises SpectraFormatError when the arrays disagree in shape.
    """
    n = len(batch)
    flux, ivar, mask = batch.flux, batch.ivar, batch.mask
    L = flux.shape[1] if flux.ndim == 2 else -1
    for name, arr, shape in (("spectrum_flux", flux, (n, L)), ("spectrum_ivar", ivar, (n, L)),
                             ("spectrum_mask", mask, (n, L)), ("Z_ERR", batch.z_err, (n,)),
                             ("norm", batch.norm, (n,)), ("object_id", batch.object_id, (n,))):
        if arr.shape != shape or L < 0:
            raise SpectraFormatError(
                f"{path}: rows {batch.start}–{batch.start + n - 1}: field {name} has shape {arr.shape}, "
                f"expected {shape} (from spectrum_flux and Z)"
            )
    out: list[tuple[int, str, str, str]] = []

    def per_pixel(bad: np.ndarray, fld: str, key: str, what: str, where: str = ""):
        rows = np.flatnonzero(bad.any(axis=1))  # any() short-circuits; counting only the bad rows is cheap
        if rows.size:
            sub = bad[rows]
            first, count = np.argmax(sub, axis=1), sub.sum(axis=1)
            for r, c, f0 in zip(rows, count, first):
                at = f"at pixel {f0}{where}" if c == 1 else f"at {c} pixels{where} (first at pixel {f0})"
                out.append((int(r), fld, key, f"{what} {at}"))

    with np.errstate(invalid="ignore"):
        # Masked pixels carry no weight, so only pixels with ivar > 0 and mask False can poison the loss.
        weighted = (ivar > 0) & ~mask
        per_pixel(weighted & ~np.isfinite(flux), "spectrum_flux", "NaN/inf where ivar > 0", "NaN/inf",
                  " where ivar > 0 and unmasked")
        per_pixel(ivar < 0, "spectrum_ivar", "negative", "negative")
        per_pixel(~np.isfinite(ivar), "spectrum_ivar", "NaN/inf", "NaN/inf")
        # Rows the reader could not place are all-masked; its reason says why, "all weights zero" would not.
        placed = np.ones(n, bool)
        placed[[r - batch.start for r in batch.problems if 0 <= r - batch.start < n]] = False
        for r in np.flatnonzero(~weighted.any(axis=1) & placed):
            out.append((int(r), "spectrum_ivar", "all weights zero", "all weights zero"))

        z = np.asarray(batch.z, dtype=np.float64)
        for r in np.flatnonzero(~np.isfinite(z)):
            out.append((int(r), "Z", "missing (NaN/inf)", "NaN" if np.isnan(z[r]) else f"{z[r]}"))
        hi = math.inf if z_max is None else float(z_max)
        for r in np.flatnonzero(np.isfinite(z) & ((z < 0) | (z > hi))):
            out.append((int(r), "Z", "outside the model's range",
                        f"{z[r]:.4g} outside the model's range [0, {hi:g}]"))

        norm = np.asarray(batch.norm, dtype=np.float64)
        for r in np.flatnonzero(~np.isfinite(norm)):
            out.append((int(r), "norm", "not finite", "not finite"))
        for r in np.flatnonzero(np.isfinite(norm) & (norm <= 0)):
            out.append((int(r), "norm", "not positive", f"not positive ({norm[r]:g})"))

    reader = []
    for row, msg in batch.problems.items():
        fld, _, rest = msg.partition(": ")
        key = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", rest)
        reader.append((int(row) - batch.start, fld, key, rest))
    out = sorted(reader + out, key=lambda p: p[0])  # stable: the reader's reason first
    return [(batch.start + r, fld, key, msg) for r, fld, key, msg in out]


def find_bad_rows(batch: Spectra, z_max: float | None = None, path: str = "") -> dict[int, str]:
    """File row index -> reason naming the field(s), e.g. "Z: 0.73 outside the model's range [0, 0.5]";
    several problems in a row are joined with "; ". Clean rows are absent."""
    bad: dict[int, str] = {}
    for row, fld, _, msg in row_problems(batch, z_max, path):
        text = f"{fld}: {msg}"
        bad[row] = f"{bad[row]}; {text}" if row in bad else text
    return bad


def _row_median_snr(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-spectrum median of flux·√ivar over unmasked pixels with ivar > 0 (NaN for rows without any)."""
    with np.errstate(invalid="ignore"):
        w = (ivar > 0) & ~mask & np.isfinite(flux)
        snr = np.where(w, flux * np.sqrt(np.where(w, ivar, 0)), np.nan)
    s = np.sort(snr, axis=1)  # NaN sorts last
    k = w.sum(axis=1)
    r = np.arange(len(k))
    lo, hi = s[r, np.maximum(k - 1, 0) // 2], s[r, k // 2]
    return np.where(k > 0, (lo + hi) / 2, np.nan)


@dataclass
class ValidationReport:
    """What `validate_file` found. `problems` holds the first `max_report` row problems plus every file-level
    one as (row or None, field, message); `bad_by_reason` counts bad rows per "field: reason"."""

    path: str
    kind: str = ""  # "fastspec" or "mmu"
    instrument: str | None = None
    format_version: int | None = None
    n_rows: int = 0
    n_bad: int = 0
    n_problems: int = 0
    problems: list = field(default_factory=list)
    bad_by_reason: dict = field(default_factory=dict)
    z_max: float | None = None
    z_min_found: float | None = None
    z_max_found: float | None = None
    z_median: float | None = None
    masked_fraction: float | None = None
    median_snr: float | None = None
    n_snr_rows: int = 0
    rows_checked: bool = False

    @property
    def ok(self) -> bool:
        return self.n_problems == 0

    def _file_problem(self, fld: str, message: str):
        self.problems.insert(sum(p[0] is None for p in self.problems), (None, fld, message))
        self.n_problems += 1

    @staticmethod
    def format_problem(path: str, row, fld: str, message: str) -> str:
        return f"{path}: {fld}: {message}" if row is None else f"{path}: row {row}: {fld}: {message}"

    def lines(self, limit: int | None = None) -> list[str]:
        shown = self.problems if limit is None else self.problems[:limit]
        return [self.format_problem(self.path, *p) for p in shown]

    def raise_for_problems(self, limit: int = 5):
        """Raise SpectraFormatError listing the first `limit` problems and how many more there are."""
        if self.ok:
            return
        lines = self.lines(limit)
        more = self.n_problems - len(lines)
        tail = f"\n... and {more} more problem(s)" if more > 0 else ""
        raise SpectraFormatError(
            "\n".join(lines) + tail + f"\n({self.n_bad} bad rows of {self.n_rows} in {self.path})"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problems"] = [{"row": r, "field": f, "message": m} for r, f, m in self.problems]
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        """A small table for people."""
        def fmt(v, spec):
            return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

        kind = {"fastspec": f"fastspec format v{self.format_version}", "mmu": "Multimodal Universe"}.get(
            self.kind, "unreadable")
        rows = [
            ("file", self.path),
            ("format", kind),
            ("instrument", self.instrument or "—"),
            ("rows", f"{self.n_rows}"),
            ("bad rows", f"{self.n_bad}" if self.rows_checked else "not checked"),
        ]
        for reason, count in sorted(self.bad_by_reason.items(), key=lambda kv: -kv[1]):
            rows.append((f"  {reason}", f"{count}"))
        if self.rows_checked:
            hi = "inf" if self.z_max is None else f"{self.z_max:g}"
            rows += [
                ("z range", f"{fmt(self.z_min_found, '.4g')} – {fmt(self.z_max_found, '.4g')} "
                            f"(median {fmt(self.z_median, '.4g')}; checked against [0, {hi}])"),
                ("masked pixels", "—" if self.masked_fraction is None else f"{100 * self.masked_fraction:.1f} %"),
                ("median S/N per pixel", f"{fmt(self.median_snr, '.3g')} (over {self.n_snr_rows} spectra)"),
            ]
        rows.append(("status", "OK" if self.ok else f"{self.n_problems} problem(s)"))
        width = max(len(k) for k, _ in rows)
        text = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.problems:
            shown = len(self.problems)
            text.append(f"problems (first {shown} of {self.n_problems}):" if shown < self.n_problems else "problems:")
            text += [f"  {line}" for line in self.lines()]
        return "\n".join(text)


def _check_fastspec_structure(h5: h5py.File, rep: ValidationReport, instrument) -> bool:
    """File-level checks of a fastspec file; True when its rows can be read."""
    readable = True
    version = h5.attrs.get("format_version")
    try:
        rep.format_version = int(version)
        if rep.format_version > FORMAT_VERSION:
            rep._file_problem("format_version", f"{rep.format_version} is newer than this fastspec ({FORMAT_VERSION})")
            readable = False
    except (TypeError, ValueError):
        rep._file_problem("format_version", "missing" if version is None else f"{version!r} is not an integer")
    inst = None
    try:
        inst = get_instrument(attr_str(h5.attrs.get("instrument")))
        rep.instrument = inst.name
    except InstrumentError as err:
        rep._file_problem("instrument", str(err))
        readable = False
    if instrument is not None and inst is not None and get_instrument(instrument).name != inst.name:
        rep._file_problem("instrument", f"the file holds {inst.name} spectra, {get_instrument(instrument).name} was given")
    if "wave_obs" not in h5:
        rep._file_problem("wave_obs", "missing")
    elif inst is not None:
        msg = grid_mismatch(h5["wave_obs"][:], inst)
        if msg:
            rep._file_problem("wave_obs", msg)

    if "Z" not in h5 or h5["Z"].ndim != 1:
        rep._file_problem("Z", "missing" if "Z" not in h5 else f"has shape {h5['Z'].shape}, expected (N,)")
        return False
    n = h5["Z"].shape[0]
    L = inst.L if inst is not None else None
    expect = {"spectrum_flux": "f", "spectrum_ivar": "f", "spectrum_mask": "b", "Z_ERR": "f", "object_id": "ui",
              "norm": "f"}
    for name, kinds in expect.items():
        if name not in h5:
            if name != "norm":
                rep._file_problem(name, "missing")
                readable = False
            continue
        ds = h5[name]
        shape = (n, L) if name in SPECTRAL_COLUMNS else (n,)
        if ds.shape[0] != n or len(ds.shape) != len(shape) or (L is not None and ds.shape != shape):
            want = str(shape).replace("None", "L")
            rep._file_problem(name, f"has shape {ds.shape}, expected {want}")
            readable = False
        if ds.dtype.kind not in kinds:
            rep._file_problem(name, f"has dtype {ds.dtype}, expected {'bool' if kinds == 'b' else kinds + ' kind'}")
            readable = False
    for name in sorted(set(datasets(h5)) - set(expect) - {"Z", "wave_obs"}):
        ds = h5[name]
        if ds.attrs.get("file_level", False):  # marked file-level arrays (a mock's truth_wave_rest), not rows
            continue
        if ds.ndim == 0 or ds.shape[0] != n:
            rep._file_problem(name, f"has {ds.shape[0] if ds.ndim else 0} rows, expected {n} like Z")
    return readable


def _after_path(msg: str, path: str) -> str:
    """An error message without the file name it starts with (the report names the file once)."""
    return msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg


def _open_reader(path: str, rep: ValidationReport, instrument):
    """Structure checks, then a reader for the rows (None when they cannot be read)."""
    try:
        h5 = open_hdf5(path)
    except SpectraFormatError as err:
        rep._file_problem("file", _after_path(str(err), path))
        return None
    with h5:
        rep.kind = file_kind(h5) or ""
        if rep.kind == "fastspec":
            readable = _check_fastspec_structure(h5, rep, instrument)
        elif rep.kind == "mmu":
            readable = True
        else:
            fmt = attr_str(h5.attrs.get("format"))
            rep._file_problem(
                "format", f"attribute {fmt!r}: not a fastspec spectra file, and no spectrum_lambda (not an MMU file)")
            return None
    if not readable:
        return None
    try:
        if rep.kind == "fastspec":
            return SpectraFile(path, check_grid=False)
        reader = MMUSpectraFile(path, instrument=instrument)
        rep.instrument = reader.instrument.name
        return reader
    except (SpectraFormatError, InstrumentError) as err:
        msg = _after_path(str(err), path)
        m = re.match(r"(row \d+: )?([\w/]+): (.*)$", msg, re.S)
        if m:
            rep._file_problem(m.group(2), (m.group(1) or "") + m.group(3))
        else:
            rep._file_problem("file", msg)
        return None


def validate_file(path, z_max: float | None = None, instrument=None, max_report: int = 20,
                  block_rows: int | None = None, progress: bool = False) -> ValidationReport:
    """Check a spectra file: format attributes, column shapes, the grid (and `instrument`, if given), then every
    row in blocks of `block_rows` (default ~64 MiB). z is checked against [0, z_max] (z_max None: [0, inf))."""
    from tqdm.auto import tqdm

    path = os.fspath(path)
    rep = ValidationReport(path=path, z_max=z_max)
    if not os.path.exists(path):
        rep._file_problem("file", "does not exist")
        return rep
    reader = _open_reader(path, rep, instrument)
    if reader is None:
        try:
            with h5py.File(path, "r") as h5:
                rep.n_rows = int(h5["Z"].shape[0]) if "Z" in h5 and h5["Z"].ndim == 1 else 0
        except (OSError, KeyError):
            pass
        return rep
    with reader:
        rep.n_rows = n = len(reader)
        L = reader.instrument.L
        step = block_rows or max(1, BLOCK_BYTES // (9 * L))
        zs, snrs = [], []
        n_masked = n_row_problems_kept = 0
        bad_rows_by_key: dict[str, int] = {}
        with tqdm(total=n, unit="spectra", desc=os.path.basename(path), disable=not progress or None,
                  leave=False) as bar:
            for start in range(0, n, step):
                b = reader.read(start, min(start + step, n))
                probs = row_problems(b, z_max, path)
                seen: set[tuple[int, str]] = set()
                bad_here = set()
                for row, fld, key, msg in probs:
                    rep.n_problems += 1
                    bad_here.add(row)
                    if (row, f"{fld}: {key}") not in seen:
                        seen.add((row, f"{fld}: {key}"))
                        bad_rows_by_key[f"{fld}: {key}"] = bad_rows_by_key.get(f"{fld}: {key}", 0) + 1
                    if n_row_problems_kept < max_report:
                        rep.problems.append((row, fld, msg))
                        n_row_problems_kept += 1
                rep.n_bad += len(bad_here)
                z = b.z[np.isfinite(b.z)]
                zs.append(z)
                n_masked += int(b.mask.sum())
                stride = max(1, -(-len(b) // SNR_ROWS_PER_BLOCK))
                snrs.append(_row_median_snr(b.flux[::stride], b.ivar[::stride], b.mask[::stride]))
                bar.update(len(b))
        rep.rows_checked = True
        rep.bad_by_reason = dict(sorted(bad_rows_by_key.items()))
        z = np.concatenate(zs) if zs else np.zeros(0)
        if z.size:
            rep.z_min_found, rep.z_max_found, rep.z_median = float(z.min()), float(z.max()), float(np.median(z))
        rep.masked_fraction = n_masked / (n * L) if n else None
        snr = np.concatenate(snrs) if snrs else np.zeros(0)
        snr = snr[np.isfinite(snr)]
        rep.n_snr_rows = int(snr.size)
        rep.median_snr = float(np.median(snr)) if snr.size else None
    return rep
