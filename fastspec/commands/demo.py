"""`fastspec demo`: the whole pipeline on built-in defaults — mock spectra, the real SDSS sample shipped in the
package (or real FITS files ingested from --real-dir), a short training run, bulk encoding and the report — on
CPU, with no network."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import encode, ingest, mock, report, train, validate
from .common import register_commands, say, usage_error

STEPS = (mock, ingest, validate, train, encode, report)  # the commands the demo runs, by their own parsers


def register(sub):
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on mock data and real SDSS spectra (CPU, ~5 min)",
        description="Make mock spectra, take the real SDSS spectra shipped with fastspec (or ingest the FITS "
        "files of --real-dir), train a small model, encode the spectra and write the report. Every step "
        "prints its progress.",
    )
    p.add_argument("-o", "--out", default="demo-output", help="output directory (default: demo-output)")
    p.add_argument("-n", "--n-mock", type=int, default=3000, help="number of mock spectra (default: 3000)")
    p.add_argument("--steps", type=int, default=1500,
                   help="training steps (default: 1500, about 5 minutes on 2 idle cores with bf16)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training precision (default: auto = bf16 autocast where the CPU has native bf16, else "
                   "fp32); encoding uses bf16 only when this is bf16")
    p.add_argument("--real-dir", default=None,
                   help="folder with sdss/spec-*.fits and/or desi/coadd-*.fits to ingest (default: the SDSS "
                   "sample shipped with fastspec, fastspec.data.sample('sdss'))")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _parser(quiet: bool = False) -> argparse.ArgumentParser:
    """A `fastspec` parser with just the commands the demo runs (each quiet when the demo is)."""
    parser = argparse.ArgumentParser(prog="fastspec")
    sub = parser.add_subparsers(dest="command")
    register_commands(sub, STEPS)
    for step in sub.choices.values():
        step.set_defaults(quiet=quiet)
    return parser


def _step(parser: argparse.ArgumentParser, title: str, argv: list[str]) -> None:
    """Print the command line of one step, then run it as `fastspec` would."""
    args = parser.parse_args(argv)
    say(args, f"\n== {title}\n$ fastspec {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = args.func(args)
    if rc not in (0, None):
        raise SystemExit(f"demo: step '{title}' failed with exit code {rc}")
    say(args, f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def run(args) -> int:
    parser = _parser(args.quiet)
    out = Path(args.out)
    sdss_files, desi_files = [], []
    if args.real_dir:  # the user's files, ingested; finding none is an error, not a demo without real spectra
        real = Path(args.real_dir)
        sdss_files = sorted(str(p) for p in (real / "sdss").glob("spec-*.fits"))
        desi_files = sorted(str(p) for p in (real / "desi").glob("coadd-*.fits"))
        if not sdss_files and not desi_files:
            return usage_error("demo", f"--real-dir {real}: found no sdss/spec-*.fits or desi/coadd-*.fits files")
        real_sdss = out / "real-sdss.h5" if sdss_files else None
    else:
        from ..data import sample

        real_sdss = sample("sdss")
    out.mkdir(parents=True, exist_ok=True)
    mock_file = out / "mock-sdss.h5"
    _step(parser, "mock spectra with ground truth",
          ["mock", "-n", str(args.n_mock), "-o", str(mock_file), "--seed", str(args.seed)])
    if not args.real_dir:
        say(args, f"\n== real spectra: the SDSS sample shipped with fastspec (no ingest needed)\n   {real_sdss}\n"
            f"   provenance and the SDSS acknowledgement: {real_sdss.parent / 'README.md'}", flush=True)
    if sdss_files:
        _step(parser, "ingest the SDSS/BOSS spectra of --real-dir",
              ["ingest", *sdss_files, "-o", str(out / "real-sdss.h5"), "--instrument", "sdss"])
    if desi_files:
        _step(parser, "ingest the DESI spectra of --real-dir",
              ["ingest", *desi_files, "-o", str(out / "real-desi.h5"), "--instrument", "desi"])
    _step(parser, "validate the mock file", ["validate", str(mock_file)])
    run_dir = out / "run"
    # the default recipe (bench/results/recipe/recipe.md); validation every 250 steps rather than every epoch
    train_argv = ["train", str(mock_file), "-o", str(run_dir), "--steps", str(args.steps), "--batch-size",
                  str(args.batch_size), "--seed", str(args.seed), "--precision", args.precision,
                  "--val-every", "250"]
    if (run_dir / "checkpoint.pt").exists():
        train_argv.append("--resume")  # a demo interrupted during training picks up where it stopped
    _step(parser, "train a model (paper architecture, S=10, default recipe)", train_argv)
    model = run_dir / "best.pt"  # the lowest validation loss
    if not model.exists():  # a run too short to have validated
        model = run_dir / "final.pt"
    enc_precision = "bf16" if args.precision == "bf16" else "fp32"
    sets = [("mock", mock_file)] + ([("real", real_sdss)] if real_sdss else [])
    for tag, path in sets:
        latents = out / f"latents-{tag}.h5"
        _step(parser, f"encode the {tag} spectra", ["encode", str(model), str(path), "-o", str(latents), "--chi2",
                                                    "--precision", enc_precision])
        _step(parser, f"report on the {tag} spectra", ["report", str(model), str(path), "-o",
                                                       str(out / f"report-{tag}"), "--latents", str(latents),
                                                       "--precision", enc_precision])
    say(args, f"\ndemo finished: outputs in {out.resolve()}")
    if real_sdss:
        say(args, "  (the model learned from mock spectra only: real galaxies carry line ratios and continua the mocks "
                  "lack, so their χ² is far above the mocks'; bench/bench_real.py trains on real spectra)")
    for tag, _ in sets:
        say(args, f"  {tag:4s} spectra: figures and summary in {(out / f'report-{tag}').resolve()}/report.md, "
              f"latents in {(out / f'latents-{tag}.h5').resolve()}")
    return 0
