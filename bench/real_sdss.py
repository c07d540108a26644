"""The real SDSS DR14 galaxies of ../shared/data/real/sdss-dr14 as a train/test split for benchmarks.

The folder holds 697 spec-lite files of 662 galaxies (its MANIFEST.tsv: `object_group` marks repeat
observations of one galaxy). `split` ingests them onto the SDSS grid once (cached in the work folder) and
writes train.h5 / test.h5 split **by object_group** (a stable hash of the group, never by spectrum), so every
observation of a held-out galaxy is held out. Bright, nearby, high-S/N galaxies: not representative of the
SDSS main sample; say so wherever a number comes from them.
"""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np

from fastspec.h5format import SpectraWriter
from fastspec.spectra_io import open_spectra

SHARED = Path(os.environ.get("FASTSPEC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DR14 = SHARED / "data" / "real" / "sdss-dr14"


def manifest(real_dir=DR14) -> dict[str, dict]:
    with open(Path(real_dir) / "MANIFEST.tsv") as fh:
        return {r["filename"]: r for r in csv.DictReader(fh, delimiter="\t")}


def group_fraction(groups) -> np.ndarray:
    """A stable number in [0, 1) per object_group (blake2b of its decimal text)."""
    return np.array([int(hashlib.blake2b(str(int(g)).encode(), digest_size=8).hexdigest(), 16) / 2.0**64
                     for g in groups])


def split(work, test_fraction: float = 0.35, real_dir=DR14) -> dict:
    """Ingest (once) and split by object_group; returns paths and the per-spectrum manifest columns."""
    from fastspec.ingest import ingest

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    whole = work / "dr14.h5"
    if not whole.exists():
        files = sorted(str(p) for p in Path(real_dir).glob("spec-*.fits"))
        ingest(files, whole, instrument="sdss", jobs=min(2, os.cpu_count() or 1), progress=False)
    rows = manifest(real_dir)
    with open_spectra(whole) as f:
        data = f.read()
        names = [os.path.basename(p.decode() if isinstance(p, bytes) else str(p))
                 for p in f.read_column("source/file")]
    group = np.array([int(rows[n]["object_group"]) for n in names])
    test = group_fraction(group) < test_fraction
    extra = {"source/object_group": group,
             "source/sn_median": np.array([float(rows[n]["sn_median"]) for n in names], np.float32),
             "source/subclass": np.array([(rows[n]["subclass"] or "-").encode() for n in names]),
             "source/zwarning": np.array([int(rows[n]["zwarning"]) for n in names])}
    out = {"n_spectra": len(names), "n_files": len(rows)}
    for tag, sel in (("train", ~test), ("test", test)):
        path = work / f"{tag}.h5"
        idx = np.flatnonzero(sel)
        with SpectraWriter(path, "sdss") as w:
            w.write(data.flux[idx], data.ivar[idx], data.mask[idx], data.z[idx], data.z_err[idx],
                    data.object_id[idx], data.norm[idx], extra={k: v[idx] for k, v in extra.items()})
        out[tag] = str(path)
        out[f"n_{tag}"] = int(sel.sum())
        out[f"groups_{tag}"] = int(len(set(group[sel])))
    assert not set(group[test]) & set(group[~test])
    return out


def default_model(work, steps: int = 2000) -> str:
    """A model trained with `fastspec train`'s defaults (validation every 250 steps) on the train split, cached
    in work/default-run-STEPS (≈ 7.5 min on 2 cores for 2000 steps); returns its best.pt."""
    import subprocess
    import sys

    run = Path(work) / f"default-run-{steps}"
    best = run / "best.pt"
    if not best.exists():
        data = split(work)
        subprocess.run([sys.executable, "-m", "fastspec", "train", data["train"], "-o", str(run), "--steps",
                        str(steps), "--val-every", "250", "-q"], check=True)
    return str(best if best.exists() else run / "final.pt")
