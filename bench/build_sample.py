"""Rebuild the real-galaxy sample shipped inside the package (fastspec/data/sdss_sample.h5 and its README.md)
from ../shared/data/real/sdss-dr14, reproducibly: the same shared folder gives the same selection and the same
rows (only the build date in the attributes changes; `--date` pins it too).

Selection (`select`): SDSS-I/II spectrograph (plate < 3510, the SDSS grid the demo's model uses), CLASS
GALAXY, ZWARNING 0 and z <= 0.5 (the model's z_max), taken by whole object_group (repeat observations of one
galaxy stay together): N_REPEAT groups with two or more spectra and then single-spectrum groups, each set
spread evenly over redshift, up to N_TARGET spectra. The folder holds bright, nearby, high-S/N galaxies: the
sample is not representative of the SDSS main galaxy sample.

    python bench/build_sample.py [--shared ../shared] [--out fastspec/data] [--date YYYY-MM-DD]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_sdss import manifest  # noqa: E402

from fastspec import __version__  # noqa: E402
from fastspec.data import SAMPLES, SDSS_ACKNOWLEDGEMENT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_TARGET = 100
N_REPEAT = 12
Z_MAX = 0.5
BOSS_FIRST_PLATE = 3510  # fastspec.surveys.sdss: SDSS-I/II plates are numbered below it
SOURCE = ("SDSS DR14 spec-lite files from ../shared/data/real/sdss-dr14 (recovered from the git history of the "
          "public repository ed-ortizm/uRF_SDSS, commit 8f9ebeec, db/sas/dr14/sdss/spectro/redux/26/spectra/lite/; "
          "its selection: DR14 class = GALAXY ordered by median S/N)")
SELECTION = (f"SDSS-I/II spectrograph (plate < {BOSS_FIRST_PLATE}), CLASS = GALAXY, ZWARNING = 0, z <= {Z_MAX}; "
             f"whole object_groups only (repeat observations of one galaxy stay together): {N_REPEAT} groups with "
             f"2+ spectra, then single-spectrum groups, each set spread evenly in redshift, up to {N_TARGET} "
             "spectra. Bright, nearby, high-S/N galaxies (median S/N per pixel ~50): not representative of the "
             "SDSS main galaxy sample")


def _eligible(row: dict) -> bool:
    return (int(row["plate"]) < BOSS_FIRST_PLATE and row["class"].strip() == "GALAXY"
            and int(row["zwarning"]) == 0 and float(row["z"]) <= Z_MAX)


def _evenly(items: list, k: int) -> list:
    """k items spread evenly over `items` (already in redshift order), first and last included."""
    if k >= len(items):
        return list(items)
    return [items[i] for i in np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))]


def select(rows: dict[str, dict]) -> list[str]:
    """File names of the sample (sorted), chosen from MANIFEST.tsv rows as the module docstring says."""
    groups: dict[str, list[dict]] = {}
    for r in rows.values():
        groups.setdefault(r["object_group"], []).append(r)
    whole = [g for g in groups.values() if all(_eligible(r) for r in g)]
    by_z = sorted(whole, key=lambda g: (float(np.median([float(r["z"]) for r in g])), g[0]["object_group"]))
    repeats = _evenly([g for g in by_z if len(g) > 1], N_REPEAT)
    n_single = N_TARGET - sum(len(g) for g in repeats)
    singles = _evenly([g for g in by_z if len(g) == 1], n_single)
    return sorted(r["filename"] for g in repeats + singles for r in g)


def build(shared: Path, out_dir: Path, date: str | None = None) -> Path:
    from fastspec.h5format import SpectraWriter
    from fastspec.ingest import ingest
    from fastspec.spectra_io import open_spectra

    real = shared / "data" / "real" / "sdss-dr14"
    rows = manifest(real)
    names = select(rows)
    out = out_dir / SAMPLES["sdss"][0]
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.h5"
        report = ingest([str(real / n) for n in names], whole, instrument="sdss", jobs=min(2, os.cpu_count() or 1),
                        progress=False)
        lost = [f"{f.file}: {f.reason}" for f in report.files if f.n_ingested != 1]
        if lost:
            raise SystemExit("build_sample: selected spectra that did not ingest:\n  " + "\n  ".join(lost))
        with open_spectra(whole) as f:
            data = f.read()
            extra = {k: f.read_column(k) for k in f.columns() if k.startswith("source/") and k != "source/file"}
            files = [os.path.basename(p.decode() if isinstance(p, bytes) else str(p))
                     for p in f.read_column("source/file")]
    assert files == names, "ingest must keep the input order"
    meta = [rows[n] for n in names]
    extra.update({
        "source/file": np.array([f"sdss-dr14/{n}".encode() for n in names], dtype=object),
        "source/object_group": np.array([int(r["object_group"]) for r in meta], np.int64),
        "source/subclass": np.array([(r["subclass"].strip() or "-").encode() for r in meta], dtype=object),
        "source/sn_median": np.array([float(r["sn_median"]) for r in meta], np.float32),
        "source/ra": np.array([float(r["ra"]) for r in meta], np.float64),
        "source/dec": np.array([float(r["dec"]) for r in meta], np.float64),
    })
    attrs = {
        "sample": "sdss",
        "title": f"fastspec bundled sample: {len(names)} real SDSS galaxy spectra (DR14 spec-lite, SDSS-I/II)",
        "provenance_source": SOURCE,
        "provenance_selection": SELECTION,
        "provenance_files": "\n".join(names),
        "provenance_date": date or dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "provenance_builder": f"bench/build_sample.py (fastspec {__version__}): fastspec ingest onto the SDSS grid",
        "acknowledgement": SDSS_ACKNOWLEDGEMENT,
        "data_license": "SDSS public data; SDSS asks publications using them for the acknowledgement attribute",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with SpectraWriter(out, "sdss", attrs=attrs, compression=9) as w:
        w.write(data.flux, data.ivar, data.mask, data.z, data.z_err, data.object_id, data.norm, extra=extra)
    write_readme(out_dir / "README.md", attrs, meta)
    return out


def write_readme(path: Path, attrs: dict, meta: list[dict]) -> None:
    from fastspec.atomic import write_text

    n_groups = len({r["object_group"] for r in meta})
    z = np.array([float(r["z"]) for r in meta])
    text = f"""# Bundled data

