"""Ingest throughput (spectra/s, files/s) on the bundled real survey files, measured side by side in one run:
jobs = 1 and 2 worker processes, with the built-in FITS reader and with astropy.

The file list is repeated (copies under a temporary folder, so every copy is a distinct file) to get a stable
number (fewer copies for the slow astropy reader); the copies sit in the page cache, so this measures parsing +
snapping + normalisation + HDF5 writing (+ process-pool start for jobs=2), not disk. Writes
bench/results/ingest.json and .csv.

    .venv/bin/python bench/bench_ingest.py [--copies 16] [--astropy-copies 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, print_table, timeit, write_results  # noqa: E402

from fastspec.ingest import ingest  # noqa: E402

REAL = Path(os.environ.get("FASTSPEC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "real"


def copies(src: list[Path], n: int, dest: Path) -> list[str]:
    out = []
    for k in range(n):
        d = dest / f"copy{k}"
        d.mkdir(parents=True, exist_ok=True)
        for f in src:
            target = d / f.name
            shutil.copy(f, target)
            out.append(str(target))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=16, help="times the file list is repeated (fast reader)")
    ap.add_argument("--astropy-copies", type=int, default=2, help="the same for the ~20x slower astropy reader")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (median)")
    args = ap.parse_args(argv)

    sdss = sorted((REAL / "sdss").glob("spec-*.fits"))
    desi = sorted((REAL / "desi").glob("*.fits"))  # coadds and the redrock files beside them
    if not sdss or not desi:
        print(f"bundled real files not found under {REAL}", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        sets = {
            "sdss+boss": copies(sdss, args.copies, tmp / "sdss"),
            "desi": [f for f in copies(desi, 2 * args.copies, tmp / "desi") if "/coadd-" in f],
        }
        for name, all_files in sets.items():
            for reader in ("fast", "astropy"):
                n = len(all_files) * args.astropy_copies // args.copies if reader == "astropy" else len(all_files)
                files = all_files[:n]
                repeat = args.repeat if reader == "fast" else 1
                for jobs in (1, 2):
                    out = tmp / f"{name}-{reader}-{jobs}.h5"
                    result = {}

                    def run(files=files, out=out, jobs=jobs, reader=reader, result=result):
                        result["r"] = ingest(files, out, jobs=jobs, progress=False, reader=reader)

                    t = timeit(run, repeat=repeat, warmup=1)
                    rep = result["r"]
                    rows.append({
                        "files": name, "reader": reader, "jobs": jobs, "n_files": len(files),
                        "n_spectra": rep.n_ingested, "seconds": t,
                        "files_per_s": len(files) / t, "spectra_per_s": rep.n_ingested / t,
                        "MB_per_s": sum(os.path.getsize(f) for f in files) / t / 1e6,
                    })
                    print(f"  {name:9s} reader={reader:7s} jobs={jobs}: {rows[-1]['spectra_per_s']:.0f} spectra/s",
                          flush=True)
    cols = ["files", "reader", "jobs", "n_files", "n_spectra", "seconds", "files_per_s", "spectra_per_s", "MB_per_s"]
    print_table(rows, cols, title="ingest throughput (end to end: plan, read, snap, normalise, write HDF5)")
    info = machine_info()
    info["loadavg_1m_5m_15m"] = os.getloadavg()  # the machine is shared: other work competes for the cores
    path = write_results("ingest", {"machine": info, "copies": args.copies, "astropy_copies": args.astropy_copies,
                                    "repeat": args.repeat,
                                    "note": "files in page cache; DESI files hold 1 spectrum each",
                                    "rows": rows}, rows)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
