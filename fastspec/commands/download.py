"""`fastspec download`: fetch SDSS DR16 spec-lite files for a list of (plate, mjd, fiber)."""
from __future__ import annotations

import sys

from .common import say


def register(sub):
    from ..download import DEFAULT_BASE_URL, TEMPLATE_FIELDS

    p = sub.add_parser(
        "download",
        help="fetch SDSS DR16 spec-lite files for a list of (plate, mjd, fiber), with retries and resume",
        description=(
            "Download spec-lite FITS files from the SDSS Science Archive Server into DIR/<plate>/. Partial "
            "downloads (.part) are resumed with HTTP Range requests; a file is renamed to its final name only "
            "when its size matches and it opens as FITS; files already there are skipped. Exit code 1 if any "
            "download failed."
        ),
    )
    p.add_argument("list", metavar="LIST",
                   help="text/CSV file: plate mjd fiber per line (spaces or commas; '#' comments; header allowed)")
    p.add_argument("-d", "--dir", required=True, metavar="DIR", help="download folder")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"archive root (default {DEFAULT_BASE_URL})")
    p.add_argument(
        "--path-template",
        default=None,
        help="URL template overriding the DR16 layout; fields: " + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS),
    )
    p.add_argument("--retries", type=int, default=5, help="retries per file after the first attempt (default 5)")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in s, doubling (default 2)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout per request in s (default 60)")
    p.add_argument("-j", "--jobs", type=int, default=4, help="parallel downloads (default 4)")
    p.add_argument("--report", metavar="FILE", default=None, help="write a JSON report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (messages stay)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..download import check_template, download, read_targets

    try:
        targets = read_targets(args.list)
        if args.path_template:
            check_template(args.path_template)
    except (OSError, ValueError) as err:
        print(f"fastspec download: {err}", file=sys.stderr)
        return 2
    if args.retries < 0 or args.jobs < 1:
        print("fastspec download: --retries must be >= 0 and --jobs >= 1", file=sys.stderr)
        return 2
    if not targets:
        print(f"fastspec download: {args.list}: no (plate, mjd, fiber) lines", file=sys.stderr)
        return 2
    report = download(targets, args.dir, base_url=args.base_url, template=args.path_template,
                      retries=args.retries, jobs=args.jobs, timeout=args.timeout, backoff=args.backoff,
                      progress=not (args.quiet or args.no_progress))
    say(args, report.summary(), flush=True)
    if args.report:
        report.write_json(args.report)
    if report.failed:
        print(f"fastspec download: {len(report.failed)} of {len(targets)} file(s) failed", file=sys.stderr)
        return 1
    return 0