`sdss_sample.h5` — {attrs['title']}, in the fastspec HDF5 layout (gzip-compressed), found with
`fastspec.data.sample("sdss")`. `fastspec demo` encodes and reports on it when no `--real-dir` is given.

* {len(meta)} spectra of {n_groups} galaxies (repeat observations of one galaxy share `source/object_group`;
  split train/test by it, never by spectrum), z {z.min():.3f}–{z.max():.3f} (median {np.median(z):.3f}).
* Source: {attrs['provenance_source']}.
* Selection: {attrs['provenance_selection']}.
* Built {attrs['provenance_date']} by {attrs['provenance_builder']}; rebuild with
  `python bench/build_sample.py` in a source checkout with `../shared` beside it. The file's attributes
  (`provenance_*`, `acknowledgement`) carry the same record; `source/file` names each row's FITS file.

## Acknowledgement

SDSS data are public; SDSS asks publications that use them to include:

{attrs['acknowledgement']}
"""
    write_text(path, text, sync=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_shared = Path(os.environ.get("FASTSPEC_SHARED", REPO.parent / "shared"))
    ap.add_argument("--shared", type=Path, default=default_shared, help=f"the shared folder (default {default_shared})")
    ap.add_argument("--out", type=Path, default=REPO / "fastspec" / "data", help="where the sample goes")
    ap.add_argument("--date", default=None, help="build date recorded in the file (default: today, UTC)")
    args = ap.parse_args(argv)
    out = build(args.shared, args.out, args.date)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
