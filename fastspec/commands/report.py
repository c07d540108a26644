"""`fastspec report`: figures and a Markdown summary of what a trained model does; see fastspec.report."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser(
        "report",
        help="PNG figures + Markdown summary: reconstructions, redshift invariance, latents, losses, chi2",
        description="Encode a sample of the spectra with a trained model and write to DIR: reconstructions "
        "like Figure 2 of Melchior+22 (with [O II], Hβ+[O III], Hα+[N II] zooms), the redshift-invariance "
        "test of Figure 3, latent scatter plots coloured by z (and by the true mixture weights for mock data), "
        "the loss curves (history.json beside MODEL) and the reduced chi2 distribution, plus report.md and "
        "summary.json.",
    )
    p.add_argument("model", help="trained model (final.pt / best.pt from fastspec train)")
    p.add_argument("data", nargs="+", help="spectra files (fastspec HDF5) to report on")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("-n", "--n-spectra", type=int, default=1000,
                   help="spectra encoded for the figures (default: 1000)")
    p.add_argument("--examples", type=int, default=3, help="spectra shown in the reconstruction figure (default 3)")
    p.add_argument("--latents", default=None,
                   help="latents file from `fastspec encode --chi2` of the same data: latent and chi2 figures "
                   "then show every spectrum")
    p.add_argument("--scores", default=None,
                   help="scores file from `fastspec outliers`: adds the log-probability distribution")
    p.add_argument("--history", default=None, help="training history.json (default: the one beside MODEL)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--backend", choices=["auto", "triton", "numba", "torch"], default=None,
                   help="kernel backend (default: auto)")
    p.add_argument("--batch-size", type=int, default=128)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..encode import EncodeError
    from ..h5format import SpectraFormatError
    from ..report import ReportError, make_report

    if args.n_spectra < 2 or args.examples < 1:
        print("fastspec report: error: --n-spectra must be ≥ 2 and --examples ≥ 1", file=sys.stderr)
        return 2
    if args.backend:
        from ..kernels import set_backend

        set_backend(args.backend)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        summary = make_report(args.model, args.data, args.out, n_spectra=args.n_spectra, n_examples=args.examples,
                              latents=args.latents, history=args.history, device=device,
                              precision=args.precision, batch_size=args.batch_size, progress=not args.quiet,
                              scores=args.scores)
    except (ReportError, EncodeError, SpectraFormatError, FileNotFoundError, ValueError) as err:
        print(f"fastspec report: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        med = summary["chi2_median"]
        print(f"report in {args.out}/report.md — median reduced chi2 "
              f"{'n/a' if med is None else f'{med:.3g}'}, redshift-invariance ratio "
              f"{summary['redshift_invariance']['latent_spread_over_sample_sigma']:.3g}")
    return 0
