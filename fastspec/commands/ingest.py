"""`fastspec ingest`: SDSS/BOSS spec(-lite), SDSS DR7 spSpec and DESI coadd + redrock FITS files → one HDF5 spectra
file."""
from __future__ import annotations

import sys

from .common import say, usage_error


def register(sub):
    p = sub.add_parser(
        "ingest",
        help="read SDSS/BOSS spec(-lite), SDSS DR7 spSpec and DESI coadd+redrock FITS files into one HDF5 file",
        description=(
            "Snap every spectrum onto the instrument grid (integer pixel offset, no interpolation), mask "
            "pipeline-flagged pixels, ivar <= 0 and bright sky lines, normalise by the median flux in the "
            "restframe window 5300-5850 A, and write one HDF5 file. Files that cannot be read and spectra "
            "that cannot be used are skipped with their reason (summary table, --report). DESI coadd-X.fits "
            "files take their redshifts from redrock-X.fits beside them (or given among PATHs). Exit code 1 "
            "only when nothing could be ingested."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="FITS files, or folders searched recursively")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output HDF5 file (written atomically)")
    p.add_argument(
        "--instrument",
        default="auto",
        choices=["auto", "sdss", "boss", "desi"],
        help="output grid (default auto: sdss for SDSS-I/II files, boss when any BOSS file is present, "
        "desi for DESI; DESI mixed with SDSS/BOSS: the minority is skipped with a reason)",
    )
    p.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument(
        "--spectype",
        default="GALAXY",
        help="comma-separated classes to keep (SDSS CLASS / DESI SPECTYPE), or 'any' (default: GALAXY)",
    )
    p.add_argument("--zwarn-zero", action="store_true", help="skip spectra whose ZWARNING / ZWARN is not 0")
    p.add_argument("--append", action="store_true", help="add to an existing output file of the same instrument")
    p.add_argument("--report", metavar="FILE", default=None, help="write the machine-readable report (JSON)")
    p.add_argument(
        "--fits-reader",
        default="fast",
        choices=["fast", "astropy"],
        help="FITS reader: fast (built in, default) or astropy (the reference, ~10x slower)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary stays)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ingest import ingest

    spectypes = None if args.spectype.strip().lower() in ("any", "all", "") else \
        tuple(s for s in args.spectype.split(",") if s.strip())
    if args.jobs is not None and args.jobs < 1:
        return usage_error("ingest", f"--jobs must be >= 1, got {args.jobs}")
    report = ingest(
        args.paths,
        args.output,
        instrument=args.instrument,
        jobs=args.jobs,
        spectypes=spectypes,
        zwarn_zero=args.zwarn_zero,
        append=args.append,
        progress=not (args.quiet or args.no_progress),
        reader=args.fits_reader,
    )
    from ..ingest import format_summary

    say(args, format_summary(report), flush=True)
    if args.report:
        report.write_json(args.report)
        say(args, f"report: {args.report}")
    if args.quiet and report.n_ingested and (report.n_skipped or report.n_failed_files):
        # nothing is dropped silently, even when quiet
        print(f"fastspec ingest: warning: {report.n_failed_files} file(s) not read, {report.n_skipped} spectra "
              "skipped; the reasons are in the summary (run without -q)"
              + (f" and in {args.report}" if args.report else ""), file=sys.stderr)
    if report.n_ingested == 0:
        if args.quiet:  # the reasons are the error's detail
            print(format_summary(report), file=sys.stderr)
        print(
            f"fastspec ingest: nothing could be ingested from {len(report.files)} file(s); "
            "see the reasons above" + (f" and in {args.report}" if args.report else ""),
            file=sys.stderr,
        )
        return 1
    return 0
