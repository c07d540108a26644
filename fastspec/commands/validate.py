"""`fastspec validate`: check spectra files (fastspec layout or Multimodal Universe) and print a summary per file;
exit 1 when any problem is found."""
from __future__ import annotations

import os
import sys

from .common import say


def register(sub):
    p = sub.add_parser(
        "validate",
        help="check spectra files; summary table; exit 1 on problems",
        description="Check HDF5 spectra files (fastspec layout or Multimodal Universe): format attributes, column "
        "shapes, the wavelength grid, and every row (NaN/inf flux where ivar > 0, negative ivar, rows without "
        "weight, z missing or outside [0, z_max], invalid norm). Prints a summary per file; exits 1 when any "
        "problem is found, 0 when every file is clean.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="HDF5 spectra files")
    p.add_argument("--z-max", type=float, default=None,
                   help="the model's largest redshift: z must lie in [0, z_max] (default: only z >= 0)")
    p.add_argument("--instrument", default=None, help="the instrument the files must hold (sdss, boss, desi)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the reports as JSON to OUT")
    p.add_argument("--max-report", type=int, default=20, help="row problems listed per file (default: 20)")
    p.set_defaults(func=run)


def _overview(reports) -> str:
    head = ("file", "rows", "bad", "z range", "masked", "S/N", "instrument", "status")
    rows = [head]
    for r in reports:
        z = (f"{r.z_min_found:.3g}–{r.z_max_found:.3g}" if r.z_min_found is not None else "—")
        masked = f"{100 * r.masked_fraction:.1f}%" if r.masked_fraction is not None else "—"
        snr = f"{r.median_snr:.3g}" if r.median_snr is not None else "—"
        rows.append((os.path.basename(r.path), str(r.n_rows), str(r.n_bad) if r.rows_checked else "—", z, masked,
                     snr, r.instrument or "—", "OK" if r.ok else f"{r.n_problems} problem(s)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run(args) -> int:
    from ..atomic import write_json
    from ..instruments import InstrumentError, get_instrument
    from ..validate import validate_file

    if args.instrument is not None:
        try:
            get_instrument(args.instrument)
        except InstrumentError as err:
            print(f"fastspec validate: --instrument: {err}")
            return 2
    if args.z_max is not None and not args.z_max >= 0:
        print(f"fastspec validate: --z-max must be >= 0, got {args.z_max}")
        return 2
    reports = []
    for path in args.files:
        rep = validate_file(path, z_max=args.z_max, instrument=args.instrument, max_report=args.max_report,
                            progress=not args.quiet)
        reports.append(rep)
        if not args.quiet:
            print(rep.summary())
            print()
        elif not rep.ok:  # quiet: only the problems, on stderr
            print(rep.summary(), file=sys.stderr)
    if len(reports) > 1:
        say(args, _overview(reports))
    if args.json:
        write_json(args.json, [r.to_dict() for r in reports], sync=False, indent=1)
    n_bad = sum(not r.ok for r in reports)
    say(args, f"{len(reports) - n_bad} of {len(reports)} file(s) clean" + ("" if not n_bad else f"; {n_bad} with problems"))
    return 1 if n_bad else 0
