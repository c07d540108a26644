"""`fastspec mock`: write mock galaxy spectra with known ground truth to the fastspec HDF5 layout."""
from __future__ import annotations

import argparse
import sys

from ..mockvar import FEATURES
from .common import say


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"-n must be a positive integer, got {text!r}")
    return n


def register(sub):
    p = sub.add_parser(
        "mock",
        help="mock spectra with ground truth (kcorrect templates + emission lines)",
        description=(
            "Mixtures of the kcorrect v4 galaxy templates (stellar continuum) with emission lines that follow the "
            "mixture, velocity broadening and dust, redshifted onto the instrument grid with a realistic noise "
            "model, sky-line and bad-pixel masks, normalised as ingest does. The ground truth (mixture weights, "
            "line fluxes, vdisp, E(B-V), z, the noiseless restframe spectrum) is stored under truth/. The same "
            "seed gives byte-identical files."
        ),
    )
    p.add_argument("-n", type=_positive_int, required=True, metavar="N", help="number of spectra")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output HDF5 file (written atomically)")
    p.add_argument("--instrument", default="sdss", choices=["sdss", "boss", "desi"], help="grid (default: sdss)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--z-max", type=float, default=0.5, help="largest redshift; also sets the restframe grid (0.5)")
    p.add_argument("--z-min", type=float, default=0.0, help="smallest redshift (default: 0)")
    p.add_argument("--z-dist", default="sdss", choices=["sdss", "uniform"],
                   help="redshift distribution: SDSS main-sample-like (default) or uniform in [z-min, z-max]")
    p.add_argument("--snr-median", type=float, default=None,
                   help="median S/N per pixel (default: sdss 10, boss 5, desi 4; lognormal spread)")
    p.add_argument("--no-restframe-truth", action="store_true",
                   help="do not store truth/spec_rest (N x R floats; saves disk for very large N)")
    p.add_argument("--observed-truth", action="store_true",
                   help="also store the noiseless observed spectrum truth/model_obs (N x L floats)")
    p.add_argument("--id-offset", type=int, default=0,
                   help="first object_id (default 0; use distinct ranges to combine mock files)")
    p.add_argument("--features", default="basic", metavar="SET",
                   help="variation beyond a template mixture: basic (none, default), rich (all), or a comma-separated "
                   "list of: " + ", ".join(FEATURES) + " (see fastspec.mockvar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (messages stay)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..mock import MockError, write_mock

    try:
        info = write_mock(
            args.output, args.n, instrument=args.instrument, seed=args.seed, z_max=args.z_max, z_min=args.z_min,
            z_dist=args.z_dist, snr_median=args.snr_median, restframe_truth=not args.no_restframe_truth,
            observed_truth=args.observed_truth, id_offset=args.id_offset, progress=not (args.quiet or args.no_progress),
            features=args.features,
        )
    except MockError as err:
        print(f"fastspec mock: {err}", file=sys.stderr)
        return 2
    truth = "weights, line_flux, vdisp, ebv, z, snr"
    if not args.no_restframe_truth:
        truth += ", spec_rest"
    if args.observed_truth:
        truth += ", model_obs"
    if args.features != "basic":
        truth += ", line_class, vdisp_gas, broad, calibration, sky_residual, ivar_scale"
    say(
        args,
        f"wrote {info['n']} {info['instrument']} mock spectra to {info['path']} "
        f"({info['bytes'] / 2**20:.1f} MiB) in {info['seconds']:.1f} s: {info['spectra_per_s']:.0f} spectra/s\n"
        f"truth/: {truth}",
        flush=True,
    )
    return 0
